"""Science multiple choice (domain ``sci``): an embedded generated dataset and the SciKnowEval row format.

The embedded questions are computed, not copied: molar masses from formulas, unit conversions and short
physics calculations, each with three distractors built from typical mistakes. The correct letter cycles
through A-D so that answer letters are balanced.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .example import DataError, Example, UnusedRow

LETTERS = "ABCDEFGHIJ"
MCQ_INSTRUCTION = (
    "Answer with the letter of the correct option. Think briefly, then write the final answer as "
    "<answer>X</answer>, where X is the letter."
)
YES_NO_INSTRUCTION = "Answer Yes or No. Think briefly, then write the final answer as <answer>Yes</answer> or <answer>No</answer>."

ATOMIC_MASS = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "Na": 22.990, "Mg": 24.305, "Al": 26.982,
               "S": 32.06, "Cl": 35.45, "K": 39.098, "Ca": 40.078, "Fe": 55.845, "Cu": 63.546, "P": 30.974}
COMPOUNDS = ["H2O", "CO2", "NaCl", "CH4", "NH3", "H2SO4", "CaCO3", "C6H12O6", "KCl", "MgO", "Fe2O3", "HCl",
             "NaOH", "C2H5OH", "CuSO4", "Al2O3", "HNO3", "KNO3", "C3H8", "CaCl2", "MgCl2", "Na2CO3", "H3PO4",
             "SO2", "NO2", "N2O", "CH3COOH", "C12H22O11", "FeCl3", "K2SO4", "NaHCO3", "Ca(OH)2", "Mg(OH)2"]


def _parse_formula(formula: str) -> Dict[str, int]:
    """Atom counts of a formula with at most one level of parentheses, e.g. ``Ca(OH)2``."""
    counts: Dict[str, int] = {}

    def add(part: str, factor: int) -> None:
        i = 0
        while i < len(part):
            j = i + 1
            while j < len(part) and part[j].islower():
                j += 1
            k = j
            while k < len(part) and part[k].isdigit():
                k += 1
            counts[part[i:j]] = counts.get(part[i:j], 0) + factor * int(part[j:k] or 1)
            i = k

    while "(" in formula:
        start, end = formula.index("("), formula.index(")")
        k = end + 1
        while k < len(formula) and formula[k].isdigit():
            k += 1
        add(formula[start + 1:end], int(formula[end + 1:k] or 1))
        formula = formula[:start] + formula[k:]
    add(formula, 1)
    return counts


def molar_mass(formula: str) -> float:
    return sum(ATOMIC_MASS[element] * n for element, n in _parse_formula(formula).items())


def _sig(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1e6 else f"{x:.{digits - 1}e}"


def _molar_mass_question(rng: random.Random) -> Tuple[str, str, List[str]]:
    if rng.random() < 0.5:
        formula = rng.choice(COMPOUNDS)
    else:
        n = rng.randint(1, 16)
        formula = rng.choice([f"C{n}H{2 * n + 2}", f"C{n}H{2 * n + 1}OH", f"C{n}H{2 * n}O2"]).replace("C1H", "CH")
    mass = molar_mass(formula)
    wrong = [mass + ATOMIC_MASS["H"] * rng.choice([2, -2, 4]), mass * rng.choice([2, 0.5]),
             mass + rng.choice([ATOMIC_MASS["O"], -ATOMIC_MASS["O"] if mass > 20 else ATOMIC_MASS["C"]]),
             mass + ATOMIC_MASS["N"], mass - ATOMIC_MASS["H"]]
    fmt = lambda m: f"{m:.2f} g/mol"  # noqa: E731
    return f"What is the molar mass of {formula}?", fmt(mass), [fmt(m) for m in wrong]


_CONVERSIONS = [  # (quantity, from unit, to unit, factor, offset)
    ("length", "km", "m", 1000.0, 0.0), ("length", "cm", "m", 0.01, 0.0), ("length", "m", "mm", 1000.0, 0.0),
    ("volume", "L", "mL", 1000.0, 0.0), ("volume", "mL", "L", 0.001, 0.0), ("mass", "kg", "g", 1000.0, 0.0),
    ("mass", "mg", "g", 0.001, 0.0), ("speed", "km/h", "m/s", 1 / 3.6, 0.0), ("pressure", "atm", "kPa", 101.325, 0.0),
    ("temperature", "°C", "K", 1.0, 273.15), ("energy", "kJ", "J", 1000.0, 0.0), ("energy", "kcal", "kJ", 4.184, 0.0),
    ("time", "h", "s", 3600.0, 0.0), ("amount", "mmol", "mol", 0.001, 0.0),
]


def _conversion_question(rng: random.Random) -> Tuple[str, str, List[str]]:
    quantity, src, dst, factor, offset = rng.choice(_CONVERSIONS)
    value = round(rng.uniform(1, 100), rng.choice([0, 1, 2]))
    right = value * factor + offset
    if offset:
        wrong = [value - offset, value + offset + 10, value * 10 + offset, value + offset - 10]
    else:
        wrong = [value / factor, right * 10, right / 10, right * 100]
    fmt = lambda x: f"{_sig(x, 4)} {dst}"  # noqa: E731
    return f"Convert {value:g} {src} to {dst}.", fmt(right), [fmt(x) for x in wrong]


def _physics_question(rng: random.Random) -> Tuple[str, str, List[str]]:
    kind = rng.randrange(6)
    a, b = rng.randint(2, 40), rng.randint(2, 30)
    if kind == 0:
        q, right, unit, wrong = f"A {a} kg object moves at {b} m/s. What is its kinetic energy?", 0.5 * a * b * b, "J", [a * b * b, 0.5 * a * b, a * b]
    elif kind == 1:
        q, right, unit, wrong = f"A net force acts on a {a} kg mass and gives it an acceleration of {b} m/s². What is the force?", a * b, "N", [a / b, a + b, 0.5 * a * b]
    elif kind == 2:
        q, right, unit, wrong = f"A current of {a} A flows through a {b} Ω resistor. What is the voltage across it?", a * b, "V", [a / b, b / a, a * b * b]
    elif kind == 3:
        q, right, unit, wrong = f"An object of mass {a} kg is lifted {b} m (g = 9.8 m/s²). What is its gain in potential energy?", a * 9.8 * b, "J", [a * b, a * 9.8 / b, 0.5 * a * 9.8 * b]
    elif kind == 4:
        q, right, unit, wrong = f"A wave has frequency {a} Hz and wavelength {b} m. What is its speed?", a * b, "m/s", [a / b, b / a, a + b]
    else:
        q, right, unit, wrong = f"A sample of {a} g occupies {b} cm³. What is its density?", a / b, "g/cm³", [a * b, b / a, a / b * 10]
    fmt = lambda x: f"{_sig(x, 4)} {unit}"  # noqa: E731
    return q, fmt(right), [fmt(x) for x in wrong]


GENERATORS: List[Callable[[random.Random], Tuple[str, str, List[str]]]] = [
    _molar_mass_question, _conversion_question, _physics_question,
]


def format_mcq(question: str, options: List[str], labels: Optional[List[str]] = None) -> str:
    labels = labels or list(LETTERS[: len(options)])
    lines = [question, ""] + [f"{label}. {text}" for label, text in zip(labels, options)]
    return "\n".join(lines + ["", MCQ_INSTRUCTION])


def generate_sci(n: int, seed: int, system_prompt: Optional[str] = None, prefix: str = "sci") -> List[Example]:
    """``n`` distinct generated questions with 4 options; correct letters cycle A, B, C, D."""
    rng = random.Random(seed)
    seen, examples = set(), []
    while len(examples) < n:
        question, right, wrong = rng.choice(GENERATORS)(rng)
        distractors = list(dict.fromkeys(w for w in wrong if w != right))
        if question in seen or len(distractors) < 3:
            continue
        seen.add(question)
        options = rng.sample(distractors, 3)
        answer_index = len(examples) % 4
        options.insert(answer_index, right)
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": format_mcq(question, options)}
        ]
        examples.append(Example(f"{prefix}-{seed}-{len(examples)}", messages, LETTERS[answer_index], "sci"))
    return examples


SCIKNOWEVAL_CHOICE_TYPES = ("mcq-4-choices", "mcq-2-choices", "true_or_false")
"""The SciKnowEval row types the ``sci`` verifier can score (an option letter, or Yes/No). Every other type
(``open-ended-qa``, ``relation_extraction``, ``filling``, ...) needs a judge model or text matching, so its rows are
counted as unused rather than trained on."""


def _yes_no_prompt(row: Mapping[str, Any], question: str) -> Tuple[str, str]:
    """Prompt and answer of a ``true_or_false`` row; True/False answers are read as Yes/No."""
    answer = str(row.get("answer") or "").strip().capitalize()
    if answer not in ("Yes", "No", "True", "False"):
        raise DataError(f"field 'answer' must be Yes/No (or True/False) for true_or_false, got {answer!r}")
    return f"{question}\n\n{YES_NO_INSTRUCTION}", {"True": "Yes", "False": "No"}.get(answer, answer)


def _choice_prompt(row: Mapping[str, Any], question: str) -> Tuple[str, str]:
    """Prompt and answer letter of an MCQ row. Options must pair one text with one label: with a text too many
    or too few the letters shown would not match the answer key, so such a row is invalid, not repaired."""
    choices = row.get("choices")
    if not isinstance(choices, Mapping):
        raise DataError("field 'choices' must be an object with 'text' and 'label' lists")
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or not labels:
        raise DataError("field 'choices' must hold non-empty 'text' and 'label' lists")
    if len(texts) != len(labels):
        raise DataError(f"field 'choices' has {len(texts)} option texts for {len(labels)} labels {labels}")
    labels = [str(label).strip() for label in labels]
    answer = str(row.get("answerKey") or "").strip()
    if answer not in labels:
        raise DataError(f"field 'answerKey' is {answer!r}, not one of the labels {labels}")
    return format_mcq(question, [str(text) for text in texts], labels), answer


def sciknoweval_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """One SciKnowEval row as an Example. Raises :class:`UnusedRow` for a type the verifier cannot score (the
    caller counts it by type) and :class:`DataError` for a malformed row of a type it can."""
    kind = row.get("type")
    if not isinstance(kind, str) or not kind.strip():
        raise DataError(f"field 'type' is missing or empty; SciKnowEval rows name their type, e.g. "
                        f"{SCIKNOWEVAL_CHOICE_TYPES}")
    if kind not in SCIKNOWEVAL_CHOICE_TYPES:
        raise UnusedRow(kind)
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{kind} row: field 'question' is missing or empty")
    try:
        content, answer = (_yes_no_prompt if kind == "true_or_false" else _choice_prompt)(row, question)
    except DataError as error:
        raise DataError(f"{kind} row: {error}") from None
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": content}
    ]
    details = row.get("details")
    meta = {"type": kind, "task": details.get("task") if isinstance(details, Mapping) else None}
    return Example(row_id, messages, answer, "sci", meta)
