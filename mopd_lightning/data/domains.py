"""Domains: where each task's embedded data comes from, how its rows become Examples, and its verifier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

from . import science
from .example import Example

RowConverter = Callable[[Mapping[str, Any], str, Optional[str]], Optional[Example]]
EmbeddedBuilder = Callable[[str, int, Optional[str]], List[Example]]


@dataclass(frozen=True)
class Domain:
    """``embedded(split, seed, system_prompt)`` builds one split of the packaged data (splits never share a
    question); ``from_row`` reads one user row, returning None for a kind the domain does not train on."""

    embedded: EmbeddedBuilder
    from_row: RowConverter


def _embedded_science(split: str, seed: int, system_prompt: Optional[str]) -> List[Example]:
    sizes = {"train": 500, "validation": 100, "test": 100}
    # One generation, then sliced: the generator never repeats a question, so the splits are disjoint.
    examples = science.generate_science(sum(sizes.values()), seed, system_prompt, prefix="sci")
    start = 0
    for name, size in sizes.items():
        if name == split:
            return examples[start:start + size]
        start += size
    raise ValueError(f"unknown split {split!r}")


DOMAINS: Dict[str, Domain] = {
    "sci": Domain(_embedded_science, science.sciknoweval_example),
}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"data.domain is {name!r}; known domains: {sorted(DOMAINS)}")
    return DOMAINS[name]
