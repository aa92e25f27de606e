"""Lighthouse over packed documents under CP (gloo, CPU) equals one process (LIGHTHOUSE.md s.12).

One spawned job per W in {2, 3, 4} runs every case (layout x selection x GQA) in float64 and
returns the worst absolute errors of the output and the q/k/v gradients against the
single-process layer on the same inputs; the assertions happen here. Tolerance 1e-9: the
same attention rows are summed in a different order (a document's keys gathered from several
chunks against one call per document).
Layouts: documents crossing chunk and rank boundaries, one-token documents, a document
filling a window, many short documents.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

from lh_cp import LighthouseConfig, lighthouse_attention
from lh_cp.parallel import shard_sequence, unshard_sequence

TOLERANCE = 1e-9


def _layouts(n: int) -> list[list[int]]:
    """Boundaries of two windows of n tokens (B = 2), several shapes each."""
    half, quarter = n // 2, n // 4
    return [
        [0, 3, half + 5, n - 2, n, n + 1, 2 * n - quarter, 2 * n],  # crossings, a 1-token doc
        [0, n, n + quarter + 1, 2 * n],  # a window that is one document
        [0, *range(7, n, 7), n, *range(n + 5, 2 * n, 5), 2 * n],  # many short documents
        [0, quarter - 1, n - quarter + 2, n, 2 * n],  # long documents around the middle
    ]


def _cases(world: int):
    n = 2 * world * 16  # chunks of 16 tokens: two tiles of 8 (p = 2, L = 3, c_L = 4)
    for selection in ("tile_topk", "causal"):
        cfg = LighthouseConfig(
            pool=2, levels=3, topk=n * 2 // 8, tile_budget=2, selection=selection
        )
        for index, bounds in enumerate(_layouts(n)):
            yield f"{selection}/{index}", cfg, n, bounds


def _job(rank: int, world: int) -> dict[str, list[float]]:
    import torch.distributed as dist

    from lh_cp.ops.documents import check_documents
    from lh_cp.parallel.headtail.lighthouse_documents import lighthouse_documents_cp

    group = dist.group.WORLD
    errors = {}
    for name, cfg, n, bounds in _cases(world):
        for heads, kv_heads in ((2, 2), (4, 2)):
            gen = torch.Generator().manual_seed(len(errors))
            q, dout = (
                torch.randn(2, n, heads, 8, generator=gen, dtype=torch.float64) for _ in "ab"
            )
            k, v = (
                torch.randn(2, n, kv_heads, 8, generator=gen, dtype=torch.float64) for _ in "ab"
            )
            docs = torch.tensor(bounds, dtype=torch.int32)
            ref = [x.clone().requires_grad_() for x in (q, k, v)]
            (lighthouse_attention(*ref, cfg, documents=docs) * dout).sum().backward()
            local = [shard_sequence(x, group).clone().requires_grad_() for x in (q, k, v)]
            checked = check_documents(docs, 2, n, q.device)
            out = lighthouse_documents_cp(*local, cfg, checked, group)
            (out * shard_sequence(dout, group)).sum().backward()
            got = [unshard_sequence(x.detach(), group) for x in (out, *(t.grad for t in local))]
            with torch.no_grad():
                want_out = lighthouse_attention(q, k, v, cfg, documents=docs)
            want = [want_out] + [t.grad for t in ref]
            errors[f"{name}/H{heads}Hkv{kv_heads}"] = [
                (a - b).abs().max().item() for a, b in zip(got, want)
            ]
    return errors


@pytest.mark.parametrize("world", [2, 3, 4])
def test_cp_equals_one_process(world):
    results = run_distributed(_job, world)
    for rank_errors in results:
        for case, errs in rank_errors.items():
            assert max(errs) <= TOLERANCE, (world, case, errs)
