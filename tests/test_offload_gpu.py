"""Activation offload on CUDA (skipped without a GPU): the stream path of lh_cp/parallel/offload.py.

- Round trip: a block input packed to pinned host pieces and unpacked equals the original,
  even when its GPU memory is freed and overwritten by the compute stream right after the
  pack (record_stream keeps the allocator from reusing it before the copy has read it).
- A training step of an 8-block all-dense bf16 model at 64K tokens: the block inputs are on
  the host (GPU memory after the forward is lower by exactly the 8 inputs; the backward peak
  by at least 5 of them, since at most two are on the GPU at a time), the pinned bytes are
  the plan's, and the loss and gradients equal those without offload. Tolerance: the same
  kernels run on the same values, but flash attention's backward accumulates dq with atomics
  (summation order varies from run to run), so gradients are compared by relative L2 error
  <= 1e-2 and the loss to 1e-3 relative; an input from the wrong block, or one read before
  its copy arrived, gives errors of order 1.
- Overlap: in a profiled step the copies run on a stream other than the compute kernels',
  overlap kernels in time, and the offload adds no host synchronisation.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from lh_cp.model.transformer import ModelConfig, Transformer  # noqa: E402
from lh_cp.parallel.fsdp import checkpoint_and_compile  # noqa: E402
from lh_cp.parallel.offload import BlockInputOffload, pinned_bytes  # noqa: E402
from lh_cp.train.recipe import ParallelConfig  # noqa: E402

LAYERS, TOKENS, DIM = 8, 65536, 1024
INPUT_BYTES = TOKENS * DIM * 2  # one block input, bf16
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def test_round_trip_survives_the_input_being_freed_and_overwritten():
    offload = BlockInputOffload()
    x = torch.randn(3, 40000, 1024, device="cuda", dtype=torch.bfloat16)  # ~234 MiB, odd size
    expected = x.clone()
    packed = offload._pack(x)
    assert all(piece.is_pinned() for piece in packed.pieces)
    del x
    # The compute stream writes a tensor of the same size at once: without record_stream it
    # could be given x's memory while the copy to the host is still reading it.
    torch.full_like(expected, 7.0)
    back = offload._unpack(packed)
    assert back.device.type == "cuda" and back.shape == expected.shape
    assert torch.equal(back, expected)
    assert offload.stats.fetched_on_demand == 1
    assert offload.stats.peak_host_bytes == pinned_bytes(expected.numel() * 2)


def dense_model() -> tuple[Transformer, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=258, dim=DIM, n_layers=LAYERS, n_heads=8, n_kv_heads=8, ffn_dim=1536
    )
    model = Transformer(cfg, dense_layers=()).to("cuda", torch.bfloat16)
    generator = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, 256, (1, TOKENS + 1), device="cuda", generator=generator)
    return model, tokens


def checkpointed(model: Transformer, offload: bool) -> Transformer:
    net = copy.deepcopy(model)
    checkpoint_and_compile(
        net, ParallelConfig(activation_checkpoint=True, offload_activations=offload)
    )
    return net


def train_step(net: Transformer, tokens: torch.Tensor) -> dict:
    """One forward and backward: loss, gradients, memory allocated after the forward, peak."""
    net.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    total, count = net(tokens[:, :-1], torch.arange(TOKENS, device="cuda"), tokens[:, 1:])
    loss = total / count
    torch.cuda.synchronize()
    after_forward = torch.cuda.memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    return {
        "loss": loss.item(),
        "grads": {name: p.grad.float() for name, p in net.named_parameters()},
        "after_forward": after_forward,
        "peak": torch.cuda.max_memory_allocated(),
    }


def test_block_inputs_live_on_the_host_and_change_no_number():
    model, tokens = dense_model()
    off_net, on_net = checkpointed(model, False), checkpointed(model, True)
    for net in (off_net, on_net):  # warm-up: kernels, the pinned pool
        train_step(net, tokens)
    off, on = train_step(off_net, tokens), train_step(on_net, tokens)

    # Every tensor alive after the forward is the same in both runs but the 8 inputs (the
    # slack is for the caching allocator's block rounding, 512 bytes per block).
    moved = off["after_forward"] - on["after_forward"]
    assert abs(moved - LAYERS * INPUT_BYTES) <= 2**20, moved
    saved = off["peak"] - on["peak"]
    assert saved >= (LAYERS - 3) * INPUT_BYTES, (
        f"offload lowered the peak by {saved / 2**20:.0f} MiB; at least "
        f"{(LAYERS - 3) * INPUT_BYTES / 2**20:.0f} MiB expected"
    )
    stats = on_net.block_input_offload.stats
    assert stats.peak_host_bytes == LAYERS * pinned_bytes(INPUT_BYTES)
    assert stats.fetched_ahead == 2 * (LAYERS - 1) and stats.fetched_on_demand == 2
    assert stats.host_bytes == 0

    assert on["loss"] == pytest.approx(off["loss"], rel=1e-3)
    for name, reference in off["grads"].items():
        error = (on["grads"][name] - reference).norm() / reference.norm().clamp(min=1e-30)
        assert error <= 1e-2, f"gradient of {name}: relative L2 error {error:.2e}"


def profiled_trace(net: Transformer, tokens: torch.Tensor, path) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    train_step(net, tokens)  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(net, tokens)
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())["traceEvents"]


def test_copies_run_on_their_own_stream_overlapped_and_without_host_syncs(tmp_path):
    model, tokens = dense_model()
    events_on = profiled_trace(checkpointed(model, True), tokens, tmp_path / "on.json")
    events_off = profiled_trace(checkpointed(model, False), tokens, tmp_path / "off.json")

    kernels = [e for e in events_on if e.get("cat") == "kernel"]
    copies = [
        e
        for e in events_on
        if e.get("cat") == "gpu_memcpy" and ("DtoH" in e["name"] or "HtoD" in e["name"])
    ]
    assert kernels and copies, "the profile shows no kernels or no host copies"
    kernel_streams = {e["args"]["stream"] for e in kernels}
    copy_streams = {e["args"]["stream"] for e in copies}
    offload_streams = copy_streams - kernel_streams
    assert offload_streams, f"copies on {copy_streams}, kernels on {kernel_streams}"
    offloaded = [e for e in copies if e["args"]["stream"] in offload_streams]
    assert sum("DtoH" in e["name"] for e in offloaded) >= LAYERS  # at least a piece each
    assert sum("HtoD" in e["name"] for e in offloaded) >= LAYERS

    def overlaps(c: dict) -> bool:
        return any(k["ts"] < c["ts"] + c["dur"] and c["ts"] < k["ts"] + k["dur"] for k in kernels)

    overlapped = sum(overlaps(c) for c in offloaded)
    assert overlapped > 0, f"none of {len(offloaded)} offload copies overlapped a kernel"

    def syncs(events: list[dict]) -> int:
        return sum(e.get("name") in SYNC_CALLS for e in events)

    assert syncs(events_on) == syncs(events_off), (syncs(events_on), syncs(events_off))
