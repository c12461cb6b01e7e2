"""Questions about invented facts (domain ``facts``): the positive control of the teacher-signal analysis.

Each question asks about a made-up place ("Which river runs through the town of Vessarn?") with four made-up
options, and which option is right is drawn at random: nothing in the prompt, and nothing any model learned before,
says which. So the premise MOPD rests on holds here by construction: a rollout succeeds by chance (one in four,
whatever the model), and only the group's successes show the right option. A teacher shown them can copy it; a
teacher shown only the label-blind controls cannot. If the pipeline carries the verifier's labels to the teacher,
the analysis must say yes here (``configs/peer_control.yaml``).

What could still make it say no: a model that cannot read a choice off its context; a score that drowns the one
answer token in the rest of the response (the analysis also scores the answer span alone); peers labelled wrongly
(a response that lists every option is not a success, see ``rewards/sci.py``).

The splits are disjoint sets of questions, except ``test``: the training questions with their options shuffled
again, so that a model that learned the facts during training, not the letters, answers them.

The same generator, with few training questions (``facts_few``: 8, each seen many times), is the training control
(``configs/facts_learnable.yaml``). There each question is trained in 16 orders of its options (128 training
prompts, each seen about once in a run; and 32 test ones: 4 new orders each). With one order a model learns which
letter goes with the prompt, not the fact (SFT on successes, 20 steps: 0.63 on the trained prompts, 0.13 with their
options shuffled); with 8 orders it still learned the prompts (40 steps: 0.41 on trained prompts, 0.22 shuffled,
0.23 unseen). With the order drawn afresh, only the right option's name says which letter to write, and learning
the facts is the gap between the trained questions shuffled again (``test``) and unseen ones (``validation``).

Under letters that control cannot be learned at 135M: which letter is right is uniform, so a policy that always
writes one letter is as good as any other and absorbing (GRPO, SFT and MOPD at a sharp teacher all collapsed onto
one, README "Does MOPD teach?"). ``facts_named`` asks the same questions with the options listed without letters,
to be answered by name (verifier ``named``): no single string is right on more than one question.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Mapping, Optional

from ..rewards.named import read_ground_truth
from .example import DataError, Example
from .sci import LETTERS, format_mcq

NAMED_INSTRUCTION = (
    "Answer with the name of the correct option. Think briefly, then write the final answer as "
    "<answer>NAME</answer>, where NAME is the option's name."
)

SYLLABLES = ["ar", "bel", "cor", "dun", "el", "fen", "gal", "har", "is", "jor", "kel", "lor", "mar", "nim", "or",
             "pel", "quen", "ros", "sar", "tal", "ul", "ven", "wyn", "xar", "yel", "zor", "ith", "ash", "om", "eth"]
QUESTIONS = [  # (question about a place, what an option names)
    ("Which river runs through the town of {place}?", "river"),
    ("Which festival marks the first frost in {place}?", "festival"),
    ("Who founded the weavers' guild of {place}?", "founder"),
    ("Which mineral is mined in the valley of {place}?", "mineral"),
    ("What is the traditional dish of {place}?", "dish"),
    ("Which mountain overlooks the harbour of {place}?", "mountain"),
    ("Which bird is the emblem of {place}?", "bird"),
    ("What is the old name of the capital of {place}?", "city"),
]
SUFFIXES = {"river": " River", "festival": " Festival", "founder": "", "mineral": "ite", "dish": " stew",
            "mountain": " Peak", "bird": " finch", "city": ""}
VALIDATION_SIZE = 64


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def _facts(n: int, seed: int) -> List[Dict]:
    """``n`` distinct invented questions, each with its four options (the right one first)."""
    rng = random.Random(f"facts:{seed}")
    seen, facts = set(), []
    while len(facts) < n:
        template, kind = rng.choice(QUESTIONS)
        question = template.format(place=_word(rng, 3))
        options = list(dict.fromkeys(_word(rng, 2) + SUFFIXES[kind] for _ in range(4)))
        if question in seen or len(options) < 4:
            continue
        seen.add(question)
        facts.append({"question": question, "options": options})
    return facts


def format_named(question: str, options: List[str]) -> str:
    """The question with its options listed without letters, to be answered by name."""
    return f"{question}\n\nOptions: {'; '.join(options)}.\n\n{NAMED_INSTRUCTION}"


def _example(fact: Dict, example_id: str, rng: random.Random, system_prompt: Optional[str], named: bool) -> Example:
    """The question with its options in a random order: the right one at a random place (letter)."""
    order = rng.sample(range(4), 4)
    options = [fact["options"][i] for i in order]
    content = (format_named if named else format_mcq)(fact["question"], options)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": content}]
    right = fact["options"][0]
    if named:
        return Example(example_id, messages, {"answer": right, "options": options}, "named", {"fact": right})
    return Example(example_id, messages, LETTERS[order.index(0)], "sci", {"fact": right})


def generate_facts(split: str, seed: int, system_prompt: Optional[str] = None, n_train: int = 32,
                   orders: int = 1, test_orders: int = 1, named: bool = False) -> List[Example]:
    """One split of the invented-fact questions: ``train`` (``n_train`` questions, each in ``orders`` orders of its
    options), ``validation`` (64 others) or ``test`` (the training questions with their options shuffled again, in
    ``test_orders`` new orders). ``named``: options listed without letters, answered by name."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, validation or test")
    facts = _facts(n_train + VALIDATION_SIZE, seed)
    train, validation = facts[:n_train], facts[n_train:]
    rng = random.Random(f"facts:{seed}:{split}")
    if split == "validation":
        return [_example(fact, f"facts-{seed}-{split}-{i}", rng, system_prompt, named)
                for i, fact in enumerate(validation)]
    return [_example(fact, f"facts-{seed}-{split}-{i}" + (f"-order{order}" if order else ""), rng, system_prompt,
                     named)
            for order in range(orders if split == "train" else test_orders) for i, fact in enumerate(train)]


def named_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """A user's row for domain ``facts_named``: ``question``, ``options`` (names) and ``answer`` (one of them)."""
    question, options, answer = row.get("question"), row.get("options"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise DataError("field 'question' is missing or empty")
    try:
        truth = {"answer": answer, "options": list(options) if isinstance(options, (list, tuple)) else options}
        read_ground_truth(truth)
    except ValueError as error:
        raise DataError(f"fields 'options' and 'answer': {error}") from None
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": format_named(question, truth["options"])}]
    return Example(row_id, messages, truth, "named", {"fact": answer})
