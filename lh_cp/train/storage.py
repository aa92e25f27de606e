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

from lh_cp.model.transformer import count_parameters
from lh_cp.train.recipe import Recipe

CHECKPOINT_BYTES_PER_PARAMETER = {"fsdp": 12, "deepspeed": 16}


def size(nbytes: float) -> str:
    """Bytes for a message: '6.40 GB', '3.3 MB', '512 kB'."""
    for unit, scale, digits in (("TB", 1e12, 2), ("GB", 1e9, 2), ("MB", 1e6, 1), ("kB", 1e3, 0)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{digits}f} {unit}"
    return f"{nbytes:.0f} bytes"


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
        f"checkpoints in {checkpoint_dir}: about {size(one)} each, up to {held} at once "
        f"({size(held * one)}); {size(free)} free there"
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


def failed_ranks(err: BaseException) -> list[int]:
    """The ranks whose writes failed, as a DCP CheckpointException lists them (every rank
    raises it); empty for other errors."""
    return sorted(getattr(err, "failures", {}))


def write_failure(err: BaseException, folder: Path, expected: int) -> str:
    """One line on why writing `folder` failed: for a full disk "no space left on <path>,
    need ~X GB" (`expected` bytes), else the first OSError, else the error itself."""
    errors = list(_oserrors(err))
    full = next((e for e in errors if e.errno in (errno.ENOSPC, errno.EDQUOT)), None)
    if full is not None:
        where = _existing_ancestor(folder.parent)
        quota = " (disk quota exceeded)" if full.errno == errno.EDQUOT else ""
        name = folder.name.removesuffix(".partial")
        return (
            f"no space left on {where}{quota}, need ~{size(expected)} for {name} "
            f"({size(free_bytes(where))} free when the write failed)"
        )
    shown = errors[0] if errors else err
    text = " ".join(str(shown).split())
    return f"{type(shown).__name__}: {text[:300]}"


def output_problems(recipe: Recipe) -> list[str]:
    """run.out_dir, and checkpoint.dir when set apart, must be folders this process can write
    (or create): checked before anything starts (folder_problems)."""
    problems = folder_problems(Path(recipe.run.out_dir), "run.out_dir")
    if recipe.checkpoint.dir:
        problems += folder_problems(recipe.checkpoint_dir, "checkpoint.dir")
    return problems


def checkpoint_space(recipe: Recipe) -> tuple[str, bool]:
    """(a line on the space the run's checkpoints need against the free space where they go,
    whether it is short): space_line for this recipe's model."""
    one = checkpoint_bytes(count_parameters(recipe.model), recipe.parallel.engine)
    held = held_checkpoints(recipe.checkpoint.keep_last, len(recipe.stages))
    return space_line(recipe.checkpoint_dir, one, held)
