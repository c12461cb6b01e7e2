"""Domains: where each task's embedded data comes from, how its rows become Examples, and its verifier."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

from ..config import ConfigError
from . import code, facts, math, sci, tool
from .example import Example
from .verl import accepting_verl

RowConverter = Callable[[Mapping[str, Any], str, Optional[str]], Example]
EmbeddedBuilder = Callable[[str, int, Optional[str]], List[Example]]


@dataclass(frozen=True)
class Domain:
    """``embedded(split, seed, system_prompt)`` builds one split of the packaged data (splits never share a
    question); ``from_row`` reads one user row, raising ``UnusedRow`` for a kind the domain does not train on
    and ``DataError`` for a malformed row.
    Every domain also reads verl-layout rows (``prompt``, ``reward_model.ground_truth``, ``data_source``)."""

    embedded: EmbeddedBuilder
    from_row: RowConverter


def _take(examples: List[Example], sizes: Dict[str, Optional[int]], split: str) -> List[Example]:
    """Consecutive slices of ``examples``, one per split in the order of ``sizes`` (None: all the rest)."""
    start = 0
    for name, size in sizes.items():
        end = len(examples) if size is None else start + size
        if name == split:
            return examples[start:end]
        start = end
    raise ValueError(f"unknown split {split!r}; expected one of {list(sizes)}")


def _embedded_sci(split: str, seed: int, system_prompt: Optional[str]) -> List[Example]:
    sizes = {"train": 500, "validation": 100, "test": 100}
    # One generation, then sliced: the generator never repeats a question, so the splits are disjoint.
    examples = sci.generate_sci(sum(sizes.values()), seed, system_prompt, prefix="sci")
    return _take(examples, sizes, split)


def _embedded_math(split: str, seed: int, system_prompt: Optional[str]) -> List[Example]:
    sizes = {"train": 500, "validation": 100, "test": 100}
    return _take(math.generate_math(sum(sizes.values()), seed, system_prompt), sizes, split)


def _shuffled(examples: List[Example], seed: int) -> List[Example]:
    random.Random(seed).shuffle(examples)
    return examples


def _embedded_code(split: str, seed: int, system_prompt: Optional[str]) -> List[Example]:
    # HumanEval's 164 problems, shuffled by the seed: 124 train / 20 validation / 20 test.
    sizes = {"validation": 20, "test": 20, "train": None}
    return _take(_shuffled(code.embedded_humaneval(system_prompt), seed), sizes, split)


def _embedded_tool(split: str, seed: int, system_prompt: Optional[str]) -> List[Example]:
    # BFCL simple/multiple/parallel with possible answers (each request once), shuffled by the seed.
    sizes = {"validation": 100, "test": 100, "train": None}
    return _take(_shuffled(tool.embedded_bfcl(system_prompt), seed), sizes, split)


DOMAINS: Dict[str, Domain] = {
    "sci": Domain(_embedded_sci, accepting_verl(sci.sciknoweval_example)),
    "facts": Domain(facts.generate_facts, accepting_verl(sci.sciknoweval_example)),  # the analysis's positive control
    "facts_few": Domain(functools.partial(facts.generate_facts, n_train=8, orders=16, test_orders=4),  # learnable
                        accepting_verl(sci.sciknoweval_example)),
    "facts_named": Domain(functools.partial(facts.generate_facts, n_train=8, orders=16, test_orders=4, named=True),
                          accepting_verl(facts.named_example)),  # facts_few answered by name
    "math": Domain(_embedded_math, accepting_verl(math.math_example)),
    "code": Domain(_embedded_code, accepting_verl(code.code_example)),
    "tool": Domain(_embedded_tool, accepting_verl(tool.tool_example)),
}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ConfigError(f"data.domain is {name!r}; known domains: {sorted(DOMAINS)}")
    return DOMAINS[name]
