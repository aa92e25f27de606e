"""The kernel twin of the CP chunk step equals the reference, on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before Triton compiles anything, so the check (tests/chunk_twins.py,
tolerances in its docstring) runs in a fresh interpreter. tests/test_cp_kernels_gpu.py runs the
same check compiled on a GPU.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")


def test_chunk_kernels_equal_reference_under_triton_interpreter():
    script = Path(__file__).with_name("chunk_twins.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "chunk twins agree" in done.stdout

