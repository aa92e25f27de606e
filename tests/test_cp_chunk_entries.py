"""The kernel twin of the CP chunk step equals the reference, on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before Triton compiles anything, so the check (tests/chunk_twins.py,
tolerances in its docstring) runs in a fresh interpreter. tests/test_cp_kernels_gpu.py runs the
same check compiled on a GPU.
"""

import importlib.util
from pathlib import Path

import pytest
from triton_interpreter import run_under_triton_interpreter

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)"
)


def test_chunk_kernels_equal_reference_under_triton_interpreter():
    run_under_triton_interpreter(
        Path(__file__).with_name("chunk_twins.py"), "chunk twins agree", timeout=600
    )
