"""Checkpoints of a DeepSpeed engine: DeepSpeed's own format, tagged like lh_cp's DCP ones.

A checkpoint is the folder <root>/step_XXXXXXXX that engine.save_checkpoint writes (model,
ZeRO-sharded optimizer state, one file per rank) plus the trainer state (completed steps and
data position) as DeepSpeed "client state". DeepSpeed writes <root>/latest only after every
rank has finished the folder, so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from lh_cp.checkpoint import PREFIX


def deepspeed_tag(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_deepspeed_checkpoint(engine, root: str | Path, step: int, data_state: dict) -> Path:
    """Collective over every rank: write the checkpoint of `step` and point <root>/latest at it."""
    root = Path(root)
    tag = deepspeed_tag(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "data": dict(data_state)})
    return root / tag


def latest_deepspeed_step(root: str | Path) -> int | None:
    """Step of the checkpoint <root>/latest names, or None when there is none."""
    latest = Path(root) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (tag.startswith(PREFIX) and tag[len(PREFIX):].isdigit()):
        raise ValueError(f"{latest} names {tag!r}, not a checkpoint written by save_deepspeed_checkpoint ({PREFIX}XXXXXXXX)")
    return int(tag[len(PREFIX):])


def load_deepspeed_checkpoint(engine, root: str | Path, step: int | None = None) -> tuple[int, dict]:
    """Collective: load the checkpoint of `step` (default: the latest) into the engine in place.

    Returns (completed steps, data state). Model weights, optimizer state and the optimizer's
    step counters are restored; the learning rate is the trainer's to set (a pure function of
    the step).
    """
    root = Path(root)
    if step is None:
        step = latest_deepspeed_step(root)
        if step is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {root}: {root / 'latest'} does not exist")
    path, client_state = engine.load_checkpoint(str(root), tag=deepspeed_tag(step))
    if path is None or client_state is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {root / deepspeed_tag(step)}")
    return int(client_state["step"]), dict(client_state["data"])
