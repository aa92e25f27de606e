"""Triton kernels for Lighthouse attention on CUDA (pyramid scores, selection, gather, scatter).

Importing this package never imports Triton: the kernel modules are loaded on the first CUDA
call, so CPU machines (and CI) only ever run the pure-PyTorch reference. Every kernel has a
pure-PyTorch twin (rows_reference.py for the row kernels, lh_cp.ops.select / lh_cp.ops.pyramid for the
scores and the selection) and GPU tests comparing them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_disabled = 0


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(*tensors: torch.Tensor) -> bool:
    """True if the kernels will run on these tensors: all on CUDA, a kernel dtype, Triton present.

    float64 stays on the reference, whose sums are float64 (the kernels accumulate in float32).
    """
    if _disabled or not tensors:
        return False
    if not all(t.is_cuda and t.dtype in _KERNEL_DTYPES for t in tensors):
        return False
    return _triton_installed()


@contextlib.contextmanager
def disabled():
    """Run the pure-PyTorch reference even on CUDA inside this block (tests, benchmarks)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1
