"""Training metrics: model FLOPs, MFU, peak memory, ETA, and the writers (TensorBoard, one
console line per logged step, metrics.jsonl). Only rank 0 builds a MetricsWriter.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from lh_cp.model.transformer import ModelConfig
from lh_cp.ops.config import LighthouseConfig

STAGES_TAG = "run/stages"  # TensorBoard text: JSON list of [name, attention] per stage

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, matched against the device name.
GPU_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def flops_per_token(
    model: ModelConfig, seq_len: int, lighthouse: LighthouseConfig | None, lighthouse_layers: int
) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token of one sequence.

    Matmuls: 6 per weight (the input embedding is a lookup, not a matmul; the output
    projection is counted even when tied). Causal attention over n entries costs 2 n^2 d
    forward for QK^T and PV together (d = heads * head size), i.e. 6 n^2 d per sequence
    for training; a Lighthouse layer attends over S selected entries instead of N tokens.
    """
    d, layers = model.n_heads * model.head_dim, model.n_layers
    kv = model.n_kv_heads * model.head_dim
    block = 2 * model.dim * d + 2 * model.dim * kv + 3 * model.dim * model.ffn_dim
    matmul = 6 * (layers * block + model.vocab_size * model.dim)
    dense_attention = 6 * seq_len * d  # 6 N^2 d per sequence / N tokens
    attention = (layers - lighthouse_layers) * dense_attention
    if lighthouse is not None and lighthouse_layers:
        selected = lighthouse.selected_length(seq_len)
        attention += lighthouse_layers * 6 * selected * selected * d / seq_len
    return matmul + attention


def peak_flops(device: torch.device, configured_tflops: float) -> tuple[float, str]:
    """Per-device peak FLOP/s for MFU and where the number came from."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "metrics.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} bf16 dense peak"
    return measured_matmul_flops(device), f"measured {device.type} matmul"


def measured_matmul_flops(
    device: torch.device, sizes: tuple[int, ...] = (256, 512, 1024), repeats: int = 6
) -> float:
    """Best FLOP/s of square float32 matmuls (bf16 on CUDA) on `device`, after a warm-up.

    Several sizes because the fastest one depends on the cache sizes of the machine; the best
    of them is the closest measured stand-in for the peak.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    best_rate = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        for attempt in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if attempt >= 2:  # the first two runs warm up threads and caches
                best_rate = max(best_rate, 2 * size**3 / (time.perf_counter() - begin))
    return best_rate


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return cpu_peak_rss_bytes() / 2**30


def pinned_host_peak_gib(device: torch.device) -> float | None:
    """Peak pinned host memory held by torch's caching host allocator (every user of pinned
    memory, rounding included), or None off CUDA or where torch keeps no such statistic."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if device.type != "cuda" or stats is None:
        return None
    peak = stats().get("allocated_bytes.peak")
    return None if peak is None else peak / 2**30


def cpu_peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux the high-water mark of its own image
    (VmHWM): ru_maxrss survives exec, so a rank started by torchrun would report the launcher's
    peak if that were larger. Elsewhere ru_maxrss (bytes on macOS, KiB on other systems)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def read_metrics_lines(path: Path) -> tuple[list[str], list[str]]:
    """(the lines of a metrics.jsonl that hold a JSON record with a step, what was dropped and
    why). A crash in the middle of a write can cut the last line short; such a line (or any
    line that is not a record) is dropped, never an error, so a torn file cannot block a
    resume."""
    kept, dropped = [], []
    lines = path.read_bytes().split(b"\n") if path.is_file() else []
    if lines and lines[-1] == b"":
        lines.pop()  # the file ends with a newline, as every complete write leaves it
    for number, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            where = "its last line" if number == len(lines) else f"line {number}"
            dropped.append(f"{where} ({raw[:60]!r}), cut short or not a record")
            continue
        kept.append(raw.decode())
    return kept, dropped


class MetricsWriter:
    """TensorBoard scalars, a console line per logged step, and metrics.jsonl (rank 0).

    On resume, TensorBoard events and jsonl lines after the resumed step are dropped, so a
    step redone after an interruption appears once; a torn or unreadable jsonl line is dropped
    with a console warning (read_metrics_lines). Each jsonl line is written with one write()
    to a file opened for appending, so a line is never split between two writes; the file is
    rewritten (on resume) beside itself and renamed into place.
    """

    def __init__(
        self, tensorboard_dir: Path, jsonl_path: Path, resume_step: int, run_name: str
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_name = run_name
        self.tensorboard = SummaryWriter(
            str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None
        )
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step:
            lines, dropped = read_metrics_lines(jsonl_path)
            for reason in dropped:
                self.console(f"warning: {jsonl_path}: dropped {reason}")
            kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
        rewritten = jsonl_path.with_name(jsonl_path.name + ".partial")
        rewritten.write_text("".join(line + "\n" for line in kept))
        os.replace(rewritten, jsonl_path)
        self._jsonl = os.open(jsonl_path, os.O_WRONLY | os.O_APPEND)

    def scalars(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        for name, value in values.items():
            self.tensorboard.add_scalar(name, value, step)
        line = memoryview((json.dumps({"step": step, "kind": kind, **values}) + "\n").encode())
        while line:  # one write per line (a regular file takes it whole unless the disk is full)
            line = line[os.write(self._jsonl, line) :]
        self.tensorboard.flush()

    def text(self, tag: str, value: str, step: int) -> None:
        self.tensorboard.add_text(tag, value, step)

    def console(self, line: str) -> None:
        print(f"[{self.run_name}] {line}", flush=True)

    def close(self) -> None:
        self.tensorboard.close()
        os.close(self._jsonl)
