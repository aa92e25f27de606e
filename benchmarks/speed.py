"""Speed on one GPU (issue 18): the CP Lighthouse layer at W = 1 against the single-GPU layer,
and end-to-end `lh-cp train` throughput of the paper's 270M model, Lighthouse stage vs dense.

CP at W = 1: benchmarks/cp_multigpu.py under torchrun with one process (the CP code path with
no communication, both exchanges, timed in the same run as the single-GPU layer; 128K tokens,
B=1, H=8, D=128, bf16, pool 4, levels 3, topk 2048, forward+backward, median of 10). The
headline ratio is --paired's: single and CP timed in turn within each repeat, the median of
the ten per-repeat ratios, the slower exchange's (the blocked timing's ratio is kept beside it).
Training: benchmarks/train_h100.py's throughput loop (recipes/h100_270m.toml: 30 layers, dim
1024, 8 heads, layers 0, 1, 28, 29 dense; tokens/s median over the steps after the first two
and after the profiled one), each run alone on the GPU.

    python benchmarks/speed.py --out /tmp/speed --label after --result benchmarks/results/speed_h200.json \\
        --contexts 32768,65536,131072,262144 --profile-step 3 --set parallel.compile=true

Each call adds its numbers under result["runs"][label]; the headline keys cp_w1_over_single_128k
(the slower exchange's CP / single ratio) and train_ratio_128k (Lighthouse over dense tokens/s)
are the latest label's that measured them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from cp_multigpu import NVLS_OFF as CP_ENV  # NVLink multicast stays off
from runs import REPO
from train_h100 import throughput


def cp_w1(out: Path, profile: bool) -> dict:
    result_path = out / "cp_w1.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        str(REPO / "benchmarks/cp_multigpu.py"),
        "--skip-check",
        "--scale-kinds",
        "lighthouse",
        "--repeats",
        "10",
        "--paired",
        "--out",
        str(result_path),
    ] + (["--profile"] if profile else [])
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **CP_ENV}, timeout=600
    )
    log = done.stdout + done.stderr
    (out / "cp_w1.log").write_text(log)
    if done.returncode != 0:
        raise SystemExit(f"cp_multigpu.py failed (exit {done.returncode}):\n{log[-3000:]}")
    result = json.loads(result_path.read_text())
    rows, paired = result["scaling"], result["paired"]
    ratios = {r["exchange"]: r["cp_ms"] / r["single_gpu_ms"] for r in rows}
    paired_ratios = {r["exchange"]: r["paired_ratio"] for r in paired}
    for r in rows:
        print(
            f"CP W=1 {r['exchange']:9}: single {r['single_gpu_ms']:.2f} ms, CP {r['cp_ms']:.2f} ms, "
            f"ratio {ratios[r['exchange']]:.3f}; paired {paired_ratios[r['exchange']]:.3f}",
            flush=True,
        )
    return {
        "command": " ".join(cmd[1:]),
        "rows": rows,
        "ratio_by_exchange": ratios,
        "paired": paired,
        "paired_ratio_by_exchange": paired_ratios,
        "cp_w1_over_single_128k": max(paired_ratios.values()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="run directories, logs and profiles")
    p.add_argument(
        "--label",
        required=True,
        help="name of this measurement in the result file, e.g. before, after",
    )
    p.add_argument("--result", type=Path, default=None, help="JSON file to add this measurement to")
    p.add_argument("--skip-cp", action="store_true")
    p.add_argument(
        "--cp-profile", action="store_true", help="also print a profile of one CP W=1 step"
    )
    p.add_argument(
        "--contexts",
        default="131072",
        help="training contexts, comma-separated; empty = no training",
    )
    p.add_argument("--tp-steps", type=int, default=6)
    p.add_argument("--tp-timeout", type=float, default=420)
    p.add_argument(
        "--profile-step",
        type=int,
        default=0,
        help="profile this training step (metrics.profile_step)",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        help="extra recipe --set for every training run",
    )
    args = p.parse_args(argv)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    run = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sets": args.sets}
    if not args.skip_cp:
        run["cp_w1"] = cp_w1(args.out, args.cp_profile)
    if args.contexts:
        rows = throughput(args, extra_sets=tuple(args.sets), profile_step=args.profile_step)
        run["train"] = rows
        by = {(r["N"], r["attention"]): r["tokens_per_s"] for r in rows}
        if by.get((131072, "lighthouse")) and by.get((131072, "dense")):
            run["train_ratio_128k"] = by[(131072, "lighthouse")] / by[(131072, "dense")]
        for n in sorted({r["N"] for r in rows}):
            lh, dense = by.get((n, "lighthouse")), by.get((n, "dense"))
            ratio = f"{lh / dense:.2f}x" if lh and dense else "-"
            print(
                f"train N={n}: Lighthouse {lh or 0:,.0f} tok/s, dense {dense or 0:,.0f} tok/s, {ratio}",
                flush=True,
            )
    (args.out / f"speed_{args.label}.json").write_text(json.dumps(run, indent=1) + "\n")
    if args.result:
        result = json.loads(args.result.read_text()) if args.result.is_file() else {"runs": {}}
        result["runs"][args.label] = run
        for key, source in (("cp_w1_over_single_128k", "cp_w1"), ("train_ratio_128k", None)):
            value = run.get(source, {}).get(key) if source else run.get(key)
            if value is not None:
                result[key], result[key + "_from"] = value, args.label
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
