"""`lh-cp export`: the trained dense model as a Hugging Face LlamaForCausalLM folder.

A tiny two-stage run (4 Lighthouse steps, 2 dense) in one process (FSDP2/DCP) and under 2
torchrun processes with DeepSpeed ZeRO-3 (CP=2) is exported in float32 and loaded by
transformers' AutoModelForCausalLM with no missing or unexpected keys. Checks:
- logits equal lh-cp's model on the same weights within 1e-5 (float32: only the order of
  float32 sums and RoPE's angle precision differ; observed ~2e-7), greedy continuations equal;
- the loss of the exported model on the run's validation batch equals the loss the run itself
  logged at its last step (1e-5 relative in one process; 1e-4 under CP=2, whose shards sum in
  another order), which checks the whole chain from the engine's checkpoint to transformers;
- the byte tokenizer round-trips text to lh-cp's own ids and back;
- a wrong RoPE layout is caught: the interleaved-pairs layout of q and k (as Meta's original
  Llama checkpoints store them) moves the logits by far more than the tolerance;
- a bad path, and a checkpoint from inside the Lighthouse stage, are refused naming the problem.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="needs transformers (pip install 'lh-cp[test]')")

from train_utils import (
    logged_losses,
    tiny_recipe,
    tiny_recipe_dict,
    torchrun_train,
    write_corpus,
    write_toml,
)  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lh_cp.cli import main  # noqa: E402
from lh_cp.data.loader import BatchLoader, make_tokenizer, token_stream  # noqa: E402
from lh_cp.data.tokenizer import ByteTokenizer  # noqa: E402
from lh_cp.export import ExportError, export_hf, find_checkpoint, load_weights, model_config  # noqa: E402
from lh_cp.model.transformer import Transformer  # noqa: E402
from lh_cp.train.recipe import load_recipe  # noqa: E402
from lh_cp.train.trainer import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LOGIT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("export_corpus"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("export_fsdp")
    train(tiny_recipe(out, corpus))
    return out


def _lh_cp_model(folder: Path) -> Transformer:
    flat = json.loads((folder / "manifest.json").read_text())["recipe"]
    cfg = model_config(flat)
    model = Transformer(cfg)
    model.load_state_dict(load_weights(folder, cfg))
    return model.eval()


def _validation_loss(hf_model, recipe) -> float:
    """The exported model's mean token loss on the run's first validation batch."""
    data = recipe.data
    stream = token_stream(data, make_tokenizer(data), "validation")
    inputs, targets, _ = BatchLoader(
        stream, data.seq_len, data.batch_size, 0, 1, data.seed, shuffle=False
    ).next_batch()
    with torch.no_grad():
        logits = hf_model(inputs).logits
    return float(F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten()))


def _greedy(step_logits, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        tokens = torch.cat([tokens, step_logits(tokens)[:, -1:].argmax(-1)], dim=1)
    return tokens


def test_exported_model_equals_lh_cp(fsdp_run, corpus, tmp_path):
    out = tmp_path / "hf"
    folder = export_hf(fsdp_run, out, dtype="float32")
    assert folder == fsdp_run / "checkpoints" / "step_00000006"
    hf, info = AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32
    )
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (
        info["missing_keys"] == set()
        and info["unexpected_keys"] == set()
        and info["mismatched_keys"] == set()
    )
    model = _lh_cp_model(folder)
    tokens = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens, torch.arange(96)), hf(tokens).logits
        assert (ours - theirs).abs().max().item() <= LOGIT_TOLERANCE
        prompt = tokens[:1, :24]
        hf_greedy = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=257)
        ours_greedy = _greedy(lambda t: model(t, torch.arange(t.shape[1])), prompt, 20)
    assert torch.equal(hf_greedy, ours_greedy)
    recipe = tiny_recipe(fsdp_run, corpus)
    logged = logged_losses(fsdp_run, "val")[6]
    assert _validation_loss(hf, recipe) == pytest.approx(logged, rel=1e-5)


def test_byte_tokenizer_round_trips(fsdp_run, tmp_path):
    export_hf(fsdp_run, tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "déf f(x):\n    return x  # ✓ \x00\t"
    assert tokenizer.encode(text) == ByteTokenizer().encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        ByteTokenizer.eod_id,
        ByteTokenizer.pad_id,
    )
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16  # the default export dtype


def _interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows from rotate-half order (x1 .. x_{D/2}, y1 ..) to interleaved pairs
    (x1, y1, x2, y2, ..) per head: the other RoPE layout."""
    dim = weight.shape[0] // heads
    return weight.view(heads, 2, dim // 2, -1).transpose(1, 2).reshape(weight.shape)


def test_a_permuted_rope_layout_would_be_caught(fsdp_run, tmp_path):
    export_hf(fsdp_run, tmp_path / "hf", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    model = _lh_cp_model(fsdp_run / "checkpoints" / "step_00000006")
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in hf.model.layers:
            attention = layer.self_attn
            attention.q_proj.weight.copy_(
                _interleave(attention.q_proj.weight, hf.config.num_attention_heads)
            )
            attention.k_proj.weight.copy_(
                _interleave(attention.k_proj.weight, hf.config.num_key_value_heads)
            )
        moved = (model(tokens, torch.arange(64)) - hf(tokens).logits).abs().max().item()
    # 1.4e-3 on this barely trained model: over 100x the tolerance the export is held to.
    assert moved > 10 * LOGIT_TOLERANCE, moved


def test_bad_path_and_lighthouse_stage_are_refused(fsdp_run, corpus, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"/no/such/run does not exist"):
        find_checkpoint(Path("/no/such/run"))
    stage1 = tmp_path / "stage1"
    train(tiny_recipe(stage1, corpus, ["run.stop_after_step=4"]))
    with pytest.raises(
        ExportError,
        match=r"step_00000004 \(step 4\) is from stage 1 'lighthouse', which trains with "
        r"lighthouse attention",
    ):
        export_hf(stage1, tmp_path / "out")
    assert main(["export", str(stage1), "--hf", str(tmp_path / "out")]) == 2
    assert "lh-cp export: error: checkpoint" in capsys.readouterr().err
    export_hf(stage1, tmp_path / "forced", allow_lighthouse_stage=True)  # on request
    assert main(["export", str(fsdp_run), "--hf", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()


def test_a_checkpoint_without_manifest_needs_the_recipe(fsdp_run, corpus, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(fsdp_run / "checkpoints" / "step_00000006", legacy / "step_00000006")
    (legacy / "step_00000006" / "manifest.json").unlink()
    with pytest.raises(ExportError, match="has no manifest.json .* give --recipe"):
        export_hf(legacy, tmp_path / "out")
    recipe_file = tmp_path / "tiny.toml"
    write_toml(recipe_file, tiny_recipe_dict(fsdp_run, corpus))
    export_hf(legacy, tmp_path / "out", recipe=load_recipe(recipe_file), dtype="float32")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 5


@pytest.mark.timeout(420)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_a_deepspeed_zero3_checkpoint_exports(corpus, tmp_path):
    recipe_file = tmp_path / "tiny.toml"
    write_toml(recipe_file, tiny_recipe_dict(tmp_path / "unused", corpus))
    out = tmp_path / "deepspeed"
    overrides = [
        "parallel.cp=2",
        "lighthouse.topk=16",
        "parallel.engine='deepspeed'",
        "parallel.zero_stage=3",
    ]
    torchrun_train(recipe_file, out, overrides, timeout=400)
    export_hf(out, tmp_path / "hf", dtype="float32")
    hf, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, dtype=torch.float32
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    recipe = load_recipe(recipe_file, overrides + [f"run.out_dir='{out}'"])
    assert _validation_loss(hf, recipe) == pytest.approx(logged_losses(out, "val")[6], rel=1e-4)
