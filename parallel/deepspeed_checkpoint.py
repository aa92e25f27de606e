"""Checkpoints of a DeepSpeed engine, laid out like lh_cp's DCP checkpoints (lh_cp/checkpoint.py).

A checkpoint is the folder <root>/step_XXXXXXXX that engine.save_checkpoint writes (module
weights, ZeRO-sharded optimizer state, one file per rank) with the trainer state (completed
steps, data position) as DeepSpeed "client state". It is written as step_XXXXXXXX.partial and
renamed once every rank has finished, as lh_cp.checkpoint does, so latest_checkpoint and
prune_checkpoints of lh_cp.checkpoint work unchanged on a DeepSpeed run's folder, and a run
killed mid-save leaves only a .partial folder that is ignored. (DeepSpeed's own `latest` file
is not used: rank 0 writes it without waiting for the other ranks' shards.)
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from lh_cp.checkpoint import write_atomically


def save_deepspeed_checkpoint(engine, root: str | Path, step: int, data_state: dict, group: dist.ProcessGroup) -> Path:
    """Collective over `group` (every rank of the job): write the checkpoint of `step`; returns its folder."""

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
