"""Fenced code blocks in a model response (code and tool verifiers).

Line-based, as in CommonMark: a line starting with three backticks (after indentation) opens a block, and the
next such line closes it. One pass over the lines, so adversarial text (thousands of backticks) stays linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class FencedBlock:
    language: str  # lower-cased info word after the opening fence, "" when none
    code: str
    closed: bool  # False when the response ended inside the block (a cut-off generation)
    start: int = 0  # where ``code`` starts in the text (its characters are ``text[start:start + len(code)]``)


def fenced_blocks(text: str) -> List[FencedBlock]:
    blocks: List[FencedBlock] = []
    language, lines, start, offset = None, [], 0, 0
    for line in text.split("\n"):
        fence = line.strip().startswith("```")
        if language is None:
            if fence:
                info = line.strip()[3:].strip().split()
                language, lines, start = (info[0].lower() if info else ""), [], offset + len(line) + 1
        elif fence:
            blocks.append(FencedBlock(language, "".join(l + "\n" for l in lines), True, start))
            language = None
        else:
            lines.append(line)
        offset += len(line) + 1
    if language is not None:
        blocks.append(FencedBlock(language, "\n".join(lines), False, min(start, len(text))))
    return blocks
