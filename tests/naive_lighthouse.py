"""A deliberately naive Lighthouse: Python loops over heads, tiles, levels and entries.

Written straight from LIGHTHOUSE.md s.3-s.6, sharing no code with lh_cp, so that the
vectorised library and this twin agreeing entry for entry is evidence of both being right.
Float64 throughout; meant for tiny shapes only.
"""

from __future__ import annotations

import math

import torch


def naive_select_head(
    q_norm: list[float],
    k_norm: list[float],
    pool: int,
    levels: int,
    topk: int,
    budget: int,
    selection: str = "tile_topk",
    preceding: dict | None = None,
):
    """Sorted list of (key, start, end, level, internal) for one head.

    selection "causal" follows LIGHTHOUSE.md s.11; `preceding` maps (level, 0 for query or 1 for
    key) to the thresholds of the tile before this sequence (naive_tile_thresholds of it)."""
    n = len(q_norm)
    tile = n * budget // topk
    span_of = lambda level: pool ** (level - 1)

    def score(norms, level, index):
        c = span_of(level)
        return max(norms[index * c : (index + 1) * c])

    entries = []
    thresholds = preceding
    for tile_start in range(0, n, tile):
        top = span_of(levels)
        candidates = list(range(tile_start // top, (tile_start + tile) // top))
        for level in range(levels, 1, -1):
            if selection == "causal":
                in_use = thresholds or {(level, which): float("-inf") for which in (0, 1)}
                refined = naive_causal_refine(
                    candidates, q_norm, k_norm, pool, levels, level, budget, in_use
                )
            else:
                by_query = sorted(candidates, key=lambda i: (-score(q_norm, level, i), i))[
                    : budget // 2
                ]
                rest = [i for i in candidates if i not in by_query]
                by_key = sorted(rest, key=lambda i: (-score(k_norm, level, i), i))[: budget // 2]
                refined = sorted(by_query + by_key)
            for i in candidates:
                entries.append((level, i, i in refined))
            candidates = [r * pool + j for r in refined for j in range(pool)]
        if selection == "causal":
            thresholds = naive_tile_thresholds(
                q_norm, k_norm, pool, levels, budget, tile_start, tile
            )
        for i in candidates:
            entries.append((1, i, False))
    out = []
    for level, index, internal in entries:
        c = span_of(level)
        start, end = index * c, (index + 1) * c
        key = levels * (end - 1) + (level - 1) if internal else levels * start
        out.append((key, start, end, level, internal))
    return sorted(out)


def naive_first_child_score(norms: list[float], pool: int, level: int, index: int) -> float:
    """s.11: a level-l span is scored by the largest norm of its first child's tokens."""
    start = index * pool ** (level - 1)
    return max(norms[start : start + pool ** (level - 2)])


def naive_eligible(pool: int, levels: int, level: int, index: int) -> bool:
    """s.11: every top-level span may be refined; below the top, no first child is."""
    return level == levels or index % pool != 0


def naive_tile_thresholds(
    q_norm, k_norm, pool: int, levels: int, budget: int, tile_start: int, tile: int
) -> dict:
    """What the tile at tile_start hands to the next: {(level, 0 | 1): k-th largest score}."""
    out = {}
    for level in range(2, levels + 1):
        c = pool ** (level - 1)
        rank = budget // 2 if level == levels else tile // (2 * c * pool)
        spans = [
            i
            for i in range(tile_start // c, (tile_start + tile) // c)
            if naive_eligible(pool, levels, level, i)
        ]
        for which, norms in ((0, q_norm), (1, k_norm)):
            scores = sorted(
                (naive_first_child_score(norms, pool, level, i) for i in spans), reverse=True
            )
            out[level, which] = scores[rank - 1]
    return out


def naive_causal_refine(
    candidates, q_norm, k_norm, pool, levels, level, budget, thresholds
) -> list[int]:
    """s.11, one candidate at a time in index order: forced once the refinable candidates left
    are no more than the budget left, else by query score, else by key score."""
    refinable = [i for i in candidates if naive_eligible(pool, levels, level, i)]
    refined, by_query, by_key = [], 0, 0
    for position, i in enumerate(refinable):
        if budget - len(refined) >= len(refinable) - position:
            refined.append(i)
        elif (
            by_query < budget // 2
            and naive_first_child_score(q_norm, pool, level, i) >= thresholds[level, 0]
        ):
            refined.append(i)
            by_query += 1
        elif (
            by_key < budget // 2
            and naive_first_child_score(k_norm, pool, level, i) >= thresholds[level, 1]
        ):
            refined.append(i)
            by_key += 1
    return refined


def naive_rotated(x, b: int, end: int, rope):
    """s.14: a pooled entry [D] of window b ending at token end - 1, rotated pair by pair at
    that token's angles (rope = (cos, sin) [B, N, D/2]); unchanged when rope is None."""
    if rope is None:
        return x
    half = x.shape[0] // 2
    out = torch.empty_like(x)
    for i in range(half):
        c, s = float(rope[0][b, end - 1, i]), float(rope[1][b, end - 1, i])
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def naive_lighthouse(
    q,
    k,
    v,
    pool: int,
    levels: int,
    topk: int,
    budget: int,
    selection: str = "tile_topk",
    rope=None,
):
    """Output [B, N, H, D] (float64) and the per-(b, h) sorted entry lists. `rope` (cos, sin)
    [B, N, D/2]: q and k are unrotated and every q, k entry is rotated at its last token."""
    batch, n, heads, dim = q.shape
    group = heads // k.shape[2]
    out = torch.zeros(batch, n, heads, dim, dtype=torch.float64)
    selections = {}
    for b in range(batch):
        for h in range(heads):
            qh, kh, vh = (
                q[b, :, h].double(),
                k[b, :, h // group].double(),
                v[b, :, h // group].double(),
            )
            q_norm = [float(torch.linalg.vector_norm(qh[t].float())) for t in range(n)]
            k_norm = [float(torch.linalg.vector_norm(kh[t].float())) for t in range(n)]
            entries = naive_select_head(q_norm, k_norm, pool, levels, topk, budget, selection)
            selections[b, h] = entries
            pooled = lambda x, s, e: x[s:e].mean(dim=0)
            qe = torch.stack(
                [naive_rotated(pooled(qh, s, e), b, e, rope) for _, s, e, _, _ in entries]
            )
            ke = torch.stack(
                [naive_rotated(pooled(kh, s, e), b, e, rope) for _, s, e, _, _ in entries]
            )
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


def naive_regions(bounds: list[int], n: int, tile: int, top_span: int, min_document_tokens: int):
    """LIGHTHOUSE.md s.12, written again: (window, a, z, A, Z) of every document, window-relative."""
    out = []
    for i in range(len(bounds) - 1):
        window = bounds[i] // n
        a, z = bounds[i] - window * n, bounds[i + 1] - window * n
        first = a if a % tile == 0 else (a // tile + 1) * tile
        last = z - z % tile
        if z != n and z - last < top_span - 1:  # a delivery of the region would pass z
            last = last - tile
        if last <= first or z - a < min_document_tokens:
            first, last = a, a
        out.append((window, a, z, first, last))
    return out


def naive_lighthouse_documents(
    q,
    k,
    v,
    pool: int,
    levels: int,
    topk: int,
    budget: int,
    bounds: list[int],
    selection: str = "tile_topk",
    min_document_tokens: int = 0,
    rope=None,
):
    """s.12 with loops: per window, head and document, the entries are the document's head and
    tail tokens plus the unmasked selection of its region as a sequence of its own (keys and
    spans moved to window positions); they attend causally among themselves and deliver into
    the document. Output [B, N, H, D] float64 and {(b, h, document index): sorted entries}."""
    batch, n, heads, dim = q.shape
    group = heads // k.shape[2]
    tile = n * budget // topk
    top = pool ** (levels - 1)
    out = torch.zeros(batch, n, heads, dim, dtype=torch.float64)
    selections = {}
    for index, (b, a, z, first, last) in enumerate(
        naive_regions(bounds, n, tile, top, min_document_tokens)
    ):
        for h in range(heads):
            qh, kh, vh = (
                q[b, :, h].double(),
                k[b, :, h // group].double(),
                v[b, :, h // group].double(),
            )
            entries = [(levels * t, t, t + 1, 1, False) for t in range(a, first)]
            if last > first:
                q_norm = [
                    float(torch.linalg.vector_norm(qh[t].float())) for t in range(first, last)
                ]
                k_norm = [
                    float(torch.linalg.vector_norm(kh[t].float())) for t in range(first, last)
                ]
                region_topk = (last - first) // tile * budget
                for key, s, e, level, internal in naive_select_head(
                    q_norm, k_norm, pool, levels, region_topk, budget, selection
                ):
                    entries.append((key + levels * first, s + first, e + first, level, internal))
            entries += [(levels * t, t, t + 1, 1, False) for t in range(max(first, last), z)]
            entries.sort()
            selections[b, h, index] = entries
            qe = torch.stack(
                [naive_rotated(qh[s:e].mean(dim=0), b, e, rope) for _, s, e, _, _ in entries]
            )
            ke = torch.stack(
                [naive_rotated(kh[s:e].mean(dim=0), b, e, rope) for _, s, e, _, _ in entries]
            )
            ve = torch.stack([vh[s:e].mean(dim=0) for _, s, e, _, _ in entries])
            keys = [entry[0] for entry in entries]
            logits = qe @ ke.T / math.sqrt(dim)
            for j in range(len(entries)):
                for i in range(len(entries)):
                    if keys[i] > keys[j]:
                        logits[j, i] = float("-inf")
            oe = torch.softmax(logits, dim=-1) @ ve
            for j, (_, s, e, _, _) in enumerate(entries):
                for t in range(e - 1, min(e - 1 + (e - s), z)):
                    out[b, t, h] += oe[j]
    return out, selections
