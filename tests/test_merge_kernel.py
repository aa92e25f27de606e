"""The log-sum-exp merge of the CP exchanges (parallel/headtail/blocks.py).

- Its one-pass Triton kernel (lh_cp/ops/kernels/merge.py) equals the reference twin, on CPU through
  Triton's interpreter (tests/merge_twins.py, tolerances in its docstring; TRITON_INTERPRET
  must be set before Triton compiles anything, hence a fresh interpreter).
  tests/test_cp_kernels_gpu.py runs the same check compiled.
- Accumulated, fed the key blocks each exchange hands a rank (all-gather: one block of every
  chunk the rank does not hold; ring: one rank's two chunks per step), gives the rows of one
  causal attention over the whole sequence, for every rank of W = 1..4, with GQA: the choice
  of merge destinations (in place for a chunk's last merge, a float32 running sum before it)
  loses nothing. float64 within 1e-12, float32 within 1e-5 (summation order only, values O(1)).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from merge_twins import accumulated_rows, full_rows
from triton_interpreter import run_under_triton_interpreter


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)"
)
def test_merge_kernel_equals_reference_under_triton_interpreter():
    run_under_triton_interpreter(
        Path(__file__).with_name("merge_twins.py"), "merge twins agree", timeout=300
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("exchange", ["allgather", "ring"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_accumulated_schedules_equal_full_attention(world, exchange, dtype, tol):
    gen = torch.Generator().manual_seed(world)
    length = 5
    q = torch.randn(2, 4, 2 * world * length, 8, generator=gen, dtype=dtype)
    k, v = (torch.randn(2, 2, 2 * world * length, 8, generator=gen, dtype=dtype) for _ in range(2))
    for rank in range(world):
        out, lse = accumulated_rows(q, k, v, rank, world, exchange)
        want_out, want_lse = full_rows(q, k, v, rank, world)
        assert (out.double() - want_out).abs().max().item() <= tol, (rank, "out")
        assert (lse.double() - want_lse).abs().max().item() <= tol, (rank, "lse")


def test_a_block_beyond_the_listed_ones_is_refused():
    """Accumulated writes a chunk's final rows at its last listed block; an unlisted block
    arriving later would be merged into a finished chunk, so it is an error naming the ids."""
    from lh_cp.parallel.headtail.blocks import Accumulated, own_block_forward

    q = torch.randn(1, 2, 4, 8)
    acc = Accumulated(*own_block_forward(q, q, q), (1, 2), [])
    with pytest.raises(
        ValueError, match=r"key block \(0,\) reaches query chunk 1 after its last listed block"
    ):
        acc.add_remote(q, torch.stack([q[:, :, :2], q[:, :, :2]]), (0,), 2)
