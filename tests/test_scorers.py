"""The "dilated" and "gla" selection scorers (docs/LIGHTHOUSE.md s.13) on CPU.

The library's twins (lh_cp/ops/scorers.py) against a loop-by-loop twin written from the
definition (every token, every earlier token of its residue and document, float64: <= 1e-12,
the only difference being summation order); "norm" unchanged; causality of the scores and
strict causality of the layer with the causal selection; config rules; the CP refusals; fla
never imported on CPU or for the other scorers. Document isolation: tests/test_document_lighthouse.py.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lh_cp import LighthouseConfig, lighthouse_attention
from lh_cp.ops import scorers
from lh_cp.ops.kernels.scores_reference import token_scores
from lh_cp.ops.select import selection_scores
from lh_cp.parallel.context import scorer_exchange_problems

SCORERS = ("dilated", "gla")
# p=2, L=2: N = 24, T = 8 (topk 6, b 2)
CFG = dict(pool=2, levels=2, topk=6, tile_budget=2)


def naive_mixer_norms(queries, keys, values, dilation, scorer, document):
    """||o_t|| for every t of one head: queries, keys, values [N, D] float64, document [N]
    ints. o_t mixes the values of s <= t with (t - s) % dilation == 0 in t's document."""
    n, dim = queries.shape
    scale = 1.0 / math.sqrt(dim)
    norms = torch.zeros(n, dtype=torch.float64)
    for t in range(n):
        seen = [s for s in range(t + 1) if (t - s) % dilation == 0 and document[s] == document[t]]
        logits = torch.stack([queries[t] @ keys[s] * scale for s in seen])
        if scorer == "dilated":
            weights = torch.softmax(logits, dim=0)
        else:
            weights = torch.stack(
                [
                    logits[i] * math.exp(scorers.GLA_LOG_DECAY * ((t - s) // dilation))
                    for i, s in enumerate(seen)
                ]
            )
        out = sum(w * values[s] for w, s in zip(weights, seen))
        norms[t] = torch.linalg.vector_norm(out)
    return norms


def naive_scores(q, k, v, dilation, scorer, bounds=None):
    """Query and key norms [B, H, N] by naive_mixer_norms, kv head h // group for head h."""
    batch, n, heads, _ = q.shape
    group = heads // k.shape[2]
    flat_doc = torch.zeros(batch * n, dtype=torch.int64)
    for i, start in enumerate((bounds or [b * n for b in range(batch + 1)])[1:-1]):
        flat_doc[start:] = i + 1
    document = flat_doc.view(batch, n)
    query, key = (torch.zeros(batch, heads, n, dtype=torch.float64) for _ in range(2))
    for b in range(batch):
        for h in range(heads):
            qh, kh, vh = q[b, :, h], k[b, :, h // group], v[b, :, h // group]
            query[b, h] = naive_mixer_norms(qh, kh, vh, dilation, scorer, document[b])
            key[b, h] = naive_mixer_norms(kh, qh, vh, dilation, scorer, document[b])
    return query, key


def _qkv(batch=2, n=24, heads=4, kv_heads=2, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n, heads, dim, generator=gen, dtype=torch.float64)
    k, v = (
        torch.randn(batch, n, kv_heads, dim, generator=gen, dtype=torch.float64) for _ in range(2)
    )
    return q, k, v


@pytest.mark.parametrize(("scorer", "chunk"), [("dilated", 64), ("gla", 64), ("gla", 5)])
@pytest.mark.parametrize("dilation", [2, 4])
@pytest.mark.parametrize("bounds", [None, [0, 5, 6, 19, 24, 31, 48]], ids=["windows", "documents"])
def test_twins_equal_the_loop_twin(scorer, chunk, dilation, bounds, monkeypatch):
    """GQA (4 query heads, 2 kv heads); documents of 5, 1, 13, 5 tokens and 7, 17 (a document
    shorter than the dilation leaves residues without a piece); the GLA twin in one chunk and
    in chunks of 5 steps (the state carried across chunks and through piece boundaries)."""
    monkeypatch.setattr(scorers, "GLA_CHUNK", chunk)
    q, k, v = _qkv()
    cfg = LighthouseConfig(**CFG, scorer=scorer, dilation=dilation)
    got = scorers.strided_norms(q, k, v, cfg, bounds)
    want = naive_scores(q, k, v, dilation, scorer, bounds)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    scores = selection_scores(q, k, v, cfg, bounds)
    assert all(s.dtype == torch.float32 and s.shape == (2, 4, 24) for s in scores)


@pytest.mark.parametrize("scorer", SCORERS)
def test_scores_stay_inside_their_document(scorer):
    """Every q, k, v outside document [19, 24) of window 0 (and all of window 1) replaced: its
    scores do not move by one bit; without the documents they do."""
    bounds = [0, 5, 6, 19, 24, 31, 48]
    q, k, v = _qkv(seed=9)
    mine = torch.zeros(2, 24, 1, 1, dtype=torch.bool)
    mine[0, 19:] = True
    other = _qkv(seed=10)
    changed = [torch.where(mine, x, y) for x, y in zip((q, k, v), other)]
    cfg = LighthouseConfig(**CFG, scorer=scorer, dilation=4)
    for given, moves in ((bounds, False), (None, True)):
        before, after = (scorers.strided_norms(*x, cfg, given) for x in ((q, k, v), changed))
        same = all(torch.equal(a[0, :, 19:], b[0, :, 19:]) for a, b in zip(before, after))
        assert same != moves


def test_norm_is_unchanged():
    """scorer="norm" (the default) is the float32 L2 norm of each token, bit for bit."""
    q, k, v = _qkv(dim=8)
    want = (token_scores(q), token_scores(k).repeat_interleave(2, dim=1))
    for cfg in (None, LighthouseConfig(**CFG), LighthouseConfig(**CFG, scorer="norm", dilation=5)):
        got = selection_scores(q, k, v, cfg)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(want[0], torch.linalg.vector_norm(q.float(), dim=-1).transpose(1, 2))


@pytest.mark.parametrize("scorer", SCORERS)
def test_scores_are_causal(scorer):
    """Every q, k, v after t replaced: the scores of 0..t do not move by one bit."""
    q, k, v = _qkv(seed=3)
    cfg = LighthouseConfig(**CFG, scorer=scorer, dilation=2)
    before = scorers.strided_norms(q, k, v, cfg)
    gen = torch.Generator().manual_seed(4)
    for t in (0, 7, 12, 22):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, t + 1 :] = 3 * torch.randn(x[:, t + 1 :].shape, generator=gen, dtype=x.dtype)
        after = scorers.strided_norms(*changed, cfg)
        assert all(torch.equal(a[..., : t + 1], b[..., : t + 1]) for a, b in zip(before, after))


@pytest.mark.parametrize("scorer", SCORERS)
def test_the_causal_selection_stays_strictly_causal(scorer):
    """s.11's property with the selection recomputed from these scores: outputs 0..t of the
    layer are bit-identical when every later q, k, v changes (N = 32, T = 16, p = 2, L = 3)."""
    cfg = LighthouseConfig(
        pool=2, levels=3, topk=4, tile_budget=2, selection="causal", scorer=scorer, dilation=2
    )
    q, k, v = _qkv(batch=1, n=32, heads=2, kv_heads=1, seed=5)
    out = lighthouse_attention(q, k, v, cfg)
    gen = torch.Generator().manual_seed(6)
    for t in (3, 9, 16, 21, 27):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, t + 1 :] = 3 * torch.randn(x[:, t + 1 :].shape, generator=gen, dtype=x.dtype)
        assert torch.equal(lighthouse_attention(*changed, cfg)[:, : t + 1], out[:, : t + 1]), t


def test_the_scorer_changes_the_selection():
    """Not a no-op: on the same inputs the three scorers refine different spans."""
    q, k, v = _qkv(batch=1, n=64, heads=2, kv_heads=2, seed=8)
    outs = [
        lighthouse_attention(
            q, k, v, LighthouseConfig(pool=2, levels=3, topk=4, tile_budget=2, scorer=s)
        )
        for s in ("norm", *SCORERS)
    ]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[1], outs[2])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(scorer="l2"),
            "LighthouseConfig.scorer must be one of ('norm', 'dilated', 'gla'), got scorer='l2'",
        ),
        (dict(dilation=0), "dilation must be a positive int, got dilation=0"),
        (dict(dilation=2.0), "LighthouseConfig.dilation must be an int, got 2.0"),
    ],
)
def test_bad_configs_name_the_rule(fields, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        LighthouseConfig(**CFG, **fields)


def test_sequence_length_must_be_a_multiple_of_the_dilation():
    cfg = LighthouseConfig(pool=2, levels=2, topk=6, tile_budget=2, scorer="gla", dilation=5)
    with pytest.raises(
        ValueError, match=r"N % dilation == 0 fails: .* N=24 must be a multiple of dilation=5"
    ):
        cfg.tile_size(24)
    LighthouseConfig(pool=2, levels=2, topk=6, tile_budget=2, dilation=5).tile_size(
        24
    )  # "norm": unused


def test_context_parallel_refuses_the_strided_scorers():
    for exchange in ("allgather", "ring", "ulysses_compressed"):
        for scorer in SCORERS:
            (problem,) = scorer_exchange_problems(scorer, exchange, "lighthouse.", "parallel.")
            assert problem.startswith(
                f"lighthouse.scorer={scorer!r} cannot run with parallel.exchange={exchange!r}"
            )
            assert "whole prefix" in problem and "'ulysses'" in problem
        assert scorer_exchange_problems("norm", exchange) == []
    assert scorer_exchange_problems("gla", "ulysses") == []


def test_context_parallel_refuses_them_before_any_communication():
    """The check comes first: a ContextParallel on no process group at all raises it."""
    from lh_cp.parallel import ContextParallel

    q, k, v = _qkv()
    cfg = LighthouseConfig(**CFG, scorer="gla")
    with pytest.raises(ValueError, match="scorer='gla' cannot run with exchange='allgather'"):
        ContextParallel(None, "allgather", "ring").lighthouse(q, k, v, cfg)


def test_pieces_refuse_them():
    """The head-tail and compressed-Ulysses layers derive their piece config here: refused
    even when called without ContextParallel."""
    cfg = LighthouseConfig(**CFG, scorer="dilated")
    with pytest.raises(
        ValueError, match="scorer='dilated' cannot select inside each head-tail chunk"
    ):
        cfg.for_pieces(48, 2, "each head-tail chunk")
    assert cfg.for_pieces(24, 1) == cfg


def test_the_recipe_refuses_them_before_training():
    from lh_cp.train.plan import check_recipe
    from lh_cp.train.recipe import load_recipe

    recipe = load_recipe(
        "recipes/quickstart.toml",
        overrides=[
            "lighthouse.scorer=dilated",
            "parallel.cp=2",
            "parallel.exchange=ring",
            "parallel.dense_exchange=ring",
        ],
    )
    problems = [p for p in check_recipe(recipe) if "scorer" in p]  # listed once, by name
    assert len(problems) == 1
    assert problems[0].startswith(
        "lighthouse.scorer='dilated' cannot run with parallel.exchange='ring'"
    )
    ulysses = [
        "parallel.exchange=ulysses",
        "parallel.dense_exchange=ulysses",
        "parallel.engine=deepspeed",
    ]
    plain = load_recipe(
        "recipes/quickstart.toml", overrides=["lighthouse.scorer=gla", "parallel.cp=2", *ulysses]
    )
    assert not [p for p in check_recipe(plain) if "scorer" in p]


def test_fla_is_imported_only_for_gla_on_cuda():
    """A fresh interpreter runs every scorer on CPU: fla is never imported. Asking the CUDA
    path for it where it is missing raises the install hint."""
    code = (
        "import sys, torch; from lh_cp import LighthouseConfig, lighthouse_attention\n"
        "q = torch.randn(1, 32, 2, 8)\n"
        "for s in ('norm', 'dilated', 'gla'):\n"
        "    lighthouse_attention(q, q, q, LighthouseConfig(pool=2, levels=2, topk=4, tile_budget=2, scorer=s))\n"
        "assert not [m for m in sys.modules if m == 'fla' or m.startswith('fla.')], 'fla imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_fla_raises_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # import fla... raises ImportError
    x = torch.randn(2, 8, 1, 4)
    with pytest.raises(ImportError, match=r"pip install 'lh-cp\[gla\]'"):
        scorers._gla_fla(x, x, x, None)


def test_benchmark_smoke(tmp_path):
    """benchmarks/scorers.py runs every default variant at toy sizes on the CPU, and one more
    given as a string of overrides; ratios are against the first."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scorers.py"
    spec = importlib.util.spec_from_file_location("scorers_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    variants = [*module.DEFAULT_VARIANTS, "scorer=dilated,dilation=8"]
    module.main(["--smoke", "--out", str(tmp_path / "out.json"), "--variants", *variants])
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == variants
    assert rows[-1]["config"]["dilation"] == 8 and rows[-1]["config"]["scorer"] == "dilated"
    for r in rows:
        assert "error" not in r, r
        assert r["layer_over_first"] == r["layer_ms"] / rows[0]["layer_ms"]
    with pytest.raises(ValueError, match="'skorer' is not a LighthouseConfig field"):
        module.parse_variant("skorer=gla", LighthouseConfig())
