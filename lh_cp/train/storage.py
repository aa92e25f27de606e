"""The run's folders on disk: can they be written, is there room for the checkpoints, and what
a failed write was about.

`lh-cp plan` and the start of `lh-cp train` (before any process group) check that run.out_dir
and checkpoint.dir are folders this process can write, or can be created, and compare the free
space with what the run's checkpoints take. A checkpoint holds float32 weights and both AdamW
moments: about CHECKPOINT_BYTES_PER_PARAMETER bytes per parameter (DeepSpeed's folders also hold
the module's own weights). A save that fails is described in one line by `write_failure`, with
"no space left on <path>" first when the disk is full.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

CHECKPOINT_BYTES_PER_PARAMETER = {"fsdp": 12, "deepspeed": 16}
GB = 1e9


def checkpoint_bytes(params: int, engine: str) -> int:
    """Expected bytes of one checkpoint of a model of `params` parameters."""
    return params * CHECKPOINT_BYTES_PER_PARAMETER.get(engine, 16)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problems(path: Path, option: str) -> list[str]:
    """Why this process cannot use `path` as a folder to write into (empty when it can): a
    file in its place or on its way, or a deepest existing folder that refuses a new file (the
    probe is a temporary file created and removed there)."""
    existing = _existing_ancestor(Path(path))
    if not existing.is_dir():
        where = (
            "is a file" if existing == Path(path).absolute() else f"lies under {existing}, a file"
        )
        return [f"{option}={str(path)!r} {where}, not a folder; choose another {option}"]
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".lh-cp-probe-"):
            pass
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        made = "" if existing == Path(path).absolute() else f" (it would be created in {existing})"
        return [
            f"{option}={str(path)!r} cannot be written{made}: {reason}; choose another {option}"
        ]
    return []


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing_ancestor(Path(path))).free


def space_line(checkpoint_dir: Path, one: int, held: int) -> tuple[str, bool]:
    """(a line comparing the free space where checkpoints go with their size, whether it is
    short of what the run holds at once: `held` checkpoints of `one` bytes)."""
    free = free_bytes(checkpoint_dir)
    line = (
        f"checkpoints in {checkpoint_dir}: about {one / GB:.2f} GB each, up to {held} at once "
        f"({held * one / GB:.2f} GB); {free / GB:.2f} GB free there"
    )
    return line, free < held * one


def held_checkpoints(keep_last: int, stages: int) -> int:
    """Checkpoints on disk at the worst moment: keep_last interval ones, one per stage end
    (never pruned) and the one being written."""
    return keep_last + stages + 1


def _oserrors(err: BaseException, seen: set[int] | None = None):
    """Every OSError in `err`, its causes and contexts, and the per-rank failures a DCP
    CheckpointException carries."""
    seen = set() if seen is None else seen
    if err is None or id(err) in seen:
        return
    seen.add(id(err))
    if isinstance(err, OSError):
        yield err
    for failure in getattr(err, "failures", {}).values():  # DCP: rank -> (exception, traceback)
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            yield from _oserrors(inner, seen)
    yield from _oserrors(err.__cause__, seen)
    yield from _oserrors(err.__context__, seen)


def write_failure(err: BaseException, folder: Path, expected: int) -> str:
    """One line on why writing `folder` failed: for a full disk "no space left on <path>,
    need ~X GB" (`expected` bytes), else the first OSError, else the error itself."""
    errors = list(_oserrors(err))
    full = next((e for e in errors if e.errno in (errno.ENOSPC, errno.EDQUOT)), None)
    if full is not None:
        where = _existing_ancestor(folder)
        quota = " (disk quota exceeded)" if full.errno == errno.EDQUOT else ""
        return (
            f"no space left on {where}{quota}, need ~{expected / GB:.2f} GB for {folder.name} "
            f"({free_bytes(where) / GB:.2f} GB free now)"
        )
    shown = errors[0] if errors else err
    text = " ".join(str(shown).split())
    return f"{type(shown).__name__}: {text[:300]}"
