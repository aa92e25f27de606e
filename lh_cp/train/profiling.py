"""One training step under torch.profiler (recipe metrics.profile_step).

Writes, per rank, a Chrome trace (open it in Perfetto or chrome://tracing) and a table of the
operators with the most self time on the device (on CPU: on the host) next to the run's
metrics, so that "where does the step go" is one recipe key away rather than a code change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


def profile_paths(out_dir: Path, step: int, rank: int) -> tuple[Path, Path]:
    """(Chrome trace, operator table) of step `step` on rank `rank`."""
    stem = out_dir / f"profile_step{step}_rank{rank}"
    return stem.with_suffix(".json"), stem.with_suffix(".txt")


@contextlib.contextmanager
def profiled(
    out_dir: Path, step: int, rank: int, device: torch.device, rows: int = 40
) -> Iterator[None]:
    """Profile the enclosed code (one training step) and write its trace and table on exit."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    trace, table = profile_paths(out_dir, step, rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table.write_text(
        prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=80) + "\n"
    )
