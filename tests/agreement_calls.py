"""Rank agreement on every call, run under torchrun (2 ranks, gloo) by tests/test_faults.py:
`python agreement_calls.py OUT_DIR`. Each rank makes the same sequence of public cp= calls, in
some of which one rank passes something different, and writes what each call did (the error's
type and message, or "ok") to OUT_DIR/rank<R>.json. The test checks that every rank raised the
same named error in every bad case, and that the group still works afterwards (no abort, no
hang: the process-group timeout is 60 s, the test's own limit shorter than any two of them).
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.parallel import shard_sequence


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    rank, group = dist.get_rank(), dist.group.WORLD
    cfg = LighthouseConfig(pool=2, levels=2, topk=8, tile_budget=2)
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(1, 64, 2, 8, generator=generator)  # [B, N, H, D], shared by the ranks
    mine = shard_sequence(full, group)  # [1, 32, 2, 8]
    one = 1 if rank == 1 else 0  # the rank that differs

    def lighthouse(q, c=cfg, exchange="allgather"):
        return lighthouse_attention(q, q, q, c, cp=group, exchange=exchange)

    def nan_on_rank_1(x):
        x = x.clone()
        if one:
            x[0, 5, 1, 3] = float("nan")
        return x

    cases = {
        "good": lambda: lighthouse(mine),
        # a new shape on one rank after a successful call with the other shape
        "shape_after_success": lambda: lighthouse(mine[:, :16] if one else mine),
        "dtype": lambda: lighthouse(mine.double() if one else mine),
        "selection_only": lambda: lighthouse(
            mine, replace(cfg, selection="causal") if one else cfg
        ),
        "topk_only": lambda: lighthouse(mine, replace(cfg, topk=16) if one else cfg),
        "exchange_only": lambda: lighthouse(mine, cfg, "ring" if one else "allgather"),
        "nan_in_q": lambda: lighthouse_attention(
            nan_on_rank_1(mine), mine, mine, cfg, cp=group, exchange="ring"
        ),
        "nan_in_v_causal_selection": lambda: lighthouse_attention(
            mine, mine, nan_on_rank_1(mine), replace(cfg, selection="causal"), cp=group
        ),
        "dense_heads": lambda: causal_attention(
            mine[:, :, :1] if one else mine, mine, mine, cp=group, exchange="ring"
        ),
        "empty_batch_one_rank": lambda: lighthouse(mine[:0] if one else mine),
        "empty_batch_every_rank": lambda: lighthouse(mine[:0]),
        "documents": lambda: lighthouse_attention(
            mine,
            mine,
            mine,
            cfg,
            cp=group,
            documents=torch.tensor([0, 16 if one else 24, 64], dtype=torch.int32),
        ),
        "good_again": lambda: lighthouse(mine),
    }
    results = {}
    for name, call in cases.items():
        try:
            call()
            results[name] = "ok"
        except Exception as err:
            results[name] = f"{type(err).__name__}: {err}"
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
