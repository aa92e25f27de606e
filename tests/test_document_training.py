"""Document masking in the data, the model and the trainer.

- the loader's documents: a document ends with its end-of-document token, every window
  starts one, the end-of-document token's target is ignored;
- the model: with document masking and document positions, every document's logits equal
  those of the document run alone (float32, <= 1e-5: the same float32 arithmetic in another
  batch layout);
- `lh-cp train` with data.document_masking = true (dense stages): one process and torchrun
  CP = 2 (gloo) give the same losses (first steps rel 1e-5, float32 summation order only;
  later steps rel 1e-3, as AdamW amplifies it, as in tests/test_causal_training.py), a resumed
  run reproduces the uninterrupted one exactly, validation, the leak probe (exactly 0 in dense
  stages) and the passkey evaluation run with the same masking;
- a masked recipe with Lighthouse stages is refused by plan and train, naming the fix; the
  torchtitan conversion refuses masking.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_utils import logged_losses, tiny_recipe, tiny_recipe_dict, torchrun_train, write_toml

from lh_cp.data.loader import document_batch
from lh_cp.model.loss import IGNORE_INDEX
from lh_cp.model.transformer import ModelConfig, Transformer
from lh_cp.ops.documents import document_positions
from lh_cp.train.checkpoint import complete_checkpoints
from lh_cp.train.plan import check_recipe
from lh_cp.train.recipe import RecipeError
from lh_cp.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

# Every stage dense (Lighthouse takes no documents yet); the leak probe in dense stages (it
# must read exactly 0) and a small passkey evaluation, both through the masked path.
MASKED = [
    "data.document_masking=true",
    "stages.0.attention='dense'",
    "eval.leak_in_dense_stages=true",
    "eval.leak_positions=4",
    "eval.passkey.enabled=true",
    "eval.passkey.depths=[0.5]",
    "eval.passkey.samples=2",
    "eval.passkey.length=192",
]


def test_loader_documents_end_at_end_of_document_tokens():
    eod = 9
    inputs = torch.tensor([[1, 2, eod, 3, 4, 5, eod, 6], [7, eod, eod, 1, 2, 3, 4, 5]])
    targets = torch.cat([inputs[:, 1:], torch.tensor([[8], [eod]])], dim=1)
    batch = document_batch(inputs, targets, eod)
    assert batch.documents.dtype == torch.int32
    assert batch.documents.tolist() == [0, 3, 7, 8, 10, 11, 16]
    assert (batch.targets == IGNORE_INDEX).tolist() == (inputs == eod).tolist()
    assert torch.equal(batch.targets[inputs != eod], targets[inputs != eod])
    unmasked = document_batch(inputs, targets, None)
    assert unmasked.documents is None and unmasked.targets is targets


def test_model_documents_equal_each_document_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    model = Transformer(cfg)
    lengths = [[5, 1, 10], [16]]
    tokens = torch.randint(0, 32, (2, 16))
    bounds = [0, 5, 6, 16, 32]
    documents = torch.tensor(bounds, dtype=torch.int32)
    positions = document_positions(bounds, 2, 16)
    with torch.no_grad():
        packed = model(tokens, positions, documents=documents)  # [B, N, vocab]
        flat = packed.flatten(0, 1)
        for start, end in zip(bounds[:-1], bounds[1:]):
            alone = model(tokens.flatten()[start:end][None], torch.arange(end - start))
            assert (flat[start:end] - alone[0]).abs().max().item() <= 1e-5
        window = model(tokens, torch.arange(16), documents=documents)  # data.positions = "window"
        assert (window - packed).abs().max().item() <= 1e-5  # RoPE: relative positions only
    assert sum(map(sum, lengths)) == 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Short documents (about 50 bytes): several per 128-token window."""
    folder = tmp_path_factory.mktemp("short_docs")
    for f in range(160):
        (folder / f"doc_{f:03d}.txt").write_text(f"def f{f}(x):\n    return x * {f % 7} + {f}\n")
    return folder


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus):
    """The masked run on one process that the others are compared with."""
    out = tmp_path_factory.mktemp("single")
    summary = train(tiny_recipe(out, corpus, MASKED))
    assert sorted(summary.train_loss) == list(range(1, 7))
    assert summary.val_loss and summary.passkey is not None
    assert all(v["val/leak_next_token_nats"] == 0.0 for v in summary.leak.values()), summary.leak
    return summary


def _assert_same_losses(out: Path, single) -> None:
    losses = logged_losses(out)
    assert sorted(losses) == list(range(1, 7))
    for step in (1, 2):
        assert losses[step] == pytest.approx(single.train_loss[step], rel=1e-5)
    for step in range(3, 7):
        assert losses[step] == pytest.approx(single.train_loss[step], rel=1e-3)
    assert logged_losses(out, "val")[6] == pytest.approx(single.val_loss[6], rel=1e-3)
    assert logged_losses(out, "val", "val/leak_next_token_nats")[6] == 0.0


def test_masking_changes_the_loss_and_resumes_exactly(tmp_path, corpus, single):
    unmasked = train(tiny_recipe(tmp_path / "unmasked", corpus, MASKED[1:]))
    assert unmasked.train_loss[1] != single.train_loss[1]
    # 3 steps, stop, resume to 6: the uninterrupted losses, bit for bit.
    first = train(tiny_recipe(tmp_path, corpus, MASKED + ["run.stop_after_step=3"]))
    assert 3 in complete_checkpoints(tmp_path / "checkpoints")
    second = train(tiny_recipe(tmp_path, corpus, MASKED))
    assert second.resumed_from == 3
    assert {**first.train_loss, **second.train_loss} == single.train_loss


@pytest.mark.timeout(300)
def test_masked_training_under_cp2_equals_one_process(tmp_path, corpus, single):
    """torchrun CP = 2, FSDP2, head-tail shards with the ring exchange."""
    recipe_file = tmp_path / "tiny.toml"
    write_toml(recipe_file, tiny_recipe_dict(tmp_path / "unused", corpus))
    torchrun_train(recipe_file, tmp_path / "cp2", MASKED + ["parallel.cp=2"])
    _assert_same_losses(tmp_path / "cp2", single)


@pytest.mark.timeout(420)
def test_masked_training_under_deepspeed_ulysses_equals_one_process(tmp_path, corpus, single):
    """torchrun CP = 2, DeepSpeed ZeRO-3, contiguous shards with plain Ulysses (positions and
    documents through the contiguous layout and DeepSpeed's engine)."""
    pytest.importorskip("deepspeed", reason="needs DeepSpeed")
    recipe_file = tmp_path / "tiny.toml"
    write_toml(recipe_file, tiny_recipe_dict(tmp_path / "unused", corpus))
    ulysses = [
        "parallel.cp=2",
        "parallel.engine='deepspeed'",
        "parallel.zero_stage=3",
        "parallel.exchange='ulysses'",
        "parallel.dense_exchange='ulysses'",
    ]
    torchrun_train(recipe_file, tmp_path / "ds", MASKED + ulysses, timeout=400)
    _assert_same_losses(tmp_path / "ds", single)


def test_masked_recipe_with_lighthouse_stages_is_refused(tmp_path, corpus):
    recipe = tiny_recipe(tmp_path, corpus, ["data.document_masking=true"])
    problems = check_recipe(recipe)
    assert any(
        "data.document_masking=true, but stages.0 ('lighthouse') trains Lighthouse attention" in p
        and "--set stages.0.attention=dense" in p
        for p in problems
    ), problems
    with pytest.raises(
        RecipeError, match="Lighthouse attention with documents is not supported yet"
    ):
        train(recipe)
    # every layer dense in the Lighthouse stage: nothing to refuse
    all_dense = tiny_recipe(
        tmp_path, corpus, ["data.document_masking=true", "lighthouse.dense_layers=[0, 1, 2, 3, 4]"]
    )
    assert check_recipe(all_dense) == []
    bad = tiny_recipe(tmp_path, corpus, ["data.positions='absolute'"])
    assert "data.positions must be one of ('document', 'window'), got 'absolute'" in check_recipe(
        bad
    )


def test_torchtitan_conversion_refuses_document_masking(tmp_path, corpus):
    pytest.importorskip("torchtitan")
    from lh_cp.torchtitan.recipe_config import trainer_config_from_recipe

    recipe = tiny_recipe(tmp_path, corpus, MASKED)
    with pytest.raises(ValueError, match="data.document_masking=true cannot be converted"):
        trainer_config_from_recipe(recipe, 0)


def test_hugging_face_llama_takes_packed_documents_by_position_ids():
    """What docs/document_masking.md tells users of the exported model: transformers (5.x)
    masks packed documents when position_ids restart at 0 per document, no attention_mask is
    given and no cache is used; each document's logits then equal the document alone."""
    transformers = pytest.importorskip("transformers", minversion="5.0")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    lengths = [5, 1, 10]
    tokens = torch.randint(0, 32, (1, sum(lengths)))
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    with torch.no_grad():
        packed = model(tokens, position_ids=positions, use_cache=False).logits[0]
        start = 0
        for length in lengths:
            alone = model(tokens[:, start : start + length], use_cache=False).logits[0]
            assert (packed[start : start + length] - alone).abs().max().item() <= 1e-5
            start += length
