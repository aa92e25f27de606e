"""A full training step under FSDP2 with dp_shard=2 x cp=2 (4 gloo ranks) equals one process.

HSDP (dp_replicate=2 x cp=2) is checked in the same job.

The model is a tiny decoder defined here (one Lighthouse layer, one dense layer, RoPE at
explicit global positions), so this test does not depend on lh_cp.model.transformer. Activation
checkpointing is on (it recomputes the CP exchange in backward). Float32 throughout;
tolerance 1e-5 on the loss and on every updated weight (an SGD step of size 0.5 moves
weights by lr * grad, and the gradients differ from one process only by summation order).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.parallel import build_mesh, global_token_mean_loss, parallelize, shard_sequence

VOCAB, DIM, HEADS, KV_HEADS, SEQ, BATCH, LR = 32, 16, 4, 2, 64, 2, 0.5
LIGHTHOUSE = LighthouseConfig(
    pool=2, levels=3, topk=16, tile_budget=2
)  # tile 8: chunks of 16 hold 2


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, N, H, D] at integer positions [N] (rotate-half form)."""
    half = x.shape[-1] // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]  # [N, D/2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, lighthouse: LighthouseConfig | None):
        super().__init__()
        head_dim = DIM // HEADS
        self.lighthouse = lighthouse
        self.attn_norm, self.mlp_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.wq = nn.Linear(DIM, HEADS * head_dim, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * head_dim, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * head_dim, bias=False)
        self.wo = nn.Linear(HEADS * head_dim, DIM, bias=False)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x, positions, cp=None, exchange="allgather"):
        batch, n, _ = x.shape
        h = self.attn_norm(x)
        q = rope(self.wq(h).view(batch, n, HEADS, -1), positions)
        k = rope(self.wk(h).view(batch, n, KV_HEADS, -1), positions)
        v = self.wv(h).view(batch, n, KV_HEADS, -1)
        if self.lighthouse is not None:
            a = lighthouse_attention(q, k, v, self.lighthouse, cp=cp, exchange=exchange)
        else:
            a = causal_attention(q, k, v, cp=cp, exchange=exchange)
        x = x + self.wo(a.flatten(2))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(LIGHTHOUSE), Block(None)])
        self.norm = nn.RMSNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens, positions, cp=None, exchange="allgather"):
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, positions, cp=cp, exchange=exchange)
        return self.head(self.norm(x))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and next-token labels [B, N]; row 1 ends with 10 padding tokens (label -100)."""
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    labels[1, SEQ - 10 :] = -100
    return tokens, labels


def reference_step() -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyModel()
    tokens, labels = batch()
    logits = model(tokens, torch.arange(SEQ))
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return loss.item(), {name: p.detach().clone() for name, p in model.named_parameters()}


def fsdp_cp_job(rank: int, world: int) -> dict:
    fsdp = build_mesh("cpu", dp_replicate=1, dp_shard=2, cp=2)
    hsdp = build_mesh("cpu", dp_replicate=2, dp_shard=1, cp=2)
    return {
        "dp_shard=2 x cp=2, ring": fsdp_cp_step(fsdp, "ring"),
        "dp_shard=2 x cp=2, allgather": fsdp_cp_step(fsdp, "allgather"),
        "dp_replicate=2 x cp=2, ring": fsdp_cp_step(hsdp, "ring"),
    }


def fsdp_cp_step(mesh, exchange: str) -> dict:
    cp_group = mesh["cp"].get_group()
    torch.manual_seed(0)
    model = parallelize(
        TinyModel(), mesh, SimpleNamespace(activation_checkpoint=True, compile=False)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tokens, labels = batch()
    row = mesh["dp"].get_local_rank()  # dp_shard rank picks its batch row, CP ranks share it
    tokens_loc = shard_sequence(tokens[row : row + 1], cp_group)
    labels_loc = shard_sequence(labels[row : row + 1], cp_group)
    positions_loc = shard_sequence(torch.arange(SEQ), cp_group, dim=0)
    logits = model(tokens_loc, positions_loc, cp=cp_group, exchange=exchange)
    loss = global_token_mean_loss(logits, labels_loc, mesh["dp_cp"].get_group())
    loss.backward()
    optimizer.step()
    logged = loss.detach().clone()
    dist.all_reduce(logged, group=mesh["dp_cp"].get_group())
    weights = {
        name.replace("_checkpoint_wrapped_module.", ""): p.full_tensor().detach().clone()
        for name, p in model.named_parameters()
    }
    return {"loss": logged.item() / mesh["dp_cp"].size(), "weights": weights}


@pytest.mark.timeout(240)
def test_fsdp_cp_training_step_matches_single_process():
    """Loss and SGD-updated weights of dp_shard=2 x cp=2 (ring, then all-gather exchange, both
    layers) and of HSDP dp_replicate=2 x cp=2 equal one process (float32, <= 1e-5); padded
    tokens are excluded from the global token mean (a per-rank mean instead moves the weights
    by ~6e-3: the test sees it)."""
    results = run_distributed(fsdp_cp_job, 4, timeout=200)
    ref_loss, ref_weights = reference_step()
    for rank, per_setup in enumerate(results):
        for setup, res in per_setup.items():
            where = f"rank {rank}, {setup}"
            assert abs(res["loss"] - ref_loss) <= 1e-5, f"{where}: loss {res['loss']} != {ref_loss}"
            assert res["weights"].keys() == ref_weights.keys()
            for name, ref in ref_weights.items():
                err = (res["weights"][name] - ref).abs().max().item()
                assert err <= 1e-5, f"{where}: weight {name} differs by {err:.3e}"
