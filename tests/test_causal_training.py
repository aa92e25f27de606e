"""The trainer with lighthouse.selection = "causal": CP = 2 over two torchrun processes (gloo)
trains as one process does, and the leak metric of the Lighthouse stage is exactly zero."""

from __future__ import annotations

import pytest
from train_utils import (
    logged_losses,
    tiny_recipe,
    tiny_recipe_dict,
    torchrun_train,
    write_corpus,
    write_toml,
)

from lh_cp.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

# tile 16 in a 128-token sequence: 8 tiles, 2 per head-tail chunk under CP = 2, and 4 top-level
# spans per tile for a budget of 2, so the thresholds (and their carry across ranks) decide.
CAUSAL = [
    "lighthouse.pool=2",
    "lighthouse.levels=3",
    "lighthouse.topk=16",
    "lighthouse.tile_budget=2",
    "lighthouse.selection='causal'",
    "eval.val_interval=4",
]


@pytest.mark.timeout(300)
def test_causal_selection_trains_the_same_under_cp2_and_does_not_leak(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    single_out = tmp_path / "single"
    single = train(tiny_recipe(single_out, corpus, CAUSAL))
    recipe_file = tmp_path / "tiny.toml"
    write_toml(recipe_file, tiny_recipe_dict(tmp_path / "unused", corpus))
    cp_out = tmp_path / "cp2"
    torchrun_train(recipe_file, cp_out, CAUSAL + ["parallel.cp=2"])
    cp_losses = logged_losses(cp_out)
    assert sorted(cp_losses) == sorted(single.train_loss) == list(range(1, 7))
    for step in (1, 2):  # float32 summation order only; later steps let AdamW amplify it
        assert cp_losses[step] == pytest.approx(single.train_loss[step], rel=1e-5)
    for step in range(3, 7):
        assert cp_losses[step] == pytest.approx(single.train_loss[step], rel=1e-3)
    for out in (single_out, cp_out):
        leak = logged_losses(out, "val", "val/leak_next_token_nats")
        near = logged_losses(out, "val", "val/leak_near_future_nats")
        assert leak[4] == 0.0 and near[4] == 0.0, (out.name, leak, near)
