"""The one table that maps a domain's verifier name (``Example.verifier``) to the verifier that scores it.

Each entry builds the verifier from the run's settings: ``strict`` (only the answer format the prompt asks for
counts: ``model.verifier.strict``) and ``sandbox`` (the least isolation code may run under:
``model.verifier.sandbox``). Verifiers that do not depend on a setting ignore it. To add a domain, add an entry
(``VERIFIERS["mine"] = lambda strict, sandbox: my_verifier``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from . import code, math, named, sci, tool
from .base import Verifier
from .code import CodeVerifier
from .math import verify_math, verify_math_lenient
from .named import verify_named, verify_named_lenient
from .sci import verify_sci, verify_sci_lenient
from .tool import ToolVerifier

VERIFIERS: Dict[str, Callable[[bool, str], Verifier]] = {
    "sci": lambda strict, sandbox: verify_sci if strict else verify_sci_lenient,
    "math": lambda strict, sandbox: verify_math if strict else verify_math_lenient,
    "code": lambda strict, sandbox: CodeVerifier(sandbox=sandbox),
    "tool": lambda strict, sandbox: ToolVerifier(),
    "named": lambda strict, sandbox: verify_named if strict else verify_named_lenient,
}


AnswerSpan = Callable[[str, bool, Any], Optional[Tuple[int, int]]]


def _without_truth(find: Callable[[str, bool], Optional[Tuple[int, int]]]) -> AnswerSpan:
    """A reader whose answer's place does not depend on the ground truth."""
    return lambda response, strict, ground_truth: find(response, strict)


ANSWER_SPANS: Dict[str, AnswerSpan] = {
    "sci": _without_truth(sci.answer_span), "math": _without_truth(math.answer_span),
    "code": _without_truth(code.answer_span), "tool": _without_truth(tool.answer_span), "named": named.answer_span,
}
"""Where each verifier reads the answer in a response (character offsets, given ``strict`` and the ground truth:
a name is found among the options), for the analysis's answer-span score and ``model.loss.tokens: answer``; a
domain without an entry has its whole response scored as the rest in the analysis, and is refused by the
answer-span loss."""


def get_verifier(name: str, strict: bool = True, sandbox: str = "auto") -> Verifier:
    """The verifier for domain ``name`` (``"sci"``, ``"math"``, ``"code"``, ``"tool"``)."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(VERIFIERS)}")
    return VERIFIERS[name](strict, sandbox)
