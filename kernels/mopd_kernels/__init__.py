"""Fused distillation kernels: the generalized Jensen-Shannon divergence over large vocabularies.

    from mopd_kernels import generalized_jsd, fused_linear_generalized_jsd

Depends on torch only; Triton kernels are used on CUDA when Triton is importable. ``mopd_kernels.reference``
holds the plain eager formula used as the baseline by tests and benchmarks.
"""

from . import reference
from ._common import HAS_TRITON
from .functional import fused_linear_generalized_jsd, generalized_jsd

__all__ = ["generalized_jsd", "fused_linear_generalized_jsd", "reference", "HAS_TRITON"]
