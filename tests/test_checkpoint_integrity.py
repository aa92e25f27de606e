"""Checkpoint integrity (lh_cp/train/checkpoint.py): manifests, verification, fallback on resume,
checkpoints that do not fit the run, and resharding.

Two runs of 2 torchrun processes on gloo (CP=2, the tiny two-stage recipe, checkpoints at
steps 2, 4 and 6), one per engine (FSDP2/DCP and DeepSpeed ZeRO-3), provide real folders.
Every corruption is applied to a copy and must fail verification with a reason naming it; a
resume falls back past corrupt folders to the newest that verifies and then repeats the
uninterrupted run's losses exactly (the exact-resume guarantee of tests/test_train.py).
Resharding CP=2 -> CP=1: the first resumed step is the same batch through the same weights,
so its loss matches the CP=2 run's to float32 summation order (1e-5 relative, as
tests/test_quickstart.py argues); the second within 1e-3 (AdamW amplifies rounding).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from train_utils import logged_losses, tiny_recipe_dict, torchrun_train, write_corpus, write_toml

from lh_cp.train.checkpoint import (
    MANIFEST,
    checkpoint_path,
    complete_checkpoints,
    verify_checkpoint,
)
from lh_cp.train.recipe import load_recipe
from lh_cp.train.trainer import train

CP2 = ["parallel.cp=2", "lighthouse.topk=16", "checkpoint.interval=2", "checkpoint.keep_last=5"]
ENGINES = {"fsdp": [], "deepspeed": ["parallel.engine='deepspeed'", "parallel.zero_stage=3"]}
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed"
)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("integrity")
    path = folder / "tiny.toml"
    write_toml(path, tiny_recipe_dict(folder / "unused", write_corpus(folder / "corpus")))
    return path


@pytest.fixture(scope="module")
def runs(recipe_file):
    """engine -> the run folder of the uninterrupted 6-step run (built on first use)."""
    built = {}

    def get(engine: str) -> Path:
        if engine not in built:
            out = recipe_file.parent / engine
            torchrun_train(recipe_file, out, CP2 + ENGINES[engine], timeout=420)
            assert sorted(complete_checkpoints(out / "checkpoints")) == [2, 4, 6]
            built[engine] = out
        return built[engine]

    return get


def _largest_file(folder: Path) -> Path:
    return max(
        (p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST),
        key=lambda p: p.stat().st_size,
    )


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt(folder: Path, kind: str, engine: str) -> None:
    target = _largest_file(folder)
    if kind == "truncated":
        target.write_bytes(target.read_bytes()[:-10])
    elif kind == "flipped_byte":
        _flip_byte(target)
    elif kind == "zeroed_bytes":
        data = bytearray(target.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(64)
        target.write_bytes(bytes(data))
    elif kind == "missing_metadata":
        (
            folder / ".metadata" if engine == "fsdp" else next(folder.glob("*_model_states.pt"))
        ).unlink()
    elif kind == "empty_folder":
        shutil.rmtree(folder)
        folder.mkdir()
    elif kind == "unreadable_manifest":
        (folder / MANIFEST).write_text("{ not json")
    elif kind == "extra_file":
        (folder / "stray.bin").write_bytes(b"\0" * 16)


REASONS = {
    "truncated": r"has \d+ bytes, the manifest \d+",
    "flipped_byte": r"fails its checksum \(CRC-32 [0-9a-f]{8}, the manifest [0-9a-f]{8}\)",
    "zeroed_bytes": r"fails its checksum",
    "missing_metadata": r"missing file\(s\) ",
    "empty_folder": r"^empty folder$",
    "unreadable_manifest": r"manifest.json is unreadable \(JSONDecodeError",
    "extra_file": r"file\(s\) not in the manifest stray.bin",
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["fsdp", pytest.param("deepspeed", marks=needs_deepspeed)])
def test_every_corruption_fails_verification_with_its_reason(runs, engine, tmp_path):
    original = checkpoint_path(runs(engine) / "checkpoints", 6)
    manifest = json.loads((original / MANIFEST).read_text())
    assert manifest["step"] == 6 and manifest["engine"] == engine and manifest["params"]
    assert verify_checkpoint(original).ok
    for kind, reason in REASONS.items():
        copy = tmp_path / kind
        shutil.copytree(original, copy)
        _corrupt(copy, kind, engine)
        verdict = verify_checkpoint(copy)
        assert not verdict.ok and re.search(reason, verdict.reason), (kind, verdict)
    # Folders from before manifests load, unverified, and say so; without files they fail.
    legacy = tmp_path / "legacy"
    shutil.copytree(original, legacy)
    (legacy / MANIFEST).unlink()
    verdict = verify_checkpoint(legacy)
    assert verdict.ok and verdict.legacy and "not verified" in verdict.reason
    # verify = false checks files and sizes only: a flipped byte of the same size passes.
    flipped = tmp_path / "flipped_byte"
    assert verify_checkpoint(flipped, content=False).ok


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["fsdp", pytest.param("deepspeed", marks=needs_deepspeed)])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(
    runs, recipe_file, engine, tmp_path
):
    """Newest first: an empty step_8 folder and a step_6 with a flipped byte fail; a half-written
    step_10.partial (a rank killed mid-save) is never a candidate, and is removed; step 4
    verifies, and the resumed steps 5 and 6 repeat the uninterrupted run exactly."""
    straight = runs(engine)
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    checkpoints = out / "checkpoints"
    _flip_byte(_largest_file(checkpoint_path(checkpoints, 6)))
    checkpoint_path(checkpoints, 8).mkdir()
    partial = checkpoints / "step_00000010.partial"
    shutil.copytree(checkpoint_path(checkpoints, 4), partial)
    _largest_file(partial).write_bytes(b"")
    console = torchrun_train(recipe_file, out, CP2 + ENGINES[engine], timeout=420).stdout
    assert (
        f"checkpoint {checkpoint_path(checkpoints, 8)} failed verification: empty folder" in console
    )
    assert "step_00000006 failed verification:" in console and "fails its checksum" in console
    assert (
        f"resumed from {checkpoint_path(checkpoints, 4)} (step 4), the newest checkpoint that verifies"
        in console
    )
    # The half-written save is never a candidate; the run folder lock makes it this run's own
    # unfinished save, which the resume removes before writing.
    assert f"removed {partial}, an unfinished save of an earlier invocation" in console
    assert not partial.exists()
    assert logged_losses(out) == logged_losses(
        straight
    )  # steps 1-4 kept from before, 5-6 redone exactly
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "run/resume/text_summary" in events.Tags()["tensors"]


@pytest.mark.timeout(300)
def test_no_verifying_checkpoint_is_a_clear_error_listing_what_was_tried(
    runs, recipe_file, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(runs("fsdp"), out)
    for step in (2, 4, 6):
        (checkpoint_path(out / "checkpoints", step) / MANIFEST).write_text("[]")
    result = torchrun_train(recipe_file, out, CP2, check=False, timeout=240)
    assert result.returncode != 0
    err = result.stderr
    assert (
        "lh-cp train: error: no checkpoint under" in err and "verifies; tried, newest first:" in err
    ), err[-3000:]
    assert all(f"step_0000000{step}: manifest.json is unreadable" in err for step in (2, 4, 6))


@pytest.mark.timeout(300)
def test_a_checkpoint_of_another_model_is_refused_naming_every_difference(
    runs, recipe_file, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(runs("fsdp"), out)
    result = torchrun_train(recipe_file, out, CP2 + ["model.dim=32"], check=False, timeout=240)
    assert result.returncode != 0
    err = result.stderr
    assert "does not fit this run's model; parameters that differ:" in err, err[-3000:]
    assert "layers.0.attention.wq.weight: checkpoint [64, 64], this run [32, 32]" in err
    assert "tok_embeddings.weight: checkpoint [258, 64], this run [258, 32]" in err
    assert "model.dim: checkpoint 64, this run 32" in err and "set a new run.out_dir" in err
    assert "torch/distributed/checkpoint" not in err  # refused before DCP was asked to load it


@pytest.mark.timeout(300)
def test_resharding_cp2_to_cp1_resumes_the_same_run(runs, recipe_file, tmp_path):
    straight = runs("fsdp")
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(checkpoint_path(out / "checkpoints", 6))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process has
    try:
        recipe = load_recipe(recipe_file, CP2[1:] + ["parallel.cp=1", f"run.out_dir='{out}'"])
        resumed = train(recipe)
    finally:
        torch.set_num_threads(threads)
    reference = logged_losses(straight)
    assert resumed.resumed_from == 4
    assert resumed.train_loss[5] == pytest.approx(reference[5], rel=1e-5)
    assert resumed.train_loss[6] == pytest.approx(reference[6], rel=1e-3)
