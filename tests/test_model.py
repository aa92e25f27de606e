"""The decoder: shapes, per-layer attention modes, dense switch without weight changes, RoPE
at explicit positions, causality, chunked loss, parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lh_cp.model.transformer import ModelConfig, Transformer, count_parameters
from lh_cp.ops.config import LighthouseConfig

CFG = ModelConfig(
    vocab_size=258, dim=64, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=96, loss_chunk_tokens=48
)
LH = LighthouseConfig(pool=2, levels=2, topk=16, tile_budget=4)  # T = 32 at N = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(lighthouse=LH, **kwargs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG, lighthouse, **kwargs).double()


def _tokens(n: int = 128, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 258, (batch, n), generator=torch.Generator().manual_seed(1))


def test_default_dense_layers_are_the_first_two_and_last_two():
    model = _model()
    assert isinstance(model.layers, torch.nn.ModuleList)
    assert model.attention_modes() == [
        "dense",
        "dense",
        "lighthouse",
        "lighthouse",
        "dense",
        "dense",
    ]
    assert (
        _model(dense_layers=(1,)).attention_modes() == ["lighthouse", "dense"] + ["lighthouse"] * 4
    )


def test_switch_to_dense_changes_no_weight_but_changes_the_output():
    model = _model()
    tokens = _tokens()
    positions = torch.arange(128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lighthouse_logits = model(tokens, positions)
    model.set_attention("dense")
    assert model.attention_modes() == ["dense"] * 6
    dense_logits = model(tokens, positions)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.allclose(lighthouse_logits, dense_logits)
    assert torch.allclose(dense_logits, _model(lighthouse=None)(tokens, positions))
    model.set_attention("lighthouse")
    assert torch.equal(model(tokens, positions), lighthouse_logits)
    with pytest.raises(ValueError, match="'lighthouse' or 'dense'"):
        model.set_attention("sparse")


def test_one_level_lighthouse_model_is_the_dense_model():
    """levels=1 makes every token a leaf: Lighthouse layers compute dense causal attention."""
    tokens, positions = _tokens(), torch.arange(128)
    one_level = _model(lighthouse=LighthouseConfig(pool=2, levels=1, topk=16, tile_budget=4))
    assert torch.allclose(
        one_level(tokens, positions), _model(lighthouse=None)(tokens, positions), atol=1e-10
    )


def test_rope_depends_only_on_relative_positions():
    """Shifting every global position by the same offset leaves attention, hence the logits,
    unchanged; positions that are not a shift of each other change them."""
    model = _model(lighthouse=None)
    tokens = _tokens()
    base = model(tokens, torch.arange(128))
    assert torch.allclose(model(tokens, torch.arange(128) + 100_000), base, atol=1e-8)
    head_tail = torch.cat([torch.arange(64), torch.arange(192, 256)])  # a CP shard's positions
    assert not torch.allclose(model(tokens, head_tail), base)


@pytest.mark.parametrize("mode", ["lighthouse", "dense"])
def test_causal(mode):
    model = _model()
    model.set_attention(mode)
    tokens = _tokens()
    changed = tokens.clone()
    changed[:, 100:] = (changed[:, 100:] + 7) % 258
    a, b = model(tokens, torch.arange(128)), model(changed, torch.arange(128))
    # Lighthouse selection may look ahead inside a tile (docs/quality.md: "What causal means here"),
    # never across a tile boundary; position 95 closes the tile [64, 96).
    last_safe = 99 if mode == "dense" else 95
    assert torch.allclose(a[:, : last_safe + 1], b[:, : last_safe + 1], atol=1e-12)
    assert not torch.allclose(a[:, 100:], b[:, 100:])


def test_chunked_loss_and_argmax_match_full_logits():
    model = _model()
    tokens, targets = _tokens(), _tokens().roll(1, dims=1)
    targets[0, :5] = -100
    positions = torch.arange(128)
    logits = model(tokens, positions)
    loss_sum, count = model(tokens, positions, targets)
    reference = F.cross_entropy(
        logits.reshape(-1, 258), targets.reshape(-1), reduction="sum", ignore_index=-100
    )
    assert count == 2 * 128 - 5 and torch.allclose(loss_sum.double(), reference)
    assert torch.equal(model(tokens, positions, predict=True), logits.argmax(-1))
    loss_sum.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gqa_tied_embeddings_and_parameter_count():
    tied = ModelConfig(
        vocab_size=300, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96, tie_embeddings=True
    )
    model = Transformer(tied)
    assert model.output is None and model.output_weight is model.tok_embeddings.weight
    assert model.layers[0].attention.wk.weight.shape == (2 * 8, 64)
    assert count_parameters(tied) == sum(p.numel() for p in model.parameters())
    logits = model(torch.zeros(1, 16, dtype=torch.int64), torch.arange(16))
    assert logits.shape == (1, 16, 300)
    with pytest.raises(ValueError, match="n_heads must be a multiple of model.n_kv_heads"):
        Transformer(ModelConfig(n_heads=4, n_kv_heads=3))
