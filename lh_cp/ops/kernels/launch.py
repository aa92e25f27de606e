"""Launch-size arithmetic shared by the Triton launchers (pure Python, tested on CPU at large N).

Every kernel of this package runs on a one-dimensional grid: CUDA allows 2**31 - 1 programs
on grid axis x but only 65535 on y and z, and the paper's scatter failed at 512K tokens with
pool=2 by putting ~139K programs on a limited axis.
"""

from __future__ import annotations

MAX_GRID_X = 2**31 - 1


def check_grid(programs: int) -> tuple[int]:
    """A one-axis grid of `programs` programs; raises if CUDA could not launch it."""
    if programs < 1:
        raise ValueError(f"a launch needs at least one program, got {programs}")
    if programs > MAX_GRID_X:
        raise ValueError(f"{programs} programs exceed CUDA's grid x limit of {MAX_GRID_X}")
    return (programs,)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
