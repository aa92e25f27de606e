"""parallel.compile = true: each decoder block under torch.compile (inductor, CPU), CP=2 on gloo
through torchrun, 3 steps (2 Lighthouse, 1 dense), against the same run eager.

Tolerance: 1e-5 relative on every logged loss. Inductor may fuse and reorder float32 work
inside the blocks (norms, SwiGLU, residuals); attention is not compiled (one opaque call,
lh_cp.ops.attention.SingleDevice / ContextParallel), so only those reorderings can differ. Observed:
identical losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch._dynamo
from train_utils import logged_losses, tiny_recipe_dict, torchrun_train, write_corpus, write_toml

from lh_cp.model.transformer import ModelConfig, Transformer, rope_tables
from lh_cp.ops.config import LighthouseConfig

CP2 = ["parallel.cp=2", "lighthouse.topk=16", "eval.leak=false"]


@pytest.mark.timeout(600)
def test_compiled_blocks_train_as_eager(tmp_path):
    recipe_file = tmp_path / "tiny.toml"
    write_toml(
        recipe_file,
        tiny_recipe_dict(
            tmp_path / "unused",
            write_corpus(tmp_path / "corpus"),
            lighthouse_steps=2,
            dense_steps=1,
        ),
    )
    torchrun_train(recipe_file, tmp_path / "eager", CP2)
    torchrun_train(recipe_file, tmp_path / "compiled", CP2 + ["parallel.compile=true"], timeout=560)
    eager, compiled = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), step


def block_graph_breaks() -> dict[str, tuple[int, int, set[str]]]:
    """mode -> (graphs, graph-break records, break locations) of one decoder block under dynamo."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128)
    model = Transformer(cfg, LighthouseConfig(pool=2, levels=2, topk=8, tile_budget=4), (0, -1))
    x = torch.randn(2, 128, cfg.dim)
    cos, sin = rope_tables(torch.arange(128), cfg.head_dim, cfg.rope_theta, x.dtype)
    found = {}
    for layer in model.layers:
        explained = torch._dynamo.explain(layer)(x, cos, sin)
        # Where each break happened: the innermost frame of lh-cp code.
        reasons = {
            f"{Path(b.user_stack[-1].filename).name}:{b.user_stack[-1].name}"
            for b in explained.break_reasons
        }
        found[layer.attention.mode] = (explained.graph_count, explained.graph_break_count, reasons)
        torch._dynamo.reset()
    return found


def test_a_compiled_block_breaks_only_at_attention():
    """Dense block: one graph. Lighthouse block: its graph stops only at the attention call
    (three break records: the call, and the two module frames around it), never inside the
    selection; before the attention call was made opaque there were 12."""
    found = block_graph_breaks()
    assert found["dense"][:2] == (1, 0)
    graphs, breaks, reasons = found["lighthouse"]
    assert (graphs, breaks) == (4, 3), found
    assert reasons == {"attention.py:call"}, reasons  # lh_cp.ops.attention.opaque_to_compile


def test_checkpointed_blocks_are_compiled():
    """activation_checkpoint and compile together: the blocks' graphs are compiled. Compiled
    outside the checkpoint (the order before issue 18) dynamo captured no graph at all: the
    break at attention inside the checkpointed region sent the whole block to eager."""
    from torch._dynamo.utils import counters

    from lh_cp.parallel import checkpoint_and_compile
    from lh_cp.train.recipe import ParallelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    model = Transformer(cfg, LighthouseConfig(pool=2, levels=2, topk=8, tile_budget=4), (0,))
    checkpoint_and_compile(model, ParallelConfig(activation_checkpoint=True, compile=True))
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(2, 128, cfg.dim, requires_grad=True)
    cos, sin = rope_tables(torch.arange(128), cfg.head_dim, cfg.rope_theta, x.dtype)
    model.layers[1](x, cos, sin).sum().backward()
    assert counters["stats"]["unique_graphs"] >= 2  # before and after the Lighthouse call
    torch._dynamo.reset()
