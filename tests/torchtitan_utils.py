"""Shared pieces of the torchtitan integration tests: models built from one config, same weights."""

from __future__ import annotations

import copy

import torch

from lh_cp.model.transformer import Transformer
from lh_cp.torchtitan.state_dict import lh_cp_to_torchtitan, torchtitan_to_lh_cp


def build_torchtitan_model(config, seed: int = 0) -> torch.nn.Module:
    """The model torchtitan's Trainer would build from `config`: meta device, then CPU, then init."""
    model_config = config.model_spec.model
    model_config.update_from_config(config=config)
    with torch.device("meta"):
        model = model_config.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model


def build_lh_cp_twin(config, titan: torch.nn.Module) -> Transformer:
    """lh-cp's own model of the same shape and attention, holding `titan`'s weights."""
    dense = config.stage.attention == "dense"
    model = Transformer(
        config.model,
        None if dense else config.lighthouse.config(),
        dense_layers=tuple(config.lighthouse.dense_layers),
    )
    model.load_state_dict(
        torchtitan_to_lh_cp(titan.state_dict(), config.model.tie_embeddings), strict=True
    )
    return model


def grads_by_state_dict_key(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients keyed like model.state_dict(): a copy whose weights are the gradients, so the
    model's own state-dict hooks (torchtitan's fused wqkv -> wq/wk/wv) apply to them."""
    shadow = copy.deepcopy(model)
    with torch.no_grad():
        for param, source in zip(shadow.parameters(), model.parameters(), strict=True):
            param.copy_(source.grad)
    return shadow.state_dict()


def batch(config, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, labels [B, N] and positions [B, N] (global index, as LhCpDataLoader yields)."""
    gen = torch.Generator().manual_seed(seed)
    b, n, vocab = config.training.local_batch_size, config.training.seq_len, config.model.vocab_size
    tokens = torch.randint(0, vocab, (b, n), generator=gen)
    labels = torch.randint(0, vocab, (b, n), generator=gen)
    return tokens, labels, torch.arange(n).expand(b, n)


__all__ = [
    "batch",
    "build_lh_cp_twin",
    "build_torchtitan_model",
    "grads_by_state_dict_key",
    "lh_cp_to_torchtitan",
]
