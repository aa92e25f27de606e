"""Training checkpoints: the step-folder protocol, and the two engines' folder contents.

A checkpoint is the folder <root>/step_XXXXXXXX holding the model and optimizer state, the
number of completed steps and the data position, so loading one and continuing reproduces the
uninterrupted run. Each is written to `step_XXXXXXXX.partial` and renamed to `step_XXXXXXXX`
by rank 0 once every rank has finished (write_atomically), so a folder without the suffix is
always complete; a run killed mid-save leaves only a `.partial` folder, which is ignored and
later replaced. Inside, either engine's format:
- FSDP2: a torch.distributed.checkpoint (DCP) folder (model and optimizer state sharded as
  FSDP2 holds them; save_checkpoint / load_checkpoint);
- DeepSpeed: what engine.save_checkpoint writes (module weights, ZeRO-sharded optimizer state,
  one file per rank) with the trainer state as DeepSpeed "client state"
  (save_deepspeed_checkpoint / load_deepspeed_checkpoint). DeepSpeed's own `latest` file is
  not used: rank 0 writes it without waiting for the other ranks' shards.
checkpoint_engine tells the two apart by their files.

Integrity: every folder gets manifest.json, written last before the rename: each file's size
and CRC-32 (the ranks share the reading), the step, the engine, the run's recipe (flattened)
and the shapes of its parameters. verify_checkpoint checks a folder against it (missing or
extra files, sizes, checksums, an unreadable manifest, an empty folder); compatibility names
every parameter whose shape differs from the run's and every changed setting. A folder with
checkpoint files but no manifest was written before manifests existed: it is loaded without
verification, with a warning.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lh_cp.train.storage import checkpoint_bytes, failed_ranks, write_failure

PREFIX = "step_"
PARTIAL = ".partial"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_READ_CHUNK = 16 * 2**20
# Settings a resumed run may change without changing what the checkpoint holds (resharding
# over another CP/DP layout, how long to run, logging, evaluation, checkpointing).
RESUMABLE_CHANGES = (
    "parallel.cp",
    "parallel.dp_shard",
    "parallel.dp_replicate",
    "parallel.timeout_s",
    "world_size",
    "run.name",
    "run.out_dir",
    "run.stop_after_step",
    "checkpoint.",
    "metrics.",
    "eval.",
    "stages.",
)


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> dict[int, Path]:
    """Completed checkpoints under `root` by step."""
    if not root.is_dir():
        return {}
    found = {}
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith(PREFIX) and name[len(PREFIX) :].isdigit():
            found[int(name[len(PREFIX) :])] = path
    return found


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(root)
    if not found:
        return None
    step = max(found)
    return step, found[step]


# Prefixes that wrappers put into parameter names: activation checkpointing, torch.compile.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as the bare model names it, whatever checkpointing or compile wrap it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def newest_verified(
    root: Path, group: dist.ProcessGroup | None = None, content: bool = True
) -> tuple[tuple[int, Path, Verdict] | None, list[tuple[Path, str]]]:
    """The newest completed checkpoint under `root` that verifies, as (step, folder, verdict),
    or None; and the newer ones that failed on the way, newest first, as (folder, reason).
    Collective over `group` when given (verify_checkpoint)."""
    failed = []
    for step, path in sorted(complete_checkpoints(root).items(), reverse=True):
        verdict = verify_checkpoint(path, group, content)
        if verdict.ok:
            return (step, path, verdict), failed
        failed.append((path, verdict.reason))
    return None, failed


def _train_state(step: int, data_state: dict[str, torch.Tensor]) -> dict:
    return {"step": torch.tensor(step, dtype=torch.int64), "data": dict(data_state)}


def _crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(folder: Path) -> list[str]:
    """Relative paths of every file under `folder` but the manifest, sorted."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def _checksums(folder: Path, names: list[str], group: dist.ProcessGroup | None) -> dict[str, str]:
    """CRC-32 of each of `names`; over `group` each rank reads a share (collective)."""
    rank, world = (
        (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    )
    mine = {name: _crc32(folder / name) for name in names[rank::world]}
    if world == 1:
        return mine
    shares: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(shares, mine, group=group)
    return {name: crc for share in shares for name, crc in share.items()}


def write_manifest(folder: Path, step: int, meta: dict, names: list[str], sums: dict) -> None:
    """The manifest of a finished folder (every rank's files written; `sums` their CRC-32s,
    _checksums), written beside it and renamed into place."""
    files = {name: {"size": (folder / name).stat().st_size, "crc32": sums[name]} for name in names}
    manifest = {"format": MANIFEST_FORMAT, "step": step, **meta, "files": files}
    partial = folder / (MANIFEST + PARTIAL)
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(partial, folder / MANIFEST)


@dataclass
class Verdict:
    """Result of verify_checkpoint: ok, why not (reason), or ok but unverifiable (legacy)."""

    ok: bool
    reason: str = ""
    legacy: bool = False
    manifest: dict | None = None


def verify_checkpoint(
    path: Path, group: dist.ProcessGroup | None = None, content: bool = True
) -> Verdict:
    """Check the folder `path` against its manifest; collective over `group` when given (the
    ranks share the checksums), the same verdict on every rank. content=False skips the
    checksums (checkpoint.verify = false): files and sizes only."""
    if not path.is_dir():
        return Verdict(False, "not a folder")
    names = _files(path)
    if not (path / MANIFEST).is_file():
        if not names:
            return Verdict(False, "empty folder")
        if checkpoint_engine(path) is None:
            return Verdict(False, f"no {MANIFEST} and no DCP or DeepSpeed checkpoint files")
        return Verdict(
            True, f"no {MANIFEST} (written before checkpoint manifests): not verified", legacy=True
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not a table")
        for name, entry in listed.items():
            lacking = [key for key in ("size", "crc32") if key not in (entry or {})]
            if not isinstance(entry, dict) or lacking:
                raise KeyError(f"the entry of {name} has no {' or '.join(lacking) or 'table'}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return Verdict(False, f"{MANIFEST} is unreadable ({type(err).__name__}: {err})")
    missing, extra = sorted(set(listed) - set(names)), sorted(set(names) - set(listed))
    problems = [f"missing file(s) {', '.join(missing)}"] if missing else []
    problems += [f"file(s) not in the manifest {', '.join(extra)}"] if extra else []
    present = [name for name in names if name in listed]
    problems += [
        f"{name} has {(path / name).stat().st_size} bytes, the manifest {listed[name]['size']}"
        for name in present
        if (path / name).stat().st_size != listed[name]["size"]
    ]
    if content and not problems:
        sums = _checksums(path, present, group)
        problems += [
            f"{name} fails its checksum (CRC-32 {sums[name]}, the manifest {listed[name]['crc32']})"
            for name in present
            if sums[name] != listed[name]["crc32"]
        ]
    return Verdict(not problems, "; ".join(problems), manifest=manifest)


def compatibility(manifest: dict, meta: dict) -> tuple[list[str], list[str]]:
    """(parameters whose shapes differ, or that exist on one side only; settings that differ
    outside RESUMABLE_CHANGES) between a checkpoint's manifest and the run's `meta`."""
    saved, ours = manifest.get("params", {}), meta.get("params", {})
    shapes = [
        f"{name}: checkpoint {saved.get(name, 'absent')}, this run {ours.get(name, 'absent')}"
        for name in sorted(set(saved) | set(ours))
        if saved.get(name) != ours.get(name)
    ]
    old, new = manifest.get("recipe", {}), meta.get("recipe", {})
    settings = [
        f"{key}: checkpoint {old.get(key, 'absent')!r}, this run {new.get(key, 'absent')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    return shapes, settings


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (on some rank); raised on every rank, naming the
    cause in one line (a full disk: "no space left on <path>, need ~X GB")."""


def _expected_bytes(meta: dict) -> int:
    """What the folder should take, from the parameter shapes in the manifest's meta."""
    params = sum(math.prod(shape) for shape in meta.get("params", {}).values())
    return checkpoint_bytes(params, meta.get("engine", "fsdp"))


def _everyone_succeeded(
    error: BaseException | None, folder: Path, step: int, meta: dict, group: dist.ProcessGroup
) -> None:
    """Collective: raise CheckpointWriteError on every rank if any rank's local part failed
    (one line naming the ranks and the cause), after rank 0 removed the unfinished folder;
    the older checkpoints are untouched."""
    mine = None
    if error is not None:  # DCP names the ranks whose writes failed; anything else is this rank
        ranks = failed_ranks(error) or [dist.get_rank(group)]
        mine = (ranks, write_failure(error, folder, _expected_bytes(meta)))
    reports: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, mine, group=group)
    failed = [report for report in reports if report is not None]
    if not failed:
        return
    if dist.get_rank(group) == 0:
        shutil.rmtree(folder, ignore_errors=True)
    ranks = sorted({rank for report_ranks, _ in failed for rank in report_ranks})
    causes = list(dict.fromkeys(cause for _, cause in failed))
    raise CheckpointWriteError(
        f"checkpoint of step {step} not saved (the write failed on rank"
        f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}): {'; '.join(causes)}; "
        f"its unfinished folder is removed, older checkpoints are kept"
    )


def remove_partial_folders(root: Path) -> list[Path]:
    """Remove every unfinished `step_X.partial` folder under `root` (left by a run killed while
    saving; the run folder lock makes them this run's own); returns what was removed."""
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.glob(f"{PREFIX}*{PARTIAL}")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def write_atomically(
    root: Path, step: int, group: dist.ProcessGroup, write, meta: dict | None = None
) -> Path:
    """Collective over `group`: `write(folder)` on every rank into step_XXXXXXXX.partial, then
    its manifest (with `meta`: engine, recipe, parameter shapes), then the rename to
    step_XXXXXXXX once every rank has finished, so a run killed mid-save leaves only a
    .partial folder, which resume ignores. A write that fails on any rank (a full disk, a
    folder gone) raises CheckpointWriteError on every rank (_everyone_succeeded). Returns the
    final folder."""
    meta = meta or {}
    final = checkpoint_path(root, step)
    partial = final.with_name(final.name + PARTIAL)
    rank = dist.get_rank(group)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier(group)
    error = None
    try:
        write(partial)
    except (Exception, CheckpointException) as err:  # DCP's, a BaseException, reaches every rank
        error = err
    _everyone_succeeded(error, partial, step, meta, group)
    names = _files(partial)
    sums = _checksums(partial, names, group)
    error = None
    if rank == 0:
        try:
            write_manifest(partial, step, meta, names, sums)
        except OSError as err:
            error = err
    _everyone_succeeded(error, partial, step, meta, group)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    dist.barrier(group)
    return final


def save_checkpoint(
    root: Path,
    step: int,
    model,
    optimizer,
    data_state: dict,
    group: dist.ProcessGroup,
    meta: dict | None = None,
) -> Path:
    """Collective over `group` (every rank of the job): write the checkpoint of `step`."""

    def write(folder: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {
            "model": model_state,
            "optim": optim_state,
            "train": _train_state(step, data_state),
        }
        dcp.save(state, checkpoint_id=str(folder), process_group=group)

    return write_atomically(root, step, group, write, meta)


def load_checkpoint(
    path: Path, model, optimizer, data_state: dict, group: dist.ProcessGroup
) -> tuple[int, dict]:
    """Collective: load `path` into model and optimizer in place; returns (step, data state)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "train": _train_state(0, data_state)}
    dcp.load(state, checkpoint_id=str(path), process_group=group)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return int(state["train"]["step"]), state["train"]["data"]


def prune_checkpoints(
    root: Path, keep_last: int, protected: set[int], group: dist.ProcessGroup
) -> None:
    """Delete all but the newest `keep_last` checkpoints whose step is not in `protected`
    (stage ends). Rank 0 deletes; every rank waits so no one reads a folder being removed."""
    if dist.get_rank(group) == 0:
        candidates = sorted(step for step in complete_checkpoints(root) if step not in protected)
        for step in candidates[:-keep_last] if keep_last > 0 else candidates:
            shutil.rmtree(checkpoint_path(root, step), ignore_errors=True)
    dist.barrier(group)


def save_deepspeed_checkpoint(
    engine,
    root: str | Path,
    step: int,
    data_state: dict,
    group: dist.ProcessGroup,
    meta: dict | None = None,
) -> Path:
    """Collective over `group` (every rank of the job): write a DeepSpeed engine's checkpoint of
    `step`; returns its folder."""

    def write(folder: Path) -> None:
        client_state = {"step": step, "data": dict(data_state)}
        engine.save_checkpoint(
            str(folder.parent), tag=folder.name, client_state=client_state, save_latest=False
        )

    return write_atomically(Path(root), step, group, write, meta)


def load_deepspeed_checkpoint(engine, path: str | Path) -> tuple[int, dict]:
    """Collective: load the checkpoint folder `path` into the engine in place; returns (step, data state).

    Restores module weights, optimizer state and DeepSpeed's step counters; the learning rate
    is the trainer's to set (a pure function of the step). Under ZeRO-3 load into a freshly
    built engine (DeepSpeed's rule: not into one that has already saved).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint folder {path} does not exist")
    loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None or client_state is None:
        raise FileNotFoundError(
            f"DeepSpeed could not load the checkpoint in {path} (see its log above)"
        )
    return int(client_state["step"]), dict(client_state["data"])


def checkpoint_engine(path: Path) -> str | None:
    """The engine that wrote the checkpoint folder `path`, by the files it holds: DCP (FSDP2)
    writes .metadata, DeepSpeed *_model_states.pt per rank; None when neither is there."""
    if (path / ".metadata").is_file():
        return "fsdp"
    if any(path.glob("*_model_states.pt")):
        return "deepspeed"
    return None
