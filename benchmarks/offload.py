"""Activation offload on one GPU (parallel.offload_activations, docs/offload.md): the longest
context that trains with offload on and off, the throughput cost, and the memory of each run.

Model: recipes/h100_270m.toml (the paper's ~270M ablation model, activation checkpointing),
each run a fresh `lh-cp train` process alone on the GPU, with the caching allocator's
expandable segments (as launch/*.sh set them).

- Longest context, per stage attention (lighthouse, dense) and offload (on, off): one
  training step plus the stage-end validation (no leak probe) at N tokens; N doubles from
  --start while it trains (up to --max-context), then bisects between the longest N that
  trained and the shortest that did not, on multiples of --step (64K). A run that runs out of
  GPU memory, or that the trainer refuses because its pinned host memory would exceed the
  machine's (lh-cp plan's rule), did not train; a timeout or any other error stops that search
  and is reported as such.
- Throughput at --throughput-context (256K): --tp-steps steps with offload on and off; tokens/s
  is the median over the steps after the first two (kernel compilation, pinning the host
  memory, allocator warm-up). Goal: offload within 10% of no offload.
- Memory of every run: peak GPU memory (torch.cuda.max_memory_allocated), the pinned host
  memory of the offloaded block inputs (perf/offload_host_gib) and of torch's pinned allocator
  (perf/pinned_host_gib).

Results go to --results (default benchmarks/results/offload.json), which tests/test_plan_memory.py
reads to hold `lh-cp plan`'s estimate to the measured peaks; a later call adds to the same
file (a probe already there is not run again; --fresh starts over), so the work can be split
over several calls. Time on an H100, from the wall times in results/train_h100_fit.json (one
step grows with N, the dense stage's quadratically): a Lighthouse probe takes 1-3 minutes up
to 1M tokens, a dense one about 5 minutes at 640K and (extrapolated) 13 at 1M; so search the
dense stage from a high --start, or probe single contexts with --contexts. Examples (in the
background with benchmarks/device_speed.sh, see there):

    python benchmarks/offload.py --attention lighthouse --start 524288 --max-context 2097152
    python benchmarks/offload.py --attention dense --offload on --contexts 1048576 --skip-throughput
    python benchmarks/offload.py --smoke --results /tmp/offload_smoke.json   # CPU, toy sizes
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from runs import REPO, read_metrics, train

GPU_RECIPE = "recipes/h100_270m.toml"
FIT_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
# The embedded standard-library corpus holds ~18M byte tokens (2% of it: 369,500); validation
# needs one whole sequence, so the split grows with N beyond 10%.
CORPUS_TOKENS_LOWER_BOUND = 15_000_000
REFUSED_HOST = "pins"  # lh-cp plan's host memory rule: "... pins X GiB of host memory ..."
# The toy run of --smoke (CPU): the quickstart model on one process at 512 tokens.
SMOKE_RECIPE = "recipes/quickstart.toml"
SMOKE_SETS = [
    "run.device='cpu'",
    "parallel.cp=1",
    "parallel.activation_checkpoint=true",
    "eval.passkey.enabled=false",
]


def validation_fraction(n: int) -> float:
    return round(min(0.5, max(0.1, 1.5 * n / CORPUS_TOKENS_LOWER_BOUND)), 3)


def run_sets(n: int, attention: str, offload: bool, steps: int) -> list[str]:
    """The --set overrides of one run: N tokens, one stage of `steps` steps, offload."""
    return [
        f"data.seq_len={n}",
        f"stages=[{{name='probe', attention='{attention}', steps={steps}}}]",
        "schedule.warmup_steps=0",
        f"data.validation_fraction={validation_fraction(n)}",
        "eval.val_batches=1",
        "eval.leak=false",
        "metrics.log_interval=1",
        f"parallel.offload_activations={'true' if offload else 'false'}",
    ]


def outcome_of(code: int, tail: str, trained: bool) -> str:
    if code == 0 and trained:
        return "trained"
    if "OutOfMemoryError" in tail or "CUDA out of memory" in tail:
        return "out_of_memory"
    if "parallel.offload_activations=true " + REFUSED_HOST in tail:
        return "refused_host_memory"
    if code == 124:
        return "timeout"
    return "error"


FITS = {"trained": True, "out_of_memory": False, "refused_host_memory": False}


def memory_fields(records: list[dict]) -> dict:
    def peak(key: str):
        values = [r[key] for r in records if key in r]
        return max(values) if values else None

    return {
        "peak_memory_gib": peak("perf/peak_memory_gib"),
        "offload_host_gib": peak("perf/offload_host_gib"),
        "pinned_host_gib": peak("perf/pinned_host_gib"),
    }


def one_run(args, n: int, attention: str, offload: bool, steps: int) -> tuple[dict, list[dict]]:
    """`lh-cp train` in a fresh process and folder; its row and its train records. The run's
    checkpoint (written at the stage end) is deleted: many probes of a 270M model would fill
    the disk."""
    tag = f"{attention}_{'on' if offload else 'off'}_{n}_{steps}steps"
    run_dir = args.out / tag
    shutil.rmtree(run_dir, ignore_errors=True)  # never resume an earlier probe
    sets = args.base_sets + run_sets(n, attention, offload, steps) + args.extra_sets
    seconds, code, tail = train(args.recipe, run_dir, sets, args.timeout, env=args.env)
    records = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    row = {
        "N": n,
        "attention": attention,
        "offload": offload,
        "steps": steps,
        "outcome": outcome_of(code, tail, len(records) == steps),
        "exit_code": code,
        "wall_s": round(seconds, 1),
        "recipe": args.recipe,
        "sets": sets,
        **memory_fields(records),
    }
    if row["outcome"] != "trained":
        row["error_tail"] = tail[-1500:]
    return row, records


def search_longest(probe: Callable[[int], bool | None], start: int, limit: int, step: int) -> dict:
    """Longest N (a multiple of step) for which probe(N) is True. probe answers True (trains),
    False (does not) or None (unknown: the search stops there). N doubles from start while
    probe says True, capped at limit, then bisects between the longest True and the shortest
    False. Returns {"longest": N or None, "shortest_failing": N or None, "stopped_at": N or
    None}; shortest_failing None with stopped_at None means every N up to limit trained."""
    for name, value in (("start", start), ("limit", limit)):
        if value < step or value % step:
            raise ValueError(f"{name}={value} must be a positive multiple of step={step}")
    if start > limit:
        raise ValueError(f"start={start} must not exceed limit={limit}")
    longest, failing, n = None, None, start
    while True:
        verdict = probe(n)
        if verdict is None:
            return {"longest": longest, "shortest_failing": failing, "stopped_at": n}
        if not verdict:
            failing = n
            break
        longest = n
        if n >= limit:
            return {"longest": longest, "shortest_failing": None, "stopped_at": None}
        n = min(2 * n, limit)
    low = longest or 0
    while failing - low > step:
        middle = (low + failing) // 2 // step * step
        verdict = probe(middle)
        if verdict is None:
            return {"longest": longest, "shortest_failing": failing, "stopped_at": middle}
        if verdict:
            longest = low = middle
        else:
            failing = middle
    return {"longest": longest, "shortest_failing": failing, "stopped_at": None}


def probe_key(row: dict) -> tuple:
    return (row["attention"], row["offload"], row["N"], tuple(row["sets"]))


def longest_contexts(args, result: dict) -> None:
    known = {probe_key(row): row for row in result["probes"]}
    for attention in args.attention:
        for offload in args.offload:

            def probe(n: int, attention=attention, offload=offload) -> bool | None:
                sets = args.base_sets + run_sets(n, attention, offload, 1) + args.extra_sets
                row = known.get((attention, offload, n, tuple(sets)))
                if row is None:
                    row, _ = one_run(args, n, attention, offload, steps=1)
                    result["probes"].append(row)
                    known[probe_key(row)] = row
                    save(args, result)
                print(json.dumps({k: v for k, v in row.items() if k != "sets"}), flush=True)
                return FITS.get(row["outcome"])

            key = f"{attention}/{'on' if offload else 'off'}"
            if args.contexts:
                verdicts = {n: probe(n) for n in args.contexts}
                trained = [n for n, v in verdicts.items() if v]
                result["longest"][key] = {
                    "longest": max(trained, default=None),
                    "shortest_failing": min(
                        (n for n, v in verdicts.items() if v is False), default=None
                    ),
                    "stopped_at": None,
                    "probed": sorted(verdicts),
                }
            else:
                result["longest"][key] = search_longest(
                    probe, args.start, args.max_context, args.step
                )
            save(args, result)


def throughput(args, result: dict) -> None:
    n = args.throughput_context
    for attention in args.attention:
        for offload in (True, False):
            row, records = one_run(args, n, attention, offload, steps=args.tp_steps)
            timed = [r for r in records if r["step"] > 2]
            row["tokens_per_s"] = (
                statistics.median(r["perf/tokens_per_s"] for r in timed) if timed else None
            )
            row["measured_steps"] = len(timed)
            result["throughput"] = [
                r
                for r in result["throughput"]
                if (r["N"], r["attention"], r["offload"]) != (n, attention, offload)
            ] + [row]
            print(json.dumps({k: v for k, v in row.items() if k != "sets"}), flush=True)
            save(args, result)
        rates = {
            r["offload"]: r["tokens_per_s"]
            for r in result["throughput"]
            if r["N"] == n and r["attention"] == attention
        }
        if rates.get(True) and rates.get(False):
            result["throughput_ratio"][f"{attention}@{n}"] = rates[True] / rates[False]
            save(args, result)


def save(args, result: dict) -> None:
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")


def _gib(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(result: dict) -> str:
    lines = [f"device: {result['device']}, host memory {_gib(result.get('host_memory_gib'))} GiB"]
    lines.append("longest context that trains (one step + validation):")
    for key, found in sorted(result["longest"].items()):
        note = ""
        if found.get("stopped_at"):
            note = f" (search stopped: {found['stopped_at']:,} timed out or failed otherwise)"
        elif found.get("shortest_failing") is None:
            note = " (every context tried trained)"
        longest = f"{found['longest']:,}" if found.get("longest") else "none"
        failing = f"{found['shortest_failing']:,}" if found.get("shortest_failing") else "-"
        lines.append(f"  {key:16} longest {longest:>10}  first failing {failing:>10}{note}")
    lines.append(
        f"  {'attention':10} {'offload':7} {'N':>9} {'outcome':20} {'GPU GiB':>8} "
        f"{'offload host GiB':>16} {'pinned GiB':>10} {'wall s':>7}"
    )
    for r in sorted(result["probes"], key=lambda r: (r["attention"], r["offload"], r["N"])):
        lines.append(
            f"  {r['attention']:10} {'on' if r['offload'] else 'off':7} {r['N']:>9,} "
            f"{r['outcome']:20} {_gib(r['peak_memory_gib']):>8} {_gib(r['offload_host_gib']):>16} "
            f"{_gib(r['pinned_host_gib']):>10} {r['wall_s']:>7.0f}"
        )
    if result["throughput"]:
        lines.append("throughput (median tokens/s over the steps after the first two):")
        for r in sorted(result["throughput"], key=lambda r: (r["attention"], r["N"], r["offload"])):
            rate = f"{r['tokens_per_s']:,.0f} tokens/s" if r.get("tokens_per_s") else r["outcome"]
            lines.append(
                f"  {r['attention']:10} offload {'on ' if r['offload'] else 'off'} N {r['N']:,}: "
                f"{rate}, GPU {_gib(r['peak_memory_gib'])} GiB, "
                f"offload host {_gib(r['offload_host_gib'])} GiB"
            )
        for key, ratio in sorted(result["throughput_ratio"].items()):
            lines.append(f"  offload on / off, {key}: {ratio:.3f}")
    return "\n".join(lines)


def device_info(smoke: bool) -> dict:
    """The GPU's name and memory, read in a child process: a CUDA context in this one would
    hold GPU memory through every probe."""
    from lh_cp.train.plan import machine_memory_bytes

    info = {"host_memory_gib": machine_memory_bytes() / 2**30}
    if smoke:
        return {"device": "cpu", **info}
    code = (
        "import json, torch; p = torch.cuda.get_device_properties(0); print(json.dumps("
        "{'device': p.name, 'gpu_memory_gib': p.total_memory / 2**30, 'torch': torch.__version__}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), **info}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("runs/offload"), help="run folders")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/results/offload.json")
    p.add_argument("--fresh", action="store_true", help="ignore the runs already in --results")
    p.add_argument("--attention", default="lighthouse,dense", help="stages to measure")
    p.add_argument(
        "--offload", default="on,off", help="offload settings to search (throughput: both)"
    )
    p.add_argument("--start", type=int, default=262144)
    p.add_argument("--max-context", type=int, default=2097152)
    p.add_argument("--step", type=int, default=65536)
    p.add_argument("--contexts", default="", help="probe these N instead of searching")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--throughput-context", type=int, default=262144)
    p.add_argument("--tp-steps", type=int, default=6)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--timeout", type=float, default=1500, help="seconds per run")
    p.add_argument("--set", dest="extra_sets", action="append", default=[], help="more overrides")
    p.add_argument("--smoke", action="store_true", help="CPU, the quickstart model at 512 tokens")
    args = p.parse_args(argv)
    args.attention = [a for a in args.attention.split(",") if a]
    args.offload = [{"on": True, "off": False}[o] for o in args.offload.split(",") if o]
    args.contexts = [int(n) for n in args.contexts.split(",") if n]
    args.recipe, args.base_sets, args.env = GPU_RECIPE, [], FIT_ENV
    if args.smoke:
        args.recipe, args.base_sets, args.env = SMOKE_RECIPE, SMOKE_SETS, {"OMP_NUM_THREADS": "1"}
        args.start = args.max_context = args.throughput_context = 512
        args.step, args.tp_steps = 256, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()  # the runs start in the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    info = device_info(args.smoke)
    result = {"probes": [], "longest": {}, "throughput": [], "throughput_ratio": {}}
    if args.results.is_file() and not args.fresh:
        result = json.loads(args.results.read_text())
        if result.get("device") not in (None, info["device"]):
            raise SystemExit(
                f"{args.results} holds runs on {result['device']}, this is {info['device']}: "
                f"pass --fresh to start over, or another --results"
            )
    result.update(info)
    result["note"] = (
        "written by benchmarks/offload.py; tests/test_plan_memory.py holds lh-cp plan's "
        "estimate to every measured GPU peak here"
    )
    if not args.skip_throughput:
        throughput(args, result)
    if not args.skip_search:
        longest_contexts(args, result)
    save(args, result)
    print(table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
