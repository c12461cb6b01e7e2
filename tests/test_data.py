import collections
import json

import pytest

from mopd_lightning.data import DataError, PromptDataModule
from mopd_lightning.data.datamodule import PromptStream
from mopd_lightning.data.sci import generate_sci, molar_mass


def test_embedded_science_is_balanced_deterministic_and_disjoint():
    data = PromptDataModule()
    data.setup("fit")
    train, val = data.datasets["train"], data.datasets["validation"]
    assert len(train) >= 500 and len(val) >= 100
    assert set(collections.Counter(e.ground_truth for e in train).values()) == {len(train) // 4}
    assert not {e.question for e in train} & {e.question for e in val}
    again = PromptDataModule()
    again.setup("fit")
    assert [e.question for e in again.datasets["train"]] == [e.question for e in train]
    assert generate_sci(20, seed=1)[0].question != generate_sci(20, seed=2)[0].question


def test_science_answers_are_right():
    assert molar_mass("H2O") == pytest.approx(18.015, abs=1e-3)
    assert molar_mass("Ca(OH)2") == pytest.approx(74.092, abs=1e-3)
    example = generate_sci(1, seed=0)[0]
    letter = example.ground_truth
    assert f"\n{letter}. " in example.question and "<answer>X</answer>" in example.question


def test_sciknoweval_all_choice_types(sciknoweval_dir, caplog):
    data = PromptDataModule(train=str(sciknoweval_dir), val=None)
    data.setup("fit")
    kinds = collections.Counter(e.meta["type"] for e in data.datasets["train"])
    assert set(kinds) == {"mcq-4-choices", "mcq-2-choices", "true_or_false"}
    assert sum(kinds.values()) == 2700  # 3000 rows, of which 300 'filling' rows are counted, not used
    assert data.summary()["train"] == {"prompts": 2700, "source": str(sciknoweval_dir), "rows_used": 2700,
                                       "rows_invalid": 0, "rows_unused": {"filling": 300}}
    assert "2700 rows used, 300 of kinds this domain does not use (filling 300)" in caplog.text
    yes_no = next(e for e in data.datasets["train"] if e.meta["type"] == "true_or_false")
    assert yes_no.ground_truth in ("Yes", "No") and "<answer>Yes</answer>" in yes_no.question


MCQ = {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A",
       "type": "mcq-2-choices"}
YES_NO = {"question": "Is it?", "answer": "No", "type": "true_or_false"}


def _write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_sciknoweval_types_the_verifier_cannot_score_are_counted_by_type(tmp_path, caplog):
    unused = [{"question": "Why?", "answer": "Because.", "type": "open-ended-qa"},
              {"question": "Relations?", "answer": "x-y", "type": "relation_extraction"},
              {"question": "Fill ___", "answer": "in", "type": "filling"},
              {"question": "Why again?", "answer": "", "type": "open-ended-qa"},
              {"type": "a-type-from-a-later-release"}]  # unused rows are not checked further
    _write_rows(tmp_path / "a.jsonl", [MCQ, unused[0], YES_NO, unused[1]])
    _write_rows(tmp_path / "b.jsonl", unused[2:] + [MCQ])
    data = PromptDataModule(train=str(tmp_path), val=None, batch_size=1)
    data.setup("fit")
    assert [e.meta["type"] for e in data.datasets["train"]] == ["mcq-2-choices", "true_or_false", "mcq-2-choices"]
    assert data.summary()["train"]["rows_unused"] == {"open-ended-qa": 2, "relation_extraction": 1, "filling": 1,
                                                     "a-type-from-a-later-release": 1}
    assert data.skipped["train"] == 0
    assert ("3 rows used, 5 of kinds this domain does not use (open-ended-qa 2, a-type-from-a-later-release 1, "
            "filling 1, relation_extraction 1)") in caplog.text


def test_a_source_of_only_unused_types_says_so(tmp_path):
    path = _write_rows(tmp_path / "open.jsonl", [{"question": "Why?", "answer": "-", "type": "open-ended-qa"}])
    with pytest.raises(DataError, match=r"no usable train examples .*open-ended-qa 1"):
        PromptDataModule(train=str(path), val=None).setup("fit")


@pytest.mark.parametrize("bad, message", [
    (dict(MCQ, type="mcq-4-choices", choices={"text": list("abcde"), "label": list("ABCD")}),
     r"mcq-4-choices row: field 'choices' has 5 option texts for 4 labels"),
    (dict(MCQ, answerKey="C"), r"mcq-2-choices row: field 'answerKey' is 'C', not one of the labels"),
    (dict(MCQ, question="  "), r"mcq-2-choices row: field 'question' is missing or empty"),
    (dict(MCQ, choices="A. a B. b"), r"mcq-2-choices row: field 'choices' must be an object"),
    (dict(YES_NO, answer="maybe"), r"true_or_false row: field 'answer' must be Yes/No"),
    ({k: v for k, v in MCQ.items() if k != "type"}, r"field 'type' is missing"),
])
def test_malformed_sciknoweval_row_names_file_and_line(tmp_path, bad, message):
    path = _write_rows(tmp_path / "rows.jsonl", [MCQ, YES_NO, bad, MCQ])
    with pytest.raises(DataError, match=r"rows.jsonl:3: " + message) as raised:
        PromptDataModule(train=str(path), val=None).setup("fit")
    assert "--data.skip_invalid true" in str(raised.value)


def test_skip_invalid_counts_and_leaves_out_malformed_rows(tmp_path, caplog):
    five_texts = dict(MCQ, type="mcq-4-choices", choices={"text": list("abcde"), "label": list("ABCD")})
    rows = [MCQ, five_texts, dict(MCQ, answerKey="C"), {"question": "Why?", "type": "open-ended-qa"}, YES_NO]
    path = _write_rows(tmp_path / "rows.jsonl", rows)
    data = PromptDataModule(train=str(path), val=None, skip_invalid=True, batch_size=1)
    data.setup("fit")
    assert len(data.datasets["train"]) == 2 and data.skipped["train"] == 2
    assert data.summary()["train"] == {"prompts": 2, "source": str(path), "rows_used": 2, "rows_invalid": 2,
                                       "rows_unused": {"open-ended-qa": 1}}
    assert "2 invalid rows skipped (data.skip_invalid; the first: " in caplog.text
    assert "rows.jsonl:2: mcq-4-choices row: field 'choices' has 5 option texts" in caplog.text


def test_line_numbers_count_only_newlines(tmp_path):
    """A JSON string may hold U+2028 unescaped; it must neither break the row nor shift later line numbers."""
    path = tmp_path / "sep.jsonl"
    text = json.dumps(dict(MCQ, question="Q\u2028on two lines?"), ensure_ascii=False)
    path.write_text(text + "\n" + json.dumps(dict(MCQ, answerKey="Z")) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sep.jsonl:2: "):
        PromptDataModule(train=str(path), val=None).setup("fit")


def test_hub_rows_use_the_same_conversion(monkeypatch):
    """The README's hub form: rows from ``datasets`` go through the converter that reads the JSONL files."""
    datasets = pytest.importorskip("datasets")
    def hub_row(**fields):  # a hub table gives every row every column, empty where the row has none
        return {"question": "Q?", "choices": {"text": [], "label": []}, "answerKey": "", "answer": "", **fields}

    four = {"text": list("abcd"), "label": list("ABCD")}
    rows = [hub_row(type="mcq-4-choices", choices=four, answerKey="D"),
            hub_row(type="open-ended-qa", answer="Because."),
            hub_row(type="mcq-4-choices", choices={"text": list("abcde"), "label": list("ABCD")}, answerKey="A"),
            hub_row(type="true_or_false", answer="No")]
    asked = []

    def load_dataset(name, config=None, split=None):
        asked.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"HICAI-ZJU/SciKnowEval\[test\]#2: mcq-4-choices row: field 'choices' "
                                        r"has 5 option texts .*--data.skip_invalid true"):
        PromptDataModule(train="HICAI-ZJU/SciKnowEval", train_split="test", val=None).setup("fit")
    data = PromptDataModule(train="HICAI-ZJU/SciKnowEval", train_split="test", val=None, batch_size=1,
                            skip_invalid=True)
    data.setup("fit")
    assert asked[-1] == ("HICAI-ZJU/SciKnowEval", None, "test")
    assert [(e.ground_truth, e.meta["type"]) for e in data.datasets["train"]] == [("D", "mcq-4-choices"),
                                                                                 ("No", "true_or_false")]
    assert data.summary()["train"]["rows_unused"] == {"open-ended-qa": 1}
    assert data.summary()["train"]["rows_invalid"] == 1


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = {"question": "Q?", "answer": "Yes", "type": "true_or_false"}
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match="broken.jsonl:2"):
        PromptDataModule(train=str(path), val=None).setup("fit")


def test_missing_dataset_fails_at_construction():
    with pytest.raises(DataError, match="data.train: dataset path"):
        PromptDataModule(train="./no/such/file.jsonl")
    with pytest.raises(ValueError, match="data.domain"):
        PromptDataModule(domain="poetry")


def test_holdout_validation_is_disjoint(sciknoweval_dir):
    data = PromptDataModule(train=str(sciknoweval_dir / "Biology"), val="holdout", num_val=50)
    data.setup("fit")
    assert len(data.datasets["validation"]) == 50
    assert not {e.id for e in data.datasets["validation"]} & {e.id for e in data.datasets["train"]}


def test_stream_splits_prompts_across_ranks_and_resumes():
    examples = generate_sci(24, seed=0)
    single = list(PromptStream(examples, 4, seed=3, shuffle=True))
    rank0 = list(PromptStream(examples, 2, seed=3, shuffle=True, rank=0, world_size=2))
    rank1 = list(PromptStream(examples, 2, seed=3, shuffle=True, rank=1, world_size=2))
    for whole, a, b in zip(single, rank0, rank1):
        assert [e.id for e in whole] == [e.id for e in a + b]
    resumed = PromptStream(examples, 4, seed=3, shuffle=True)
    resumed.consumed = 8  # 6 batches per epoch: this is epoch 1, batch 2
    next_epoch = PromptStream(examples, 4, seed=3, shuffle=True)
    next_epoch.consumed = 6
    assert [e.id for b in resumed for e in b] == [e.id for b in list(next_epoch)[2:] for e in b]
    with pytest.raises(DataError, match="data.batch_size=30"):
        PromptStream(examples, 30, seed=0, shuffle=False)
