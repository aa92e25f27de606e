"""`lh-cp export CHECKPOINT --hf OUT_DIR`: the trained dense model as a Hugging Face folder.

The shipped model is the dense one (docs/LIGHTHOUSE.md s.9): lh-cp's Transformer is a Llama-3
decoder, so the export is a `LlamaForCausalLM` folder that `transformers.AutoModelForCausalLM
.from_pretrained(OUT_DIR)` loads with no missing or unexpected keys: config.json (heads, KV
heads, head dim, FFN width, RMSNorm eps, RoPE base, tied or not), model.safetensors (bfloat16 or
float32) and the tokenizer (a copy of the run's Hugging Face tokenizer, or for lh-cp's byte
tokenizer a byte-level tokenizer.json with the same ids: bytes 0-255, end-of-document 256, pad
257). Weights are copied without permutation: lh-cp rotates the two halves of each head
(apply_rope), which is Hugging Face Llama's rotate_half convention; tests/test_export.py
compares logits, and shows that the interleaved-pairs layout would not match.

CHECKPOINT is a step folder, a checkpoints folder or a run folder (its newest checkpoint that
verifies), from either engine (a DCP folder of FSDP2, or DeepSpeed's ZeRO files). The model's
shape comes from the checkpoint's manifest, or from --recipe for folders written before
manifests. A checkpoint from inside a Lighthouse stage is refused: that model was trained to
attend through the selection and scores far worse with every layer dense (docs/quality.md);
export a checkpoint of the dense recovery stage, or pass allow_lighthouse_stage.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from lh_cp.model.transformer import ModelConfig, Transformer
from lh_cp.train.checkpoint import (
    MANIFEST,
    PARTIAL,
    checkpoint_engine,
    newest_verified,
    unwrapped_name,
    verify_checkpoint,
)
from lh_cp.train.recipe import Recipe, RecipeError, stage_containing

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class ExportError(ValueError):
    """What keeps a checkpoint from being exported, named with the path."""


def _to_stderr(line: str) -> None:
    print(f"lh-cp export: {line}", file=sys.stderr)


def find_checkpoint(path: Path, say=_to_stderr) -> Path:
    """The step folder `path` names: itself, or the newest verifying one under it (a
    checkpoints folder, or a run folder holding checkpoints/). Newer folders passed over (they
    failed verification, or are unfinished `.partial` saves) are named through `say` with the
    reason; an unfinished save given by name is refused."""
    path = Path(path)
    if not path.exists():
        raise ExportError(
            f"{path} does not exist (give a step folder, a checkpoints folder or a run folder)"
        )
    if path.name.endswith(PARTIAL):
        raise ExportError(
            f"{path} is an unfinished save (a run stopped while writing it, so its name still ends "
            f"in {PARTIAL}): it is not a checkpoint; give a finished step folder, or the run folder "
            f"for its newest checkpoint that verifies"
        )
    if (path / MANIFEST).is_file() or checkpoint_engine(path) is not None:
        verdict = verify_checkpoint(path)
        if not verdict.ok:
            raise ExportError(f"checkpoint {path} failed verification: {verdict.reason}")
        return path
    for root in (path, path / "checkpoints"):
        found, failed = newest_verified(root)
        newest = found[0] if found is not None else -1
        for partial in sorted(root.glob(f"step_*{PARTIAL}")) if root.is_dir() else ():
            step = partial.name[len("step_") : -len(PARTIAL)]
            if step.isdigit() and int(step) > newest:
                say(f"skipped {partial}: an unfinished save (a run stopped while writing it)")
        for skipped, reason in failed:
            say(f"skipped {skipped}: it failed verification: {reason}")
        if found is not None:
            return found[1]
        if failed:
            raise ExportError(
                "no checkpoint verifies; tried:\n  "
                + "\n  ".join(f"{p}: {reason}" for p, reason in failed)
            )
    raise ExportError(
        f"{path} holds no checkpoint (no step_XXXXXXXX folder here or in {path / 'checkpoints'})"
    )


def _flat_recipe(recipe: Recipe) -> dict:
    from lh_cp.train.runtime import run_fingerprint

    return run_fingerprint(recipe, 1)


def _describe(folder: Path, recipe: Recipe | None) -> tuple[int, dict]:
    """(step, flattened recipe) of a checkpoint: from its manifest, or from `recipe`."""
    manifest = (
        json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else None
    )
    if recipe is not None:
        flat = _flat_recipe(recipe)
    elif manifest is not None and manifest.get("recipe"):
        flat = manifest["recipe"]
    else:
        raise ExportError(
            f"checkpoint {folder} has no {MANIFEST} (written before manifests): give --recipe, the "
            f"recipe it was trained with, for the model's shape"
        )
    if manifest is not None:
        step = int(manifest["step"])
    elif folder.name.startswith("step_") and folder.name[5:].isdigit():
        step = int(folder.name[5:])
    else:
        raise ExportError(
            f"cannot tell the step of {folder} (no manifest, not a step_XXXXXXXX folder)"
        )
    return step, flat


def model_config(flat: dict) -> ModelConfig:
    fields = {
        key.removeprefix("model."): value for key, value in flat.items() if key.startswith("model.")
    }
    return ModelConfig(**fields)


def stage_of(step: int, flat: dict) -> tuple[int, str, str]:
    """(index, name, attention) of the stage global step `step` lies in (the last one if past),
    from the flattened recipe ('stages.0.name', ...)."""
    stages, i = [], 0
    while f"stages.{i}.steps" in flat:
        stages.append(
            (
                flat[f"stages.{i}.name"],
                flat[f"stages.{i}.attention"],
                int(flat[f"stages.{i}.steps"]),
            )
        )
        i += 1
    if not stages:
        raise ExportError("the recipe names no stages")
    index = stage_containing(step, [steps for _, _, steps in stages])
    return index, stages[index][0], stages[index][1]


def load_weights(folder: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lh-cp parameter name -> full float32 tensor, from a DCP or a DeepSpeed checkpoint, in this
    process (no process group)."""
    engine = checkpoint_engine(folder)
    if engine == "fsdp":
        import torch.distributed.checkpoint as dcp

        with torch.device("cpu"):
            model = Transformer(cfg)
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
        return {name: tensor.float() for name, tensor in state["model"].items()}
    if engine == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        return {unwrapped_name(name): tensor.float() for name, tensor in state.items()}
    raise ExportError(
        f"{folder} holds neither a DCP (.metadata) nor a DeepSpeed (*_model_states.pt) checkpoint"
    )


def hf_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lh-cp names -> LlamaForCausalLM names, every tensor as is (same layouts: nn.Linear
    [out, in]; q and k heads in rotate-half order, as Hugging Face Llama expects)."""
    renames = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    out = {}
    for name, tensor in weights.items():
        if name in renames:
            out[renames[name]] = tensor
            continue
        parts = name.split(".")
        if parts[0] != "layers" or len(parts) < 4:
            raise ExportError(
                f"unexpected parameter {name!r} in the checkpoint (not an lh-cp Transformer?)"
            )
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        if module not in per_layer:
            raise ExportError(
                f"unexpected parameter {name!r} in the checkpoint (not an lh-cp Transformer?)"
            )
        out[f"model.layers.{parts[1]}.{per_layer[module]}.{leaf}"] = tensor
    expected = 2 + (0 if cfg.tie_embeddings else 1) + 9 * cfg.n_layers
    if len(out) != expected:
        raise ExportError(
            f"the checkpoint holds {len(out)} model tensors, an lh-cp Transformer of this shape has {expected}"
        )
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of GPT-2-style tokenizers: printable bytes map to themselves,
    the other 68 to the code points from 256 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def write_byte_tokenizer(out_dir: Path) -> None:
    """A tokenizer transformers loads that encodes text exactly as lh-cp's ByteTokenizer: UTF-8
    bytes as ids 0-255 (a byte-level BPE with no merges), end-of-document 256, pad 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lh_cp.data.tokenizer import ByteTokenizer

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    eod, pad = "<|end_of_text|>", "<|pad|>"
    tokenizer.add_special_tokens([eod, pad])
    ids = tokenizer.token_to_id(eod), tokenizer.token_to_id(pad)
    if ids != (ByteTokenizer.eod_id, ByteTokenizer.pad_id):
        raise ExportError(
            f"byte tokenizer special ids {ids} differ from lh-cp's {(ByteTokenizer.eod_id, ByteTokenizer.pad_id)}"
        )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eod, pad_token=pad
    ).save_pretrained(str(out_dir))


def write_hf_tokenizer(path: str, eod_token: str, pad_token: str, out_dir: Path) -> None:
    """The run's own Hugging Face tokenizer.json, copied, with its end and pad tokens named."""
    from transformers import PreTrainedTokenizerFast

    source = Path(path)
    file = source / "tokenizer.json" if source.is_dir() else source
    if not file.is_file():
        raise ExportError(
            f"the run's tokenizer {path!r} is not on this machine (data.tokenizer); it is copied into the export"
        )
    shutil.copy(file, out_dir / "tokenizer.json")
    PreTrainedTokenizerFast(
        tokenizer_file=str(out_dir / "tokenizer.json"),
        eos_token=eod_token or None,
        pad_token=pad_token or eod_token or None,
    ).save_pretrained(str(out_dir))


def export_hf(
    checkpoint: Path,
    out_dir: Path,
    recipe: Recipe | None = None,
    dtype: str = "bfloat16",
    allow_lighthouse_stage: bool = False,
    say=_to_stderr,
) -> Path:
    """Write the Hugging Face folder; returns the step folder it was made from. Checkpoints
    passed over on the way are named through `say` (find_checkpoint)."""
    try:
        from safetensors.torch import save_file
        from transformers import LlamaConfig
    except ImportError as err:
        raise ImportError(
            "lh-cp export needs 'transformers' and 'safetensors' (pip install 'lh-cp[hf]')"
        ) from err
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    folder = find_checkpoint(checkpoint, say)
    step, flat = _describe(folder, recipe)
    index, name, attention = stage_of(step, flat)
    if attention != "dense" and not allow_lighthouse_stage:
        raise ExportError(
            f"checkpoint {folder} (step {step}) is from stage {index + 1} {name!r}, which trains with {attention} "
            f"attention: the shipped model is the dense one after the recovery stage, and a Lighthouse-stage model "
            f"scores far worse with every layer dense; export a checkpoint of a dense stage (or pass "
            f"--allow-lighthouse-stage to export this one anyway)"
        )
    cfg = model_config(flat)
    try:
        cfg.validate()
    except ValueError as err:
        raise RecipeError(f"the model of checkpoint {folder}: {err}") from None
    tensors = hf_state_dict(load_weights(folder, cfg), cfg)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=int(flat.get("data.seq_len", 2048)),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        torch_dtype=dtype,
    )
    byte_level = flat.get("data.tokenizer", "bytes") == "bytes"
    if byte_level:
        from lh_cp.data.tokenizer import ByteTokenizer

        # No beginning-of-sequence token in lh-cp's byte vocabulary (LlamaConfig defaults to 1, a byte).
        config.bos_token_id, config.eos_token_id, config.pad_token_id = (
            None,
            ByteTokenizer.eod_id,
            ByteTokenizer.pad_id,
        )
    config.save_pretrained(str(out_dir))
    save_file(
        {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if byte_level:
        write_byte_tokenizer(out_dir)
    else:
        write_hf_tokenizer(
            flat["data.tokenizer"],
            flat.get("data.eod_token", ""),
            flat.get("data.pad_token", ""),
            out_dir,
        )
    (out_dir / "lh_cp_export.json").write_text(
        json.dumps(
            {"checkpoint": str(folder), "step": step, "stage": name, "dtype": dtype}, indent=1
        )
        + "\n"
    )
    return folder
