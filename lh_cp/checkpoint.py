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
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

PREFIX = "step_"
PARTIAL = ".partial"


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> dict[int, Path]:
    """Completed checkpoints under `root` by step."""
    if not root.is_dir():
        return {}
    found = {}
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
            found[int(name[len(PREFIX):])] = path
    return found


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(root)
    if not found:
        return None
    step = max(found)
    return step, found[step]


def _train_state(step: int, data_state: dict[str, torch.Tensor]) -> dict:
    return {"step": torch.tensor(step, dtype=torch.int64), "data": dict(data_state)}


def write_atomically(root: Path, step: int, group: dist.ProcessGroup, write) -> Path:
    """Collective over `group`: `write(folder)` on every rank into step_XXXXXXXX.partial, then
    rename it to step_XXXXXXXX once every rank has finished, so a run killed mid-save leaves
    only a .partial folder, which resume ignores. Returns the final folder."""
    final = checkpoint_path(root, step)
    partial = final.with_name(final.name + PARTIAL)
    rank = dist.get_rank(group)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier(group)
    write(partial)
    dist.barrier(group)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    dist.barrier(group)
    return final


def save_checkpoint(root: Path, step: int, model, optimizer, data_state: dict, group: dist.ProcessGroup) -> Path:
    """Collective over `group` (every rank of the job): write the checkpoint of `step`."""

    def write(folder: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "train": _train_state(step, data_state)}
        dcp.save(state, checkpoint_id=str(folder), process_group=group)

    return write_atomically(root, step, group, write)


def load_checkpoint(path: Path, model, optimizer, data_state: dict, group: dist.ProcessGroup) -> tuple[int, dict]:
    """Collective: load `path` into model and optimizer in place; returns (step, data state)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "train": _train_state(0, data_state)}
    dcp.load(state, checkpoint_id=str(path), process_group=group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["train"]["step"]), state["train"]["data"]


def prune_checkpoints(root: Path, keep_last: int, protected: set[int], group: dist.ProcessGroup) -> None:
    """Delete all but the newest `keep_last` checkpoints whose step is not in `protected`
    (stage ends). Rank 0 deletes; every rank waits so no one reads a folder being removed."""
    if dist.get_rank(group) == 0:
        candidates = sorted(step for step in complete_checkpoints(root) if step not in protected)
        for step in candidates[:-keep_last] if keep_last > 0 else candidates:
            shutil.rmtree(checkpoint_path(root, step), ignore_errors=True)
    dist.barrier(group)


def save_deepspeed_checkpoint(engine, root: str | Path, step: int, data_state: dict, group: dist.ProcessGroup) -> Path:
    """Collective over `group` (every rank of the job): write a DeepSpeed engine's checkpoint of
    `step`; returns its folder."""

    def write(folder: Path) -> None:
        client_state = {"step": step, "data": dict(data_state)}
        engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state=client_state, save_latest=False)

    return write_atomically(Path(root), step, group, write)


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
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {path} (see its log above)")
    return int(client_state["step"]), dict(client_state["data"])


def checkpoint_engine(path: Path) -> str | None:
    """The engine that wrote the checkpoint folder `path`, by the files it holds: DCP (FSDP2)
    writes .metadata, DeepSpeed *_model_states.pt per rank; None when neither is there."""
    if (path / ".metadata").is_file():
        return "fsdp"
    if any(path.glob("*_model_states.pt")):
        return "deepspeed"
    return None
