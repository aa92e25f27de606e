"""Ulysses Lighthouse on DeepSpeed's CPU accelerator over gloo equals the single-process result.

Two variants, each on contiguous sequence shards (rank r holds tokens [r*C, (r+1)*C)):
- "ulysses": DeepSpeed's DistributedAttention with Lighthouse (or dense) as local attention;
- "compressed": local compression, all-to-all of the compressed entries only, halo scatter.
One spawned job per W in {2, 4} runs every case (variant x config x heads x dtype) and
returns the worst absolute errors of the output and of the q/k/v gradients, and the bytes
this rank handed to torch.distributed for other ranks (forward and backward measured
separately by wrapping all_to_all_single and batch_isend_irecv) next to the closed-form
accounting of ulysses_traffic.py; the assertions happen here, in the test process.

Tolerances: float64 <= 1e-9: the distributed and single-device computations differ only in
summation order (SDPA over head groups, scatter sums split by the halo), which in float64
leaves errors near 1e-15, while a misplaced entry or a lost halo row changes values at
O(1e-1). float32 <= 1e-5: the same at float32 rounding on O(1) values of short sequences.
Byte counts must match exactly.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.distributed as dist

pytest.importorskip(
    "deepspeed", reason="needs DeepSpeed: pip install --no-build-isolation deepspeed (after torch)"
)

from dist_utils import run_distributed  # noqa: E402

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention  # noqa: E402

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
BATCH, HEAD_DIM, SHARD = 2, 8, 32


def configs(world: int) -> dict[str, LighthouseConfig | None]:
    """Name -> config for N = W * SHARD tokens, the shard a whole number of tiles.

    p2L3: tile 16, two tiles per shard, spill c_L - 1 = 3. p4L3: tile 32 = one tile per
    shard, c_L = 16, spill 15 rows into the next rank. p2L3causal: p2L3 with the strictly
    causal selection (its thresholds cross ranks). p2L3dilated, p2L3gla: p2L3 with those
    scorers (plain Ulysses only, float64 only: they change the selection, not the exchange).
    dense: no compression (cfg None).
    """
    n = world * SHARD
    return {
        "p2L3": LighthouseConfig(pool=2, levels=3, topk=n * 2 // 16, tile_budget=2),
        "p4L3": LighthouseConfig(pool=4, levels=3, topk=n * 2 // 32, tile_budget=2),
        # strictly causal selection: shard r's first tile starts from shard r-1's thresholds
        "p2L3causal": LighthouseConfig(
            pool=2, levels=3, topk=n * 2 // 16, tile_budget=2, selection="causal"
        ),
        # the strided scorers (LIGHTHOUSE.md s.13): each head group scores its whole sequences
        "p2L3dilated": LighthouseConfig(
            pool=2, levels=3, topk=n * 2 // 16, tile_budget=2, scorer="dilated", dilation=4
        ),
        "p2L3gla": LighthouseConfig(
            pool=2, levels=3, topk=n * 2 // 16, tile_budget=2, scorer="gla", dilation=2
        ),
        "dense": None,
    }


def head_cases(world: int) -> list[tuple[int, int]]:
    """(H, Hkv): MHA, GQA, and for W=4 a kv count below W (repeated to lcm(Hkv, W) by ulysses.py)."""
    return [(4, 4), (4, 2)] if world == 2 else [(4, 2), (8, 1)]


class WireTap:
    """Counts the bytes this rank hands to torch.distributed for *other* ranks.

    Wraps the two entry points the Ulysses code (and DeepSpeed's all-to-all under it) send
    through. For all_to_all_single, the rows destined for this rank never leave it.
    """

    def __enter__(self) -> WireTap:
        self.sent = 0
        self._a2a, self._p2p = dist.all_to_all_single, dist.batch_isend_irecv
        tap = self

        def all_to_all_single(
            output,
            input,
            output_split_sizes=None,
            input_split_sizes=None,
            group=None,
            async_op=False,
        ):
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            rows = input_split_sizes or [input.shape[0] // world] * world
            row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
            tap.sent += sum(count for peer, count in enumerate(rows) if peer != rank) * row_bytes
            return tap._a2a(
                output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
            )

        def batch_isend_irecv(ops):
            tap.sent += sum(
                op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend
            )
            return tap._p2p(ops)

        dist.all_to_all_single, dist.batch_isend_irecv = all_to_all_single, batch_isend_irecv
        return self

    def __exit__(self, *exc_info) -> None:
        dist.all_to_all_single, dist.batch_isend_irecv = self._a2a, self._p2p


def _inputs(n: int, heads: int, kv_heads: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (BATCH, n, heads, HEAD_DIM),
        (BATCH, n, kv_heads, HEAD_DIM),
        (BATCH, n, kv_heads, HEAD_DIM),
        (BATCH, n, heads, HEAD_DIM),
    ]
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


def _case(variant: str, cfg, inputs, group) -> dict:
    """Errors against one process, and bytes sent forward/backward (measured and expected)."""
    from lh_cp.parallel.ulysses.compressed import compressed_ulysses_attention
    from lh_cp.parallel.ulysses.plain import ulysses_attention
    from lh_cp.parallel.ulysses.sharding import ulysses_shard, ulysses_unshard
    from lh_cp.parallel.ulysses.traffic import compressed_ulysses_bytes, plain_ulysses_bytes

    q, k, v, dout = inputs
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    batch, n, heads, dim = q.shape
    shard = n // world
    local = slice(rank * shard, (rank + 1) * shard)

    # rope="entries" (LIGHTHOUSE.md s.14): tables of the global positions, sharded like q.
    rope = None
    if cfg is not None and cfg.rope == "entries":
        from lh_cp.model.transformer import rope_tables

        rope = rope_tables(torch.arange(n), dim, 100.0, q.dtype)  # [n, D/2] each
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = causal_attention(*ref) if cfg is None else lighthouse_attention(*ref, cfg, rope=rope)
    (out_ref * dout).sum().backward()

    loc = [ulysses_shard(t, group).clone().requires_grad_() for t in (q, k, v)]
    loc_rope = None if rope is None else tuple(ulysses_shard(t, group, dim=0) for t in rope)
    with WireTap() as forward_tap:
        if variant == "ulysses":
            out = ulysses_attention(*loc, cfg, group, rope=loc_rope)
        else:
            out = compressed_ulysses_attention(*loc, cfg, group, rope=loc_rope)
    with WireTap() as backward_tap:
        (out * dout[:, local]).sum().backward()

    errors = {"out": (out - out_ref[:, local]).abs().max().item()}
    errors["unshard"] = (ulysses_unshard(out, group) - out_ref).abs().max().item()
    for name, a, b in zip(("dq", "dk", "dv"), loc, ref):
        errors[name] = (a.grad - b.grad[:, local]).abs().max().item()
    size = q.element_size()
    if variant == "ulysses":
        expected = plain_ulysses_bytes(
            n, world, batch=batch, heads=heads, kv_heads=k.shape[2], head_dim=dim, dtype_bytes=size
        )
    else:
        expected = compressed_ulysses_bytes(
            n, world, rank, cfg, batch=batch, heads=heads, head_dim=dim, dtype_bytes=size
        )
    return {
        "errors": errors,
        "sent": (forward_tap.sent, backward_tap.sent),
        "expected": (
            expected.alltoall_forward + expected.halo_forward,
            expected.alltoall_backward + expected.halo_backward,
        ),
    }


def _rejections(group) -> dict[str, str]:
    """Messages of the shape errors, raised on every rank before any communication."""
    from lh_cp.parallel.ulysses.compressed import compressed_ulysses_attention
    from lh_cp.parallel.ulysses.plain import ulysses_attention

    messages = {}
    world = dist.get_world_size(group)
    # Shard of 24 tokens, tile 16: the global rules hold (N = 24 W, topk = 3 W), the shard rule fails.
    q = torch.randn(1, 24, 4, HEAD_DIM)
    try:
        compressed_ulysses_attention(
            q, q, q, LighthouseConfig(pool=2, levels=3, topk=3 * world, tile_budget=2), group
        )
    except ValueError as err:
        messages["compressed_tiles"] = str(err)
    q2 = torch.randn(1, SHARD, 2 * world, HEAD_DIM)
    try:
        compressed_ulysses_attention(q2, q2, q2, configs(world)["p2L3gla"], group)
    except ValueError as err:
        messages["compressed_scorer"] = str(err)
    q3 = torch.randn(1, SHARD, 3, HEAD_DIM)
    good = configs(world)["p2L3"]
    for name, fn in (
        ("compressed_heads", compressed_ulysses_attention),
        ("ulysses_heads", ulysses_attention),
    ):
        try:
            fn(q3, q3, q3, good, group)
        except ValueError as err:
            messages[name] = str(err)
    return messages


def ulysses_job(rank: int, world: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the job's gloo group
    group = dist.new_group(list(range(world)))
    from lh_cp.parallel.ulysses.sharding import ulysses_positions

    results = {
        "cases": {},
        "rejections": _rejections(group),
        "positions": ulysses_positions(world * SHARD, group).tolist(),
    }
    for (name, cfg), (heads, kv_heads), dtype, variant in itertools.product(
        configs(world).items(),
        head_cases(world),
        (torch.float64, torch.float32),
        ("ulysses", "compressed"),
    ):
        inputs = _inputs(world * SHARD, heads, kv_heads, dtype, seed=heads * 10 + kv_heads)
        if variant == "compressed" and cfg is None:
            continue  # the compressed variant is Lighthouse only; dense runs plain Ulysses
        if (
            cfg is not None
            and cfg.scorer != "norm"
            and (variant == "compressed" or dtype != torch.float64)
        ):
            continue  # compressed Ulysses refuses them (_rejections)
        results["cases"][(variant, name, heads, kv_heads, str(dtype))] = _case(
            variant, cfg, inputs, group
        )
    # rope="entries": one float64 GQA case per variant (the tables of the whole sequence reach
    # plain Ulysses' head groups through an all-gather, which the wire tap does not count)
    cfg = dataclasses.replace(configs(world)["p2L3"], rope="entries")
    heads, kv_heads = head_cases(world)[-1]
    for variant in ("ulysses", "compressed"):
        inputs = _inputs(world * SHARD, heads, kv_heads, torch.float64, seed=5)
        key = (variant, "p2L3rope", heads, kv_heads, str(torch.float64))
        results["cases"][key] = _case(variant, cfg, inputs, group)
    return results


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_deepspeed_ulysses_equals_single_process(world):
    results = run_distributed(ulysses_job, world, timeout=200)
    for rank, result in enumerate(results):
        assert (
            len(result["cases"]) == 3 * 2 * 2 * 2 + 2 * 2 + 2 * 2 + 2
        )  # (3 Lighthouse configs x heads x dtypes x variants) + dense + 2 scorers x heads
        # + rope="entries" x variants
        for key, case in result["cases"].items():
            dtype = torch.float64 if "float64" in key[-1] else torch.float32
            worst = max(case["errors"].values())
            assert worst <= TOLERANCE[dtype], f"rank {rank} case {key}: errors {case['errors']}"
            assert case["sent"] == case["expected"], (
                f"rank {rank} case {key}: sent {case['sent']}, expected {case['expected']}"
            )
            assert case["sent"][0] > 0 and case["sent"][1] > 0
        assert result["positions"] == list(range(rank * SHARD, (rank + 1) * SHARD))
        rejections = result["rejections"]
        assert (
            f"shard (compressed Ulysses compresses it on its own rank) of {24 * world} / {world} "
            "= 24 tokens must be a multiple of the tile size T=" in rejections["compressed_tiles"]
        )
        assert rejections["compressed_scorer"].startswith(
            "scorer='gla' cannot select inside each contiguous shard (compressed Ulysses compresses it on its own rank)"
        )
        for name in ("compressed_heads", "ulysses_heads"):
            assert f"H=3 is not a multiple of W={world}" in rejections[name]


def test_deepspeed_compressed_traffic_table():
    """The configuration of the docs/context_parallel.md table: compressed Ulysses sends under
    a fifth of plain Ulysses' bytes on every rank; the accounting rejects the shapes the
    attention rejects."""
    from lh_cp.parallel.ulysses.traffic import (
        compressed_ulysses_bytes,
        plain_ulysses_bytes,
        traffic_table,
    )

    cfg = LighthouseConfig(pool=4, levels=3, topk=2048, tile_budget=128)
    for n in (131072, 262144, 524288, 1048576):
        plain = plain_ulysses_bytes(n, 8, batch=1, heads=8, kv_heads=8, head_dim=128, dtype_bytes=2)
        for rank in range(8):
            compressed = compressed_ulysses_bytes(
                n, 8, rank, cfg, batch=1, heads=8, head_dim=128, dtype_bytes=2
            )
            assert compressed.total < 0.2 * plain.total
    table = traffic_table()
    assert table.count("\n") == 5 and "| 1M |" in table
    with pytest.raises(ValueError, match="multiple of the tile size"):
        compressed_ulysses_bytes(
            24 * 2,
            2,
            0,
            LighthouseConfig(pool=2, levels=3, topk=6, tile_budget=2),
            batch=1,
            heads=4,
            head_dim=8,
            dtype_bytes=4,
        )
    with pytest.raises(ValueError, match="H=3 is not a multiple of W=2"):
        plain_ulysses_bytes(64, 2, batch=1, heads=3, kv_heads=3, head_dim=8, dtype_bytes=4)
