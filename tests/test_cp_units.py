"""Single-process checks of the CP building blocks (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from lh_cp import LighthouseConfig, select
from lh_cp.parallel import (
    ContextParallel,
    check_mesh_shape,
    dense_cp_bytes,
    exchange_problems,
    head_tail_positions,
    lighthouse_cp_bytes,
)
from lh_cp.parallel.headtail.attention import chunk_config
from lh_cp.parallel.headtail.blocks import block_backward, block_forward, merge_into
from lh_cp.parallel.headtail.exchange import exchange_function
from lh_cp.parallel.headtail.sharding import chunk_owner, local_chunk_ids


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_head_tail_positions_cover_the_sequence_once(world):
    n = 2 * world * 5
    positions = [head_tail_positions(n, r, world) for r in range(world)]
    assert torch.equal(torch.cat(positions).sort().values, torch.arange(n))
    for rank, pos in enumerate(positions):
        first, second = local_chunk_ids(rank, world)
        assert pos[0] == first * 5 and pos[5] == second * 5
        assert chunk_owner(first, world) == (rank, 0) and chunk_owner(second, world) == (rank, 1)
    with pytest.raises(ValueError, match="multiple of 2"):
        head_tail_positions(2 * world * 5 + 1, 0, world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_chunk_selection_equals_single_device_selection(world):
    """Selecting inside each chunk with chunk_config, shifted to global positions, gives the
    single-device entries of those tokens, in the same order (tiles never straddle chunks)."""
    cfg = LighthouseConfig(pool=2, levels=3, topk=8 * world, tile_budget=2)
    n = 2 * world * 16
    gen = torch.Generator().manual_seed(world)
    q = torch.randn(2, n, 4, 8, generator=gen)
    k = torch.randn(2, n, 2, 8, generator=gen)
    full = select(q, k, cfg)
    local_cfg = chunk_config(cfg, n, world)
    per_chunk = local_cfg.selected_length(16)
    assert per_chunk * 2 * world == cfg.selected_length(n)
    for chunk in range(2 * world):
        span = slice(chunk * 16, (chunk + 1) * 16)
        sel = select(q[:, span], k[:, span], local_cfg).shifted(chunk * 16)
        part = slice(chunk * per_chunk, (chunk + 1) * per_chunk)
        for field in ("start", "end", "level", "internal"):
            assert torch.equal(getattr(sel, field), getattr(full, field)[..., part]), (chunk, field)


def test_chunk_config_rejects_chunks_that_split_tiles():
    cfg = LighthouseConfig(pool=2, levels=3, topk=4, tile_budget=2)  # N=64: tile 32
    with pytest.raises(
        ValueError,
        match=r"each head-tail chunk of 64 / 4 = 16 tokens must be a multiple of the tile size T=32",
    ):
        chunk_config(cfg, 64, 2)
    with pytest.raises(ValueError, match="N % T == 0 fails"):
        chunk_config(cfg, 61, 2)
    with pytest.raises(ValueError, match=r"topk=4 must be a multiple of 4 \* tile_budget = 8"):
        chunk_config(cfg, 128, 2)  # a longer sequence does not help: C / T = topk / (2W b)
    assert chunk_config(LighthouseConfig(pool=2, levels=3, topk=8, tile_budget=2), 128, 2).topk == 2


def test_for_pieces_is_the_rule_of_every_split():
    """One rule for CP chunks and Ulysses shards: the pieces hold whole tiles exactly when topk
    is a multiple of pieces * tile_budget; the piece config keeps the tile size."""
    cfg = LighthouseConfig(pool=4, levels=3, topk=64, tile_budget=8)  # 8 tiles in any valid N
    for pieces in (1, 2, 4, 8):
        piece = cfg.for_pieces(1024, pieces)
        assert piece.topk == 64 // pieces and piece.tile_size(1024 // pieces) == cfg.tile_size(1024)
        assert piece.selected_length(1024 // pieces) * pieces == cfg.selected_length(1024)
    for pieces in (3, 16):
        with pytest.raises(
            ValueError,
            match=f"topk=64 must be a multiple of {pieces} \\* tile_budget = {8 * pieces}",
        ):
            cfg.for_pieces(1024 * 3, pieces, "each shard")


def test_mesh_shape_and_exchange_errors_name_the_values():
    check_mesh_shape(8, dp_replicate=2, dp_shard=2, cp=2)
    with pytest.raises(ValueError, match=r"1 \* 2 \* 2 = 4 must equal the world size 8"):
        check_mesh_shape(8, dp_replicate=1, dp_shard=2, cp=2)
    with pytest.raises(ValueError, match="cp=0"):
        check_mesh_shape(8, dp_shard=8, cp=0)
    with pytest.raises(ValueError, match="exchange='alltoall'"):
        exchange_function("alltoall")
    assert (
        exchange_problems("allgather", "ring") == []
        and exchange_problems("ulysses_compressed", "ulysses") == []
    )
    assert exchange_problems("tree", "ring", "parallel.") == [
        "parallel.exchange must be one of ('allgather', 'ring', 'ulysses', 'ulysses_compressed'), got 'tree'"
    ]
    assert "split the sequence differently" in exchange_problems("ring", "ulysses")[0]
    with pytest.raises(ValueError, match="dense_exchange must be one of"):
        ContextParallel(None, "ring", "tree")  # checked before the group is ever used


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_block_attention_with_lse_merge_equals_full_attention(dtype, tol):
    """Two key blocks merged by LSE, and the blockwise backward with the final LSE, equal one
    attention over the concatenated keys (autograd of an explicit softmax); GQA 4 -> 2 heads."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=gen, dtype=dtype)
    k = torch.randn(2, 2, 12, 8, generator=gen, dtype=dtype)
    v = torch.randn(2, 2, 12, 8, generator=gen, dtype=dtype)
    dout = torch.randn(2, 4, 6, 8, generator=gen, dtype=dtype)
    # reference: the 6 queries are the last 6 of 12 positions (prefix unmasked, own causal)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    scores = ref[0] @ ref[1].repeat_interleave(2, dim=1).transpose(-1, -2) / 8**0.5
    mask = torch.ones(6, 12, dtype=torch.bool).tril(diagonal=6)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out_ref = probs @ ref[2].repeat_interleave(2, dim=1)
    (out_ref * dout).sum().backward()

    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=dtype)
    blocks = [(slice(0, 6), False), (slice(6, 12), True)]
    for keys, causal in blocks:
        merge_into(out, lse, *block_forward(q, k[:, :, keys], v[:, :, keys], causal))
    assert (out - out_ref).abs().max() <= tol
    delta = (dout * out).sum(-1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for keys, causal in blocks:
        gq, gk, gv = block_backward(dout, q, k[:, :, keys], v[:, :, keys], lse, delta, causal)
        dq += gq
        dk[:, :, keys] += gk
        dv[:, :, keys] += gv
    for mine, theirs in zip((dq, dk, dv), ref):
        assert (mine - theirs.grad).abs().max() <= tol
    # One causal call over all 12 keys (the diagonal aligned bottom-right) is the same attention.
    out_one, lse_one = block_forward(q, k, v, causal=True)
    assert (out_one - out_ref).abs().max() <= tol and (lse_one - lse).abs().max() <= tol
    for mine, theirs in zip(block_backward(dout, q, k, v, lse_one, delta, causal=True), ref):
        assert (mine - theirs.grad).abs().max() <= tol


def test_comm_accounting_relations():
    """Ring moves K/V W-1 times each way plus W gradient hops; the halo only on interior edges."""
    cfg = LighthouseConfig(pool=4, levels=3, topk=2048, tile_budget=128)
    n, world = 128 * 1024, 8
    common = dict(batch=1, heads=8, head_dim=128, dtype_bytes=2)
    ring = lighthouse_cp_bytes(n, world, 1, cfg, exchange="ring", **common)
    block = 2 * 8 * 128 * 2 * chunk_config(cfg, n, world).selected_length(n // 16)  # K+V elements
    assert ring.kv_forward == 7 * block * 2 and ring.kv_backward == 7 * block * 2
    assert ring.dkv_backward == 8 * block * 4
    assert ring.halo_forward == 2 * 15 * 8 * 128 * 2
    assert (
        lighthouse_cp_bytes(n, world, 0, cfg, exchange="ring", **common).halo_forward
        == 15 * 8 * 128 * 2
    )
    gather = lighthouse_cp_bytes(n, world, 1, cfg, exchange="allgather", **common)
    assert gather.kv_backward == 0 and gather.dkv_backward == 7 * block * 4
    dense = dense_cp_bytes(
        n, world, batch=1, kv_heads=8, head_dim=128, dtype_bytes=2, exchange="ring"
    )
    assert dense.kv_forward == 7 * 2 * 8 * (n // 8) * 128 * 2
    assert dense.total > 5 * ring.total


def test_comm_table_prints_one_row_per_length(capsys):
    from lh_cp.parallel.headtail.traffic import main

    main(["--lengths", "131072", "1048576"])
    lines = capsys.readouterr().out.splitlines()
    assert "W=8" in lines[0] and "topk=2048" in lines[0]
    assert lines[-2].startswith("| 128K | 24576 |") and lines[-1].startswith("| 1M | 81920 |")
