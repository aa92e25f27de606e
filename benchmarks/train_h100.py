"""End-to-end training on one GPU: Lighthouse-stage throughput and the longest context that fits.

Throughput: recipes/h100_270m.toml (the paper's ~270M ablation model) trained by
`lh-cp train` for a few steps at each context, once with Lighthouse (layers 0, 1, 28, 29
dense) and once all-dense; tokens/s is the median over the steps after the first two
(compilation of kernels, allocator warm-up).

Fit probe: one training step of the same recipe at each given context (fits, peak memory).
The quality of the recovered model is benchmarks/quality.py's.

    python benchmarks/train_h100.py --out /tmp/train_h100     # on the GPU machine
    python benchmarks/train_h100.py --plot benchmarks/results/train_h100.json   # here

Writes train_h100.json (and the per-run metrics.jsonl under --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from runs import read_metrics, train

# The fit probe runs with the caching allocator's expandable segments (as launch/*.sh set
# it): without them a 768K step failed with 24 GiB reserved but unallocated (fragmentation).
FIT_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def throughput(
    args,
    recipe: str = "recipes/h100_270m.toml",
    extra_sets: tuple[str, ...] = (),
    profile_step: int = 0,
    tag: str = "tp",
) -> list[dict]:
    """tokens/s of `recipe` at each of args.contexts, Lighthouse and all-dense, each run alone.
    With profile_step, that step runs under torch.profiler (metrics.profile_step) and is left
    out of the median, as are the first two."""
    rows = []
    for n in [int(x) for x in args.contexts.split(",")]:
        for attention in ("lighthouse", "dense"):
            run_dir = args.out / f"{tag}_{attention}_{n}"
            sets = [
                f"data.seq_len={n}",
                f"stages.0.attention='{attention}'",
                f"stages.0.steps={args.tp_steps}",
                f"metrics.profile_step={profile_step}",
                # The stage-end validation only: no leak probe (16 extra steps' worth of work).
                "eval.leak=false",
                "eval.val_batches=1",
                *extra_sets,
            ]
            seconds, code, tail = train(recipe, run_dir, sets, args.tp_timeout, env=FIT_ENV)
            steps = [
                r
                for r in read_metrics(run_dir)
                if r["kind"] == "train" and r["step"] > 2 and r["step"] != profile_step
            ]
            row = {
                "N": n,
                "attention": attention,
                "exit_code": code,
                "wall_s": seconds,
                "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steps)
                if steps
                else None,
                "step_s": statistics.median(n / r["perf/tokens_per_s"] for r in steps)
                if steps
                else None,
                "peak_memory_gib": max((r["perf/peak_memory_gib"] for r in steps), default=None),
                "mfu": statistics.median(r["perf/mfu"] for r in steps) if steps else None,
                "measured_steps": len(steps),
                "sets": sets,
            }
            if profile_step:
                row["profile"] = str(run_dir / f"profile_step{profile_step}_rank0.txt")
            if code != 0:
                row["error_tail"] = tail[-600:]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def fit_probe(args) -> list[dict]:
    """One training step of the 270M recipe at each context: does it fit, and its peak memory."""
    rows = []
    for item in args.fit_probe.split(","):
        attention, n = item.split(":")
        run_dir = args.out / f"fit_{attention}_{n}"
        # The default 2% validation split of the embedded corpus (369,500 tokens) holds no
        # sequence longer than that, and the stage end always validates: hold out 10%.
        sets = [
            f"data.seq_len={int(n)}",
            f"stages.0.attention='{attention}'",
            "stages.0.steps=1",
            "schedule.warmup_steps=0",
            "data.validation_fraction=0.1",
            "eval.val_batches=1",
        ]
        seconds, code, tail = train(
            "recipes/h100_270m.toml", run_dir, sets, args.tp_timeout, env=FIT_ENV
        )
        step = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
        row = {
            "N": int(n),
            "attention": attention,
            "exit_code": code,
            "wall_s": seconds,
            "fits": code == 0 and bool(step),
            "peak_memory_gib": step[0]["perf/peak_memory_gib"] if step else None,
            "first_step_tokens_per_s": step[0]["perf/tokens_per_s"] if step else None,
            "out_of_memory": "OutOfMemoryError" in tail,
            "env": FIT_ENV,
        }
        if code != 0:
            row["error_tail"] = tail[-1500:]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(result_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(result_path.read_text())
    rows = result.get("throughput", [])
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for attention in ("lighthouse", "dense"):
            points = [
                (r["N"], r["tokens_per_s"])
                for r in rows
                if r["attention"] == attention and r["tokens_per_s"]
            ]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=attention)
        ax.set_xscale("log", base=2), ax.set_xlabel("context (tokens)"), ax.set_ylabel("tokens/s")
        ax.set_title("~270M model, one GPU, bf16, activation checkpointing")
        ax.legend()
        fig.tight_layout()
        fig.savefig(result_path.with_name("train_h100_throughput.png"), dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("runs/train_h100"))
    p.add_argument("--contexts", default="32768,65536,131072")
    p.add_argument("--tp-steps", type=int, default=6)
    p.add_argument("--tp-timeout", type=float, default=240)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument(
        "--fit-probe",
        default="",
        help="attention:N pairs, one training step each, e.g. lighthouse:524288,dense:262144",
    )
    p.add_argument(
        "--plot", type=Path, default=None, help="only draw the PNGs of an existing result file"
    )
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return 0
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "commands": {
            "throughput": "lh-cp train recipes/h100_270m.toml --set data.seq_len=N --set stages.0.attention=..."
        },
    }
    if not args.skip_throughput:
        result["throughput"] = throughput(args)
        by = {(r["N"], r["attention"]): r["tokens_per_s"] for r in result["throughput"]}
        if by.get((131072, "lighthouse")) and by.get((131072, "dense")):
            result["throughput_ratio_128k"] = by[(131072, "lighthouse")] / by[(131072, "dense")]
    if args.fit_probe:
        result["fit_probe"] = fit_probe(args)
    (args.out / "train_h100.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "throughput"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
