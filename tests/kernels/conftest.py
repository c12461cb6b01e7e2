"""Kernel tests run the Triton kernels on CPU tensors through the interpreter when there is no GPU.

Triton picks interpreter or compiler when it is first imported, so TRITON_INTERPRET=1 goes into the
environment here, before anything below imports triton. On a CUDA machine the kernels are compiled instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mopd_kernels import HAS_TRITON  # noqa: E402
from mopd_kernels._common import interpreter_on  # noqa: E402

TRITON_OK = HAS_TRITON and (torch.cuda.is_available() or interpreter_on())
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_OK, reason="triton missing, or imported before TRITON_INTERPRET=1 on a CPU-only machine "
                          "(run `TRITON_INTERPRET=1 pytest tests/kernels`)"))]


def device_for(backend: str) -> str:
    """Triton runs on CUDA when there is one, else on CPU tensors under the interpreter."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded; one intra-op thread: these shapes are tiny, and OpenMP barriers on a busy 2-core machine
    cost ~10 ms per op."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    # numpy warns on log(0) inside the Triton interpreter; log 0 = -inf is intended there.
    config.addinivalue_line("filterwarnings", "ignore:divide by zero encountered in log:RuntimeWarning")
    config.addinivalue_line("filterwarnings", "ignore:TRITON_DEFAULT_FP_FUSION is unset")
