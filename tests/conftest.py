import os
import sys
from pathlib import Path

import torch

# Triton kernels run on CPU tensors only under its interpreter, which must be chosen before triton is imported (torch
# does not import it). Asked of torch, not of /dev: a GPU that torch cannot use must not leave the interpreter off, and
# a usable one must never get it (on CUDA it would replace the compiled kernels; triton 3.6's breaks on numpy >= 2.4).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny import build_tiny_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def other_vocab_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama-other"), vocab_size=300))


@pytest.fixture(scope="session")
def sciknoweval_dir() -> Path:
    path = SHARED_DATA / "sciknoweval"
    if not path.exists():
        pytest.skip(f"test data not found at {path}")
    return path
