"""A deliberately naive Lighthouse: Python loops over heads, tiles, levels and entries.

Written straight from LIGHTHOUSE.md s.3-s.6, sharing no code with lh_cp, so that the
vectorised library and this twin agreeing entry for entry is evidence of both being right.
Float64 throughout; meant for tiny shapes only.
"""

from __future__ import annotations

import math

import torch


def naive_select_head(q_norm: list[float], k_norm: list[float], pool: int, levels: int, topk: int, budget: int):
    """Sorted list of (key, start, end, level, internal) for one head."""
    n = len(q_norm)
    tile = n * budget // topk
    span_of = lambda level: pool ** (level - 1)

    def score(norms, level, index):
        c = span_of(level)
        return max(norms[index * c : (index + 1) * c])

    entries = []
    for tile_start in range(0, n, tile):
        top = span_of(levels)
        candidates = list(range(tile_start // top, (tile_start + tile) // top))
        for level in range(levels, 1, -1):
            by_query = sorted(candidates, key=lambda i: (-score(q_norm, level, i), i))[: budget // 2]
            rest = [i for i in candidates if i not in by_query]
            by_key = sorted(rest, key=lambda i: (-score(k_norm, level, i), i))[: budget // 2]
            refined = sorted(by_query + by_key)
            for i in candidates:
                entries.append((level, i, i in refined))
            candidates = [r * pool + j for r in refined for j in range(pool)]
        for i in candidates:
            entries.append((1, i, False))
    out = []
    for level, index, internal in entries:
        c = span_of(level)
        start, end = index * c, (index + 1) * c
        key = levels * (end - 1) + (level - 1) if internal else levels * start
        out.append((key, start, end, level, internal))
    return sorted(out)


def naive_lighthouse(q, k, v, pool: int, levels: int, topk: int, budget: int):
    """Output [B, N, H, D] (float64) and the per-(b, h) sorted entry lists."""
    batch, n, heads, dim = q.shape
    group = heads // k.shape[2]
    out = torch.zeros(batch, n, heads, dim, dtype=torch.float64)
    selections = {}
    for b in range(batch):
        for h in range(heads):
            qh, kh, vh = q[b, :, h].double(), k[b, :, h // group].double(), v[b, :, h // group].double()
            q_norm = [float(torch.linalg.vector_norm(qh[t].float())) for t in range(n)]
            k_norm = [float(torch.linalg.vector_norm(kh[t].float())) for t in range(n)]
            entries = naive_select_head(q_norm, k_norm, pool, levels, topk, budget)
            selections[b, h] = entries
            pooled = lambda x, s, e: x[s:e].mean(dim=0)
            qe = torch.stack([pooled(qh, s, e) for _, s, e, _, _ in entries])
            ke = torch.stack([pooled(kh, s, e) for _, s, e, _, _ in entries])
            ve = torch.stack([pooled(vh, s, e) for _, s, e, _, _ in entries])
            keys = [entry[0] for entry in entries]
            logits = qe @ ke.T / math.sqrt(dim)
            for j in range(len(entries)):
                for i in range(len(entries)):
                    if keys[i] > keys[j]:
                        logits[j, i] = float("-inf")
            oe = torch.softmax(logits, dim=-1) @ ve
            for j, (_, s, e, _, _) in enumerate(entries):
                c = e - s
                for t in range(e - 1, min(e - 1 + c, n)):
                    out[b, t, h] += oe[j]
    return out, selections
