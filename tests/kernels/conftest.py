"""Kernel tests: on a CUDA machine the Triton kernels are compiled; without one they run on CPU tensors through
Triton's interpreter, which ``tests/conftest.py`` switches on before anything imports triton."""

import pytest
import torch


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
