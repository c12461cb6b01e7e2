"""Math with exact answers: an embedded generated dataset and the MATH / DeepMath / GSM8K row formats.

The embedded problems are computed, not copied: integer arithmetic, fractions, percentages, divisibility,
linear equations, 2x2 linear systems and short word problems. Every answer is an integer or a fraction in
lowest terms (``-7/3``), written as the ground truth the math verifier compares the model's ``\\boxed{}``
answer with.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Any, Callable, List, Mapping, Optional, Tuple

from ..rewards.math import last_boxed
from .chat import user_turn
from .example import DataError, Example

MATH_INSTRUCTION = "Reason briefly, then write the final answer as \\boxed{answer}."


def answer_text(value: Fraction) -> str:
    """``5``, ``-7/3``: how a ground truth is written."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _nonzero(rng: random.Random, low: int, high: int) -> int:
    return rng.choice([n for n in range(low, high + 1) if n != 0])


def _signed(n: int, first: bool = False) -> str:
    """A term of a sum as text: ``+ 5``, ``- 5`` (``-5`` when it comes first)."""
    if first:
        return str(n)
    return f"+ {n}" if n >= 0 else f"- {-n}"


def _linear(a: int, variable: str = "x", first: bool = True) -> str:
    """``a`` times ``variable`` as text: ``3x``, ``-x``, ``+ 2y``, ``- y``."""
    magnitude = "" if abs(a) == 1 else str(abs(a))
    if first:
        return f"{'-' if a < 0 else ''}{magnitude}{variable}"
    return f"{'-' if a < 0 else '+'} {magnitude}{variable}"


def _arithmetic(rng: random.Random) -> Tuple[str, Fraction]:
    a, b, c, d = (rng.randint(2, 30) for _ in range(4))
    expression, value = rng.choice([
        (f"{a} + {b} * {c}", a + b * c), (f"({a} + {b}) * {c}", (a + b) * c),
        (f"{a} * {b} - {c} * {d}", a * b - c * d), (f"{a * b} / {b} + {c}", a + c),
        (f"({a} - {b}) * ({c} + {d})", (a - b) * (c + d)), (f"{a}^2 - {b} * {c}", a * a - b * c),
        (f"{a * c} / {c} - {b} + {d}", a - b + d), (f"{a} * ({b} - {c}) + {d}", a * (b - c) + d),
    ])
    return f"Compute {expression}.", Fraction(value)


def _proper_fraction(rng: random.Random) -> Fraction:
    while True:
        value = Fraction(rng.randint(1, 11), rng.randint(2, 12))
        if value.denominator > 1:
            return value


def _fractions(rng: random.Random) -> Tuple[str, Fraction]:
    x, y = _proper_fraction(rng), _proper_fraction(rng)
    op = rng.choice("+-*/")
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op]
    shown = {"+": "+", "-": "-", "*": "*", "/": "divided by"}[op]
    return f"Compute {x} {shown} {y}. Give the answer in lowest terms.", value


def _percent(rng: random.Random) -> Tuple[str, Fraction]:
    p, n = rng.choice([5, 10, 15, 20, 25, 30, 40, 45, 50, 60, 75, 80, 120, 150]), rng.randint(2, 60) * 20
    part = Fraction(p * n, 100)  # n is a multiple of 20 and p of 5: a whole number
    if rng.random() < 0.5:
        return f"What is {p}% of {n}?", part
    return f"{answer_text(part)} is {p}% of what number?", Fraction(n)


def _divisibility(rng: random.Random) -> Tuple[str, Fraction]:
    kind = rng.randrange(3)
    a, b = rng.randint(2, 30) * rng.randint(1, 12), rng.randint(2, 30) * rng.randint(1, 12)
    if kind == 0:
        return f"What is the greatest common divisor of {a} and {b}?", Fraction(math.gcd(a, b))
    if kind == 1:
        return f"What is the least common multiple of {a} and {b}?", Fraction(a * b // math.gcd(a, b))
    n, m = rng.randint(100, 9999), rng.randint(3, 13)
    return f"What is the remainder when {n} is divided by {m}?", Fraction(n % m)


def _equation(rng: random.Random) -> Tuple[str, Fraction]:
    """One linear equation in x with whole coefficients; the solution is an integer or, sometimes, a fraction."""
    q = 1 if rng.random() < 0.75 else rng.randint(2, 7)
    x = Fraction(rng.randint(-15 * q, 15 * q), q)
    a, b = q * _nonzero(rng, -12 // q - 1, 12 // q + 1), _nonzero(rng, -30, 30)  # a * x is whole
    form = rng.randrange(3)
    if form == 0:
        return f"Solve for x: {_linear(a)} {_signed(b)} = {a * x + b}.", x
    if form == 1 and q == 1:
        return f"Solve for x: {a}(x {_signed(b)}) = {a * (x + b)}.", x
    c = a - q * _nonzero(rng, -3, 3)  # (a - c) * x is whole too
    d = (a - c) * x + b
    right = f"{_linear(c)} {_signed(int(d))}" if c else str(d)
    return f"Solve for x: {_linear(a)} {_signed(b)} = {right}.", x


def _system(rng: random.Random) -> Tuple[str, Fraction]:
    """A 2x2 linear system with an integer solution; asks for x, y or x + y."""
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    while True:
        a, b, c, d = (_nonzero(rng, -6, 6) for _ in range(4))
        if a * d - b * c != 0:
            break
    first = f"{_linear(a)} {_linear(b, 'y', first=False)} = {a * x + b * y}"
    second = f"{_linear(c)} {_linear(d, 'y', first=False)} = {c * x + d * y}"
    asked, value = rng.choice([("x", x), ("y", y), ("x + y", x + y)])
    return f"Solve the system {first} and {second}. What is the value of {asked}?", Fraction(value)


def _word_problem(rng: random.Random) -> Tuple[str, Fraction]:
    kind = rng.randrange(4)
    a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(2, 12)
    if kind == 0:
        d = rng.randint(1, a + b * c - 1)
        return (f"Maya has {a} marbles. She buys {b} bags with {c} marbles each, then gives away {d} marbles. "
                f"How many marbles does she have now?", Fraction(a + b * c - d))
    if kind == 1:
        speed, hours = rng.randint(30, 90), rng.randint(2, 9)
        question = f"A train travels at {speed} km/h for {hours} hours. How many kilometres does it travel?"
        return question, Fraction(speed * hours)
    if kind == 2:
        price, count = rng.randint(2, 25), rng.randint(2, 9)
        paid = (price * count // 50 + 1) * 50
        return (f"Pens cost {price} dollars each. Sam buys {count} pens and pays with {paid} dollars. "
                f"How much change does he get?", Fraction(paid - price * count))
    width, length = rng.randint(2, 30), rng.randint(2, 30)
    question = f"A rectangle is {width} m wide and {length} m long. What is its perimeter in metres?"
    return question, Fraction(2 * (width + length))


GENERATORS: List[Callable[[random.Random], Tuple[str, Fraction]]] = [
    _arithmetic, _fractions, _percent, _divisibility, _equation, _system, _word_problem,
]


def generate_math(n: int, seed: int, system_prompt: Optional[str] = None, prefix: str = "math") -> List[Example]:
    """``n`` distinct generated problems; the generators take turns, so every kind is represented."""
    rng = random.Random(seed)
    seen, examples = set(), []
    while len(examples) < n:
        generator = GENERATORS[len(examples) % len(GENERATORS)]
        question, value = generator(rng)
        if question in seen:
            continue
        seen.add(question)
        content = f"{question}\n\n{MATH_INSTRUCTION}"
        examples.append(Example(f"{prefix}-{seed}-{len(examples)}", user_turn(content, system_prompt),
                                answer_text(value), "math", {"kind": generator.__name__.lstrip("_")}))
    return examples


# --------------------------------------------------------------------------------------------- user rows


def _text(value: Any) -> Optional[str]:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    return value.strip() if isinstance(value, str) and value.strip() else None


def math_answer(row: Mapping[str, Any]) -> str:
    """The ground truth of a MATH / DeepMath / GSM8K row: ``final_answer``, else ``answer`` (GSM8K's text after
    ``####``), else the last ``\\boxed{}`` of ``solution``."""
    for field in ("final_answer", "answer"):
        answer = _text(row.get(field))
        if answer is not None:
            if "####" in answer:  # GSM8K: reasoning, then "#### 72"
                answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
            boxed = last_boxed(answer) if "\\boxed" in answer else None
            return boxed.strip() if boxed else answer
    solution = _text(row.get("solution"))
    if solution is not None:
        boxed = last_boxed(solution)
        if boxed and boxed.strip():
            return boxed.strip()
        raise DataError("field 'solution' holds no \\boxed{} answer, and there is no 'final_answer' or 'answer'")
    raise DataError("no answer: fields 'final_answer', 'answer' and 'solution' are all missing or empty")


def math_example(row: Mapping[str, Any], row_id: str, system_prompt: Optional[str] = None) -> Example:
    """One MATH (``problem``, ``solution``), DeepMath (``question``, ``final_answer``) or GSM8K
    (``question``, ``answer``) row as an Example."""
    question = _text(row.get("question")) or _text(row.get("problem"))
    if question is None:
        raise DataError("field 'question' (or 'problem') is missing or empty")
    answer = math_answer(row)
    meta = {k: row[k] for k in ("level", "type", "difficulty", "topic", "subject") if row.get(k) is not None}
    return Example(row_id, user_turn(f"{question}\n\n{MATH_INSTRUCTION}", system_prompt), answer, "math", meta)
