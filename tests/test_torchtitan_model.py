"""torchtitan's llama3 model with Lighthouse inner attention equals lh-cp's own model.

Same weights (moved by the state-dict mapping), same tokens: logits, loss and every gradient
agree in float32 within 1e-6 absolute. Both models run the same lh-cp attention functions and
the same float64-angle RoPE table; only the order of a few float32 sums may differ (fused
q/k/v projection, RMSNorm), so observed logits are identical and gradients (|g| <= 0.03)
differ by at most 2e-8.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "torchtitan", reason="torchtitan is not installed (pip install 'lh-cp[torchtitan]')"
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchtitan_utils import (
    batch,
    build_lh_cp_twin,
    build_torchtitan_model,
    grads_by_state_dict_key,
)  # noqa: E402

from lh_cp.torchtitan.config_registry import lighthouse_debugmodel, lighthouse_debugmodel_recovery  # noqa: E402
from lh_cp.torchtitan.inner_attention import LighthouseInnerAttention  # noqa: E402
from lh_cp.torchtitan.state_dict import lh_cp_to_torchtitan, torchtitan_to_lh_cp  # noqa: E402

ATOL = 1e-6


def _modes(model) -> list[str]:
    return [m.mode for m in model.modules() if isinstance(m, LighthouseInnerAttention)]


def _loss_and_grads(logits: torch.Tensor, labels: torch.Tensor, model) -> tuple[float, dict]:
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return loss.item(), grads_by_state_dict_key(model)


def _compare(config, titan) -> tuple[torch.Tensor, torch.Tensor]:
    twin = build_lh_cp_twin(config, titan)
    tokens, labels, positions = batch(config)
    titan_logits = titan(tokens, positions=positions)
    twin_logits = twin(tokens, positions[0])
    assert (titan_logits - twin_logits).abs().max().item() <= ATOL
    titan_loss, titan_grads = _loss_and_grads(titan_logits, labels, titan)
    twin_loss, twin_grads = _loss_and_grads(twin_logits, labels, twin)
    assert abs(titan_loss - twin_loss) <= ATOL
    mapped = torchtitan_to_lh_cp(titan_grads, config.model.tie_embeddings)
    assert mapped.keys() == twin_grads.keys()
    for name, grad in mapped.items():
        assert (grad - twin_grads[name]).abs().max().item() <= ATOL, name
    return titan_logits.detach(), twin_logits.detach()


def test_debugmodel_builds_with_lighthouse_in_all_but_first_two_and_last_two_layers():
    config = lighthouse_debugmodel()
    titan = build_torchtitan_model(config)
    assert _modes(titan) == ["dense", "dense", "lighthouse", "lighthouse", "dense", "dense"]
    assert type(titan).__name__ == "Llama3Model"
    titan.verify_module_protocol()  # the check torchtitan's Trainer runs right after building
    tables = {layer.attention.rope.cache.data_ptr() for layer in titan.layers.values()}
    assert len(tables) == 1, "layers of one model share a single RoPE table"


def test_debugmodel_forward_backward_equals_lh_cp_model():
    config = lighthouse_debugmodel()
    _compare(config, build_torchtitan_model(config))


def test_recovery_config_switches_every_layer_to_dense_without_changing_weights():
    stage1 = build_torchtitan_model(lighthouse_debugmodel(), seed=0)
    config = lighthouse_debugmodel_recovery()
    recovery = build_torchtitan_model(config, seed=7)
    weights = {k: v.clone() for k, v in stage1.state_dict().items()}
    recovery.load_state_dict(weights, strict=True)
    assert _modes(recovery) == ["dense"] * 6
    for key, value in recovery.state_dict().items():
        assert torch.equal(value, weights[key]), key
    dense_logits, _ = _compare(config, recovery)
    tokens, _, positions = batch(config)
    with torch.no_grad():
        lighthouse_logits = stage1(tokens, positions=positions)
    # The switch changes the attention function: Lighthouse and dense outputs differ.
    assert (lighthouse_logits - dense_logits).abs().max().item() > 1e-3


def test_state_dict_mapping_round_trip_and_tied_embeddings():
    config = lighthouse_debugmodel()
    titan = build_torchtitan_model(config)
    twin = build_lh_cp_twin(config, titan)
    mapped = lh_cp_to_torchtitan(twin.state_dict())
    assert mapped.keys() == titan.state_dict().keys()
    for key, value in titan.state_dict().items():
        assert torch.equal(mapped[key], value), key
    tied = {k: v for k, v in twin.state_dict().items() if k != "output.weight"}
    mapped_tied = lh_cp_to_torchtitan(tied, tie_embeddings=True)
    assert mapped_tied["lm_head.weight"] is mapped_tied["tok_embeddings.weight"]
    assert "output.weight" not in torchtitan_to_lh_cp(mapped_tied, tie_embeddings=True)
    with pytest.raises(ValueError, match="layers.0.attention.bias"):
        lh_cp_to_torchtitan({"layers.0.attention.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="tie_embeddings=True but"):
        lh_cp_to_torchtitan(twin.state_dict(), tie_embeddings=True)


def test_inner_attention_takes_varlen_document_masks_in_dense_layers():
    """torchtitan's VarlenMetadata of per-document positions is lh-cp's documents=: a dense
    layer equals causal_attention with those documents; a Lighthouse layer refuses it."""
    from torchtitan.models.common.attention import create_varlen_metadata_for_document

    from lh_cp import causal_attention

    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    masks = create_varlen_metadata_for_document(positions)
    assert masks.cu_seq_q.tolist() == [0, 3, 8, 16]
    q, k, v = (torch.randn(2, 8, 2, 4) for _ in range(3))
    dense = LighthouseInnerAttention.Config(mode="dense").build()
    want = causal_attention(q, k, v, documents=masks.cu_seq_q)
    assert torch.equal(dense(q, k, v, attention_masks=masks), want)
    lighthouse = LighthouseInnerAttention.Config(mode="lighthouse").build()
    with pytest.raises(ValueError, match="Lighthouse attention with documents= is not supported"):
        lighthouse(q, k, v, attention_masks=masks)


def test_inner_attention_rejects_masks_and_foreign_scale():
    module = LighthouseInnerAttention.Config(mode="dense").build()
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="got object: a FlexAttention BlockMask holds"):
        module(q, q, q, attention_masks=object())
    with pytest.raises(ValueError, match="scale=0.1"):
        module(q, q, q, scale=0.1)
    with pytest.raises(ValueError, match="mode=.sparse."):
        LighthouseInnerAttention.Config(mode="sparse")
