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
    assert "300 rows of a kind this domain does not use" in caplog.text
    yes_no = next(e for e in data.datasets["train"] if e.meta["type"] == "true_or_false")
    assert yes_no.ground_truth in ("Yes", "No") and "<answer>Yes</answer>" in yes_no.question


def test_bad_row_names_file_and_row(tmp_path):
    good = {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A",
            "type": "mcq-2-choices"}
    bad = dict(good, answerKey="C")
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, good, bad, good]) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:3: field 'answerKey'"):
        PromptDataModule(train=str(path), val=None).setup("fit")
    data = PromptDataModule(train=str(path), val=None, skip_invalid=True, batch_size=1)
    data.setup("fit")
    assert len(data.datasets["train"]) == 3 and data.skipped["train"] == 1


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
