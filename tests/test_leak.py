"""The leak metric (lh_cp/train/leak.py): exactly zero in dense mode, nonzero where the selection
provably reads the future, and its probe rows built as documented.

Exact equality (==) in dense mode: the clean and the perturbed forwards have the same shapes,
and dense causal attention never reads a position after t for the output at t, so on one CPU
process the loss at t is bit-identical; any tolerance would hide a real leak.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lh_cp.model.transformer import Transformer
from lh_cp.ops.config import LighthouseConfig
from lh_cp.train.leak import IGNORE_INDEX, NEAR_OFFSETS, LeakProbe, make_probe
from lh_cp.train.recipe import recipe_from_dict
from lh_cp.train.runtime import start, stop
from lh_cp.train.steps import probe_leak

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(
    dim: int, layers: int, heads: int, lighthouse: dict, dense_layers: list[int], seq_len: int
):
    return recipe_from_dict(
        {
            "run": {"device": "cpu"},
            "model": {
                "vocab_size": 258,
                "dim": dim,
                "n_layers": layers,
                "n_heads": heads,
                "n_kv_heads": heads,
                "ffn_dim": 2 * dim,
            },
            "lighthouse": {**lighthouse, "dense_layers": dense_layers},
            "data": {"seq_len": seq_len, "batch_size": 3},
            "stages": [{"name": "lh", "attention": "lighthouse", "steps": 1}],
        }
    )


@pytest.fixture
def runtime():
    started = []

    def make(recipe):
        started.append(start(recipe))
        return started[-1]

    yield make
    stop()


def _model(recipe) -> Transformer:
    lh = recipe.lighthouse
    return Transformer(recipe.model, lh.config(), tuple(lh.dense_layers)).eval()


def test_probe_rows_change_only_what_the_variant_names():
    stream = np.random.default_rng(0).integers(0, 256, size=4 * 64 + 1).astype(np.uint16)
    probe = make_probe(stream, 64, 5, seed=1)
    clean, targets = probe.batch("clean")
    assert clean.shape == targets.shape == (5, 64)
    assert ((targets != IGNORE_INDEX).sum(dim=1) == 1).all()  # one target per row, at t
    rows = torch.arange(5)
    assert (targets[rows, probe.positions] == probe.targets[rows, probe.positions]).all()
    assert (clean[0] == clean[4]).all()  # 4 windows: row 4 reuses window 0
    for variant, offsets in (("next", (1,)), ("near", NEAR_OFFSETS)):
        changed, same_targets = probe.batch(variant)
        assert (same_targets == targets).all()  # targets unchanged
        diff = (changed != clean).nonzero().tolist()
        assert sorted(diff) == sorted(
            [r, int(probe.positions[r]) + o] for r in range(5) for o in offsets
        )


def test_leak_is_exactly_zero_in_dense_mode(runtime):
    recipe = _recipe(
        32, 3, 2, {"pool": 2, "levels": 3, "topk": 16, "tile_budget": 4}, [0], seq_len=128
    )
    rt = runtime(recipe)
    torch.manual_seed(0)
    model = _model(recipe)
    stream = np.random.default_rng(1).integers(0, 256, size=6 * 128 + 1).astype(np.uint16)
    probe = make_probe(stream, 128, 7, seed=2)  # 7 rows over batches of 3: a short last group
    model.set_attention("dense")
    leak = probe_leak(model, rt, recipe, probe)
    assert leak == {"val/leak_next_token_nats": 0.0, "val/leak_near_future_nats": 0.0}


def test_leak_is_nonzero_where_the_selection_reads_the_future(runtime):
    """One Lighthouse layer, tile = the whole 16-token sequence, spans of 2 tokens, one span
    refined by query score and one by key score. Token X has by far the largest q and k norm,
    tokens Y (positions 0, 1) and Z (2, 3) the next largest. With X at t + 1 = 7, span [6, 8)
    wins the query score and is refined, so token 6 becomes a leaf delivering to position 6
    (docs/LIGHTHOUSE.md s.4, s.6); with X replaced, [0, 2) and [2, 4) are refined and [6, 8)
    stays a leaf delivering to 7 and 8 only. The output at t = 6 therefore changes with the
    input at t + 1, and so does the loss at 6."""
    recipe = _recipe(
        16, 1, 1, {"pool": 2, "levels": 2, "topk": 2, "tile_budget": 2}, [], seq_len=16
    )
    rt = runtime(recipe)
    torch.manual_seed(0)
    model = _model(recipe)
    x_token, y_token, z_token = 200, 201, 202
    attention = model.layers[0].attention
    with torch.no_grad():
        emb = model.tok_embeddings.weight
        emb[:, :3] = 0.0  # channels 0-2 carry only X, Y and Z
        for token, channel in ((x_token, 0), (y_token, 1), (z_token, 2)):
            emb[token] = 0.0
            emb[token, channel] = 1.0
        for proj in (attention.wq, attention.wk):
            proj.weight.mul_(0.01)
            proj.weight[:, 0], proj.weight[:, 1], proj.weight[:, 2] = 10.0, 3.0, 2.0
    # Y's span wins the query score without X; Z's the key score among the rest.
    with torch.no_grad():
        attention.wk.weight[:, 1] = 1.0
    tokens = torch.tensor(
        [
            y_token,
            y_token,
            z_token,
            z_token,
            10,
            11,
            12,
            x_token,
            14,
            15,
            16,
            17,
            18,
            19,
            20,
            21,
            22,
        ]
    )
    probe = LeakProbe(
        tokens[None, :-1],
        tokens[None, 1:],
        torch.tensor([6]),
        torch.tensor([13]),
        torch.tensor([[30, 31, 32]]),
    )
    lighthouse = probe_leak(model, rt, recipe, probe)
    assert abs(lighthouse["val/leak_next_token_nats"]) > 1e-4, lighthouse
    model.set_attention("dense")
    assert probe_leak(model, rt, recipe, probe) == {
        "val/leak_next_token_nats": 0.0,
        "val/leak_near_future_nats": 0.0,
    }


def test_selection_of_the_crafted_input_is_what_the_docstring_says():
    """The premise of the test above, checked on the selection itself."""
    from lh_cp import select

    cfg = LighthouseConfig(pool=2, levels=2, topk=2, tile_budget=2)
    q = torch.full((1, 16, 1, 4), 0.1)
    k = q.clone()
    q[0, 7], k[0, 7] = 100.0, 100.0  # X
    q[0, :2], k[0, :2] = 3.0, 3.0  # Y
    k[0, 2:4] = 2.5  # Z
    with_x = select(q, k, cfg)
    leaves_at_6 = ((with_x.start == 6) & (with_x.end == 7)).any()
    q[0, 7], k[0, 7] = 0.1, 0.1
    without_x = select(q, k, cfg)
    assert leaves_at_6 and not ((without_x.start == 6) & (without_x.end == 7)).any()


def test_leak_is_exactly_zero_with_the_causal_selection_in_lighthouse_mode(runtime):
    """docs/LIGHTHOUSE.md s.11: in Lighthouse mode too, with four tiles (the thresholds pass
    from tile to tile), the loss at t is bit-identical when the input at t+1 or nearby changes."""
    lighthouse = {"pool": 2, "levels": 3, "topk": 16, "tile_budget": 4, "selection": "causal"}
    recipe = _recipe(32, 3, 2, lighthouse, [0], seq_len=128)
    rt = runtime(recipe)
    torch.manual_seed(0)
    model = _model(recipe)
    stream = np.random.default_rng(1).integers(0, 256, size=6 * 128 + 1).astype(np.uint16)
    probe = make_probe(stream, 128, 7, seed=2)
    assert probe_leak(model, rt, recipe, probe) == {
        "val/leak_next_token_nats": 0.0,
        "val/leak_near_future_nats": 0.0,
    }
    # The same model with the paper's selection does leak on these rows.
    model.layers[1].attention.lighthouse = LighthouseConfig(
        pool=2, levels=3, topk=16, tile_budget=4
    )
    model.layers[2].attention.lighthouse = LighthouseConfig(
        pool=2, levels=3, topk=16, tile_budget=4
    )
    assert probe_leak(model, rt, recipe, probe)["val/leak_next_token_nats"] != 0.0


def test_other_documents_leak_is_zero_with_document_masking_and_not_without(runtime):
    """The cross-document probe: the documents before t' shuffled (end-of-document tokens kept,
    so the boundaries stay). With documents read off the tokens it is exactly 0 in Lighthouse
    and dense mode (docs/LIGHTHOUSE.md s.12); without masking the model reads them."""
    recipe = _recipe(
        32, 3, 2, {"pool": 2, "levels": 3, "topk": 16, "tile_budget": 4}, [0], seq_len=128
    )
    rt = runtime(recipe)
    torch.manual_seed(0)
    model = _model(recipe)
    eod = 256
    rng = np.random.default_rng(3)
    stream = rng.integers(0, 256, size=6 * 128 + 1)
    # documents of ~50 tokens: some hold whole 32-token tiles (regions), some none
    stream[rng.choice(len(stream), size=15, replace=False)] = eod
    probe = make_probe(stream.astype(np.uint16), 128, 6, seed=4, eod_id=eod)
    assert probe.document_rows >= 4
    clean, _ = probe.batch("documents_clean")
    changed, _ = probe.batch("other_documents")
    assert torch.equal(clean == eod, changed == eod) and not torch.equal(clean, changed)
    for mode in ("lighthouse", "dense"):
        model.set_attention(mode)
        masked = probe_leak(model, rt, recipe, probe, eod_id=eod)
        assert masked["val/leak_other_documents_nats"] == 0.0, mode
        unmasked = probe_leak(model, rt, recipe, probe)
        assert unmasked["val/leak_other_documents_nats"] != 0.0, mode
