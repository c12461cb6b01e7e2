"""How alike a group's rollouts are: self-BLEU-4, as the paper's code reports it (``diversity/compute_metrics.py``).

MOPD's known failure is collapse, every rollout of a group converging on one answer; self-BLEU rises towards 1 as
it happens. The definition is the reference's own, not sacrebleu's or nltk's defaults, so that numbers compare:
tokens are identifiers, digit runs and single non-space characters; code is reduced to its last fenced block;
n-gram precisions of orders 1-4 with add-one smoothing on every order (an order the candidate lacks counts 1);
uniform weights; the brevity penalty against the closest non-empty reference length (the shorter on a tie; 0
without one).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import List, Optional, Sequence

TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\s]")
CODE_BLOCK = re.compile(r"```(?:python)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def bleu_tokens(text: str, code: bool = False) -> List[str]:
    if code:
        blocks = CODE_BLOCK.findall(text)
        text = blocks[-1].strip() if blocks else text
    return TOKEN.findall(text)


def _ngram_counts(tokens: Sequence[str]) -> List[Counter]:
    """The token list's n-gram counts, for n = 1..4."""
    return [Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)) for n in range(1, 5)]


def bleu4(candidate: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """BLEU-4 of ``candidate`` against ``references`` (token lists), smoothed as the reference smooths it."""
    return _bleu4(candidate, _ngram_counts(candidate), [(r, _ngram_counts(r)) for r in references])


def _bleu4(candidate: Sequence[str], counts: List[Counter], references: Sequence) -> float:
    if not candidate:
        return 0.0
    log_precision = 0.0
    for n, grams in enumerate(counts):
        total = sum(grams.values())
        if total == 0:
            continue  # precision 1
        clipped = sum(min(count, max(ref[n].get(gram, 0) for _, ref in references)) for gram, count in grams.items())
        log_precision += math.log((clipped + 1) / (total + 1)) / 4
    lengths = [len(tokens) for tokens, _ in references if tokens]
    if not lengths:
        return 0.0
    closest = min(lengths, key=lambda length: (abs(length - len(candidate)), length))
    brevity = 1.0 if len(candidate) > closest else math.exp(1 - closest / max(len(candidate), 1))
    return brevity * math.exp(log_precision)


def self_bleu(texts: Sequence[str], code: bool = False) -> Optional[float]:
    """Mean over a group's rollouts of BLEU-4 against the group's other rollouts; None below two rollouts."""
    if len(texts) < 2:
        return None
    rollouts = [(tokens, _ngram_counts(tokens)) for tokens in (bleu_tokens(text, code) for text in texts)]
    return sum(_bleu4(tokens, counts, rollouts[:i] + rollouts[i + 1:])
               for i, (tokens, counts) in enumerate(rollouts)) / len(rollouts)


def mean_self_bleu(rollouts, code_groups: Sequence[bool]) -> Optional[float]:
    """Self-BLEU of each group of ``rollouts`` (groups whose ``code_groups`` entry is true read as code), averaged
    over the groups of two or more rollouts."""
    values = [self_bleu([rollouts.response_text[r] for r in members], code_groups[g])
              for g, members in enumerate(rollouts.groups)]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
