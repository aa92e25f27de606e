"""Quality of Lighthouse + dense recovery against dense training from scratch, over seeds.

Every arm is recipes/quality_16k.toml (the paper's protocol scaled to one GPU: a ~25M byte
model at 16K context on the 'python' corpus, AdamW 2e-3, 12.5% warmup, then constant) with
a few --set overrides; each runs once per seed (run.seed = data.seed = the seed), so the arms
of one seed share initial weights and data order. Arms (steps for the default 1,600):
  dense               dense attention throughout (the baseline)
  paper_split         Lighthouse 62.5% (1,000 steps), then dense 37.5% (600): the paper's split
  split_75_25         Lighthouse 75%, then dense 25%
  paper_split_wsd     the paper's split under 'wsd': the learning rate decays (to 0.1x) over
                      the whole recovery stage, and only there
  dense_wsd           dense throughout under the same 'wsd' curve (baseline of the arm above)
  paper_split_pool2   the paper's split with pool 2 (topk 1024, tile budget 128: the same tile
                      T = 2048, S/N 50% instead of 18.75%)
  paper_split_causal  the paper's split with the strictly causal selection (docs/LIGHTHOUSE.md
                      s.11; same S)
  paper_split_causal_pool2  the same with pool 2 (as paper_split_pool2)
  dense_docs          dense throughout with packed documents kept apart (data.document_masking:
                      a source file is a document)
  paper_split_docs    the paper's split with document masking in both stages (LIGHTHOUSE.md
                      s.12), compared with dense_docs
  paper_split_dilated, paper_split_gla  the paper's split with the "dilated" or "gla" selection
                      scorer (LIGHTHOUSE.md s.13; gla needs fla-core on CUDA), compared with
                      paper_split
  paper_split_rope_entries  the paper's split with lighthouse.rope='entries' (RoPE applied to
                      each pooled entry at its last token, LIGHTHOUSE.md s.14), compared with
                      paper_split
Comparisons use val/loss_dense (every layer dense, same validation batches). Per arm:
the final dense-mode validation loss of each seed, mean and standard deviation (n - 1); the
loss jump at the switch (mean training loss of the first 10 dense steps minus that of the
last 10 Lighthouse steps); the crossing step (the first validation after the switch from
which the arm's seed-mean dense-mode loss stays below its baseline's: dense, or dense_wsd for
the wsd arm); the leak metric at the last Lighthouse-stage validation (lh_cp/train/leak.py; in a
dense arm it is measured in dense mode, where it is exactly zero); throughput and wall time
from runs alone on the GPU (--timing-steps: each attention configuration trains alone for a
few steps; an arm's wall time = sum over its stages of steps * tokens per step / that
throughput). The training runs themselves share the GPU (--parallel), so their own
tokens/s are not speed measurements.
Retrieval probe: with --passkey-length L > 0 (default 2048) every run ends with the passkey
evaluation ([eval.passkey], lh_cp/data/passkey.py) at L tokens in its final stage's attention
(dense after the recovery); per arm the mean accuracy over depths and samples, per seed and
averaged (printed after the table; --passkey-length 0 skips it).

    python benchmarks/quality.py --out /tmp/quality --parallel 6        # on the GPU machine
    python benchmarks/quality.py --plot benchmarks/results/quality.json  # here: the PNGs (<stem>_*.png)
    python benchmarks/quality.py --plot benchmarks/results/quality_causal.json --merge more.json  # arms of two runs
    python benchmarks/quality.py --out /tmp/q --tiny --arms dense,paper_split --seeds 0 --device cpu   # smoke test

A rerun skips runs already finished (a `done` file in the run folder) and resumes unfinished
ones from their checkpoints. Writes <out>/quality.json (the layout CI's checks read:
{"dense_arm", "paper_split_arm", "arms": {name: {"final_dense_val_loss": [...], ...}}}).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from runs import REPO, read_metrics, train

RECIPE = "recipes/quality_16k.toml"
JUMP_STEPS = 10  # steps on each side of the switch averaged for the loss jump
# The leak metrics read at the switch (lh_cp/train/leak.py); other documents: where the data
# has end-of-document tokens.
LEAKS = ("leak_next_token_nats", "leak_near_future_nats", "leak_other_documents_nats")
# A CPU smoke test of the whole pipeline: the recipe shrunk to seconds per run.
TINY = [
    "model.dim=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=128",
    "data.seq_len=1024",
    "lighthouse.topk=64",
    "lighthouse.tile_budget=16",
    "eval.val_interval=10",
    "eval.val_batches=1",
    "eval.leak_positions=4",
    "checkpoint.interval=0",
    "data.source='stdlib'",
]


@dataclass(frozen=True)
class Arm:
    name: str
    lighthouse_fraction: float  # share of the steps in the Lighthouse stage (0: dense throughout)
    baseline: str  # the dense arm it is compared with
    sets: tuple[str, ...] = ()  # further --set overrides
    wsd: bool = False  # decay the learning rate over the recovery stage's length, at the end

    def overrides(self, steps: int, seed: int) -> list[str]:
        lighthouse = round(self.lighthouse_fraction * steps)
        dense = steps - lighthouse
        stages = (
            [f"{{name='dense', attention='dense', steps={steps}}}"]
            if not lighthouse
            else [
                f"{{name='lighthouse', attention='lighthouse', steps={lighthouse}}}",
                f"{{name='recovery', attention='dense', steps={dense}}}",
            ]
        )
        sets = [
            f"stages=[{', '.join(stages)}]",
            f"schedule.warmup_steps={steps // 8}",
            f"run.seed={seed}",
            f"data.seed={seed}",
            f"run.name='{self.name}-seed{seed}'",
        ]
        if self.wsd:
            sets += [
                "schedule.decay='wsd'",
                f"schedule.decay_steps={round(0.375 * steps)}",
                "schedule.min_lr_ratio=0.1",
            ]
        return sets + list(self.sets)


# Dense arms measure the leak metric in dense mode (it must come out exactly zero).
DENSE_LEAK_CHECK = ("eval.leak_in_dense_stages=true",)
DOCUMENTS = ("data.document_masking=true",)
ARMS = {
    arm.name: arm
    for arm in (
        Arm("dense", 0.0, "dense", DENSE_LEAK_CHECK),
        Arm("paper_split", 0.625, "dense"),
        Arm("split_75_25", 0.75, "dense"),
        Arm("paper_split_wsd", 0.625, "dense_wsd", wsd=True),
        Arm("dense_wsd", 0.0, "dense_wsd", DENSE_LEAK_CHECK, wsd=True),
        Arm(
            "paper_split_pool2",
            0.625,
            "dense",
            ("lighthouse.pool=2", "lighthouse.topk=1024", "lighthouse.tile_budget=128"),
        ),
        Arm("paper_split_causal", 0.625, "dense", ("lighthouse.selection='causal'",)),
        # Packed documents kept apart (data.document_masking; docs/LIGHTHOUSE.md s.12): a
        # source file is a document; both arms mask, so they compare like with like.
        Arm("dense_docs", 0.0, "dense_docs", (*DENSE_LEAK_CHECK, *DOCUMENTS)),
        Arm("paper_split_docs", 0.625, "dense_docs", DOCUMENTS),
        # RoPE at pooled entries (LIGHTHOUSE.md s.14): same selection, only coarse entries
        # change, so it is compared with the paper's split itself.
        Arm("paper_split_rope_entries", 0.625, "paper_split", ("lighthouse.rope='entries'",)),
        Arm(
            "paper_split_causal_pool2",
            0.625,
            "dense",
            (
                "lighthouse.selection='causal'",
                "lighthouse.pool=2",
                "lighthouse.topk=1024",
                "lighthouse.tile_budget=128",
            ),
        ),
        # The paper's other two selection scorers (docs/LIGHTHOUSE.md s.13), against its split.
        *(
            Arm(f"paper_split_{scorer}", 0.625, "paper_split", (f"lighthouse.scorer='{scorer}'",))
            for scorer in ("dilated", "gla")
        ),
    )
}
DENSE_ARM, PAPER_SPLIT_ARM = "dense", "paper_split"
# Attention configurations timed alone: (name, --set overrides).
TIMED = {
    "dense": ["stages.0.attention='dense'"],
    "lighthouse_pool4": ["stages.0.attention='lighthouse'"],
    "lighthouse_pool2": [
        "stages.0.attention='lighthouse'",
        "lighthouse.pool=2",
        "lighthouse.topk=1024",
        "lighthouse.tile_budget=128",
    ],
    "lighthouse_causal": ["stages.0.attention='lighthouse'", "lighthouse.selection='causal'"],
    "lighthouse_causal_pool2": [
        "stages.0.attention='lighthouse'",
        "lighthouse.selection='causal'",
        "lighthouse.pool=2",
        "lighthouse.topk=1024",
        "lighthouse.tile_budget=128",
    ],
    **{
        f"lighthouse_{scorer}": ["stages.0.attention='lighthouse'", f"lighthouse.scorer='{scorer}'"]
        for scorer in ("dilated", "gla")
    },
    "lighthouse_rope_entries": ["stages.0.attention='lighthouse'", "lighthouse.rope='entries'"],
}


def stage_timing_key(arm: Arm, attention: str) -> str:
    if attention == "dense":
        return "dense"
    scorers = [s.split("=")[1].strip("'") for s in arm.sets if s.startswith("lighthouse.scorer=")]
    if scorers:
        return f"lighthouse_{scorers[0]}"
    if "lighthouse.rope='entries'" in arm.sets:
        return "lighthouse_rope_entries"
    causal = "_causal" if "lighthouse.selection='causal'" in arm.sets else ""
    if "lighthouse.pool=2" in arm.sets:
        return f"lighthouse{causal}_pool2"
    return "lighthouse_causal" if causal else "lighthouse_pool4"


# ---------------------------------------------------------------------------- running


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / f"{arm}-seed{seed}"


def run_one(args, arm: Arm, seed: int, common: list[str]) -> dict:
    folder = run_dir(args.out, arm.name, seed)
    if (folder / "done").is_file():
        return json.loads((folder / "done").read_text())
    # One intra-op thread each: several runs share the machine's cores.
    seconds, code, tail = train(
        RECIPE,
        folder,
        common + arm.overrides(args.steps, seed),
        args.run_timeout,
        env={"OMP_NUM_THREADS": "1"},
        log=folder / "console.log",
    )
    result = {"arm": arm.name, "seed": seed, "exit_code": code, "wall_s_shared_gpu": seconds}
    if code == 0:
        (folder / "done").write_text(json.dumps(result))
    else:
        result["error_tail"] = tail[-1500:]
    return result


def run_all(args, common: list[str]) -> list[dict]:
    jobs = [
        (ARMS[name], seed) for seed in args.seeds for name in args.arms
    ]  # seed-major: whole seeds first
    results, lock, began = [], threading.Lock(), time.perf_counter()

    def one(job):
        arm, seed = job
        result = run_one(args, arm, seed, common)
        with lock:
            results.append(result)
            done, elapsed = len(results), time.perf_counter() - began
            eta = elapsed / done * (len(jobs) - done)
            status = "ok" if result["exit_code"] == 0 else f"FAILED (exit {result['exit_code']})"
            print(
                f"[quality] {done}/{len(jobs)} {arm.name} seed {seed}: {status}, {result['wall_s_shared_gpu']:.0f} s; "
                f"elapsed {elapsed:.0f} s, eta {eta:.0f} s",
                flush=True,
            )
        return result

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(one, jobs))
    return results


def time_alone(args, common: list[str]) -> dict:
    """tokens/s of each attention configuration trained alone on the device (median over the
    steps after the first 10: kernel compilation, allocator warm-up)."""
    timing, needed = {}, set()
    for name in args.arms:
        arm = ARMS[name]
        needed |= {stage_timing_key(arm, "dense")} | (
            {stage_timing_key(arm, "lighthouse")} if arm.lighthouse_fraction else set()
        )
    for name, sets in TIMED.items():
        if name not in needed:
            continue
        folder = args.out / "timing" / name
        steps = args.timing_steps
        stage = [
            f"stages=[{{name='timed', attention='dense', steps={steps}}}]",
            "schedule.warmup_steps=1",
            "eval.leak=false",
            "eval.leak_in_dense_stages=false",
            "eval.passkey.enabled=false",
            "checkpoint.interval=0",
        ]
        seconds, code, tail = train(
            RECIPE, folder, common + stage + sets, args.run_timeout, log=folder / "console.log"
        )
        rates = [
            r["perf/tokens_per_s"]
            for r in read_metrics(folder)
            if r["kind"] == "train" and r["step"] > 10
        ]
        timing[name] = {
            "tokens_per_s": statistics.median(rates) if rates else None,
            "steps": len(rates),
            "exit_code": code,
        }
        if code != 0:
            timing[name]["error_tail"] = tail[-1500:]
        print(f"[quality] alone: {name} {timing[name]['tokens_per_s']} tokens/s", flush=True)
    return timing


# ---------------------------------------------------------------------------- summarising


def series(metrics: list[dict], kind: str, key: str) -> list[list[float]]:
    """[[step, value]] of `key` over the records of `kind` that hold it, by step."""
    return sorted([r["step"], r[key]] for r in metrics if r["kind"] == kind and key in r)


def switch_step(arm: Arm, steps: int) -> int | None:
    """The last Lighthouse step (the recovery stage starts after it), None for dense arms."""
    return round(arm.lighthouse_fraction * steps) or None


def loss_jump(
    train_loss: list[list[float]], last_lighthouse: int, width: int = JUMP_STEPS
) -> float | None:
    """Mean train loss of the `width` steps after the switch minus that of the `width` steps
    up to it (None if the log lacks them)."""
    losses = dict((int(s), v) for s, v in train_loss)
    before = [losses.get(s) for s in range(last_lighthouse - width + 1, last_lighthouse + 1)]
    after = [losses.get(s) for s in range(last_lighthouse + 1, last_lighthouse + width + 1)]
    if None in before or None in after:
        return None
    return sum(after) / width - sum(before) / width


def seed_mean(curves: list[list[list[float]]]) -> dict[int, float]:
    """step -> mean over the curves of the value at that step (steps present in every curve)."""
    common = set.intersection(*(set(int(s) for s, _ in c) for c in curves)) if curves else set()
    return {
        s: statistics.fmean(dict((int(k), v) for k, v in c)[s] for c in curves)
        for s in sorted(common)
    }


def crossing_step(
    arm_mean: dict[int, float], baseline_mean: dict[int, float], after: int
) -> int | None:
    """First validation step > `after` from which arm_mean stays below baseline_mean at every
    later common step; None if it never does (or ends above)."""
    steps = [s for s in sorted(arm_mean) if s > after and s in baseline_mean]
    crossing = None
    for s in steps:
        if arm_mean[s] < baseline_mean[s]:
            crossing = crossing or s
        else:
            crossing = None
    return crossing


def summarise(args, runs: list[dict], timing: dict | None) -> dict:
    steps, tokens_per_step = args.steps, args.seq_len * args.batch_size
    arms = {}
    for name in args.arms:
        arm = ARMS[name]
        per_seed = {}
        for seed in args.seeds:
            metrics = read_metrics(run_dir(args.out, name, seed))
            val_dense = series(metrics, "val", "val/loss_dense")
            if not val_dense or val_dense[-1][0] != steps:
                continue  # unfinished or failed: reported under "runs"
            last = switch_step(arm, steps)
            leak_at = (
                last if last else steps
            )  # the stage-1 end, or the final (dense-mode) validation
            leak = {
                k: dict((int(s), v) for s, v in series(metrics, "val", f"val/{k}")).get(leak_at)
                for k in LEAKS
            }
            train_loss = series(metrics, "train", "train/loss")
            per_seed[seed] = {
                "final_dense_val_loss": val_dense[-1][1],
                "val_loss_dense": val_dense,
                "val_loss": series(metrics, "val", "val/loss"),
                "leak_next_token_nats": series(metrics, "val", "val/leak_next_token_nats"),
                "leak_near_future_nats": series(metrics, "val", "val/leak_near_future_nats"),
                "leak_other_documents_nats": series(
                    metrics, "val", "val/leak_other_documents_nats"
                ),
                "leak_at_switch": leak,
                "passkey_accuracy": passkey_accuracy(metrics),
                "switch_jump_train_nats": loss_jump(train_loss, last) if last else None,
                "train_loss": train_loss,
            }
        finals = [r["final_dense_val_loss"] for r in per_seed.values()]
        jumps = [
            r["switch_jump_train_nats"]
            for r in per_seed.values()
            if r["switch_jump_train_nats"] is not None
        ]
        leaks = {
            k: [
                r["leak_at_switch"][k]
                for r in per_seed.values()
                if r["leak_at_switch"][k] is not None
            ]
            for k in LEAKS
        }
        lighthouse_steps = round(arm.lighthouse_fraction * steps)
        stage_steps = [("lighthouse", lighthouse_steps), ("dense", steps - lighthouse_steps)]
        rates = {
            a: (timing or {}).get(stage_timing_key(arm, a), {}).get("tokens_per_s")
            for a, _ in stage_steps
        }
        wall = None
        if all(rates[a] for a, n in stage_steps if n):
            wall = sum(n * tokens_per_step / rates[a] for a, n in stage_steps if n)
        arms[name] = {
            "baseline": arm.baseline,
            "overrides_seed0": arm.overrides(steps, 0),
            "lighthouse_steps": lighthouse_steps,
            "dense_steps": steps - lighthouse_steps,
            "seeds": sorted(per_seed),
            "final_dense_val_loss": finals,
            "final_dense_val_loss_mean": statistics.fmean(finals) if finals else None,
            "final_dense_val_loss_std": statistics.stdev(finals) if len(finals) > 1 else None,
            "switch_jump_train_nats": statistics.fmean(jumps) if jumps else None,
            "leak_next_token_nats": statistics.fmean(leaks["leak_next_token_nats"])
            if leaks["leak_next_token_nats"]
            else None,
            "leak_near_future_nats": statistics.fmean(leaks["leak_near_future_nats"])
            if leaks["leak_near_future_nats"]
            else None,
            "leak_other_documents_nats": statistics.fmean(leaks["leak_other_documents_nats"])
            if leaks["leak_other_documents_nats"]
            else None,
            "passkey_accuracy_mean": mean_of([r["passkey_accuracy"] for r in per_seed.values()]),
            "tokens_per_s_alone": rates,
            "train_wall_s_alone": wall,
            "per_seed": {str(s): r for s, r in per_seed.items()},
        }
    derive_comparisons(arms)
    return {"dense_arm": DENSE_ARM, "paper_split_arm": PAPER_SPLIT_ARM, "arms": arms, "runs": runs}


def passkey_accuracy(metrics: list[dict]) -> float | None:
    """Mean passkey accuracy over the depths of the run's passkey record (kind "passkey",
    keys passkey/depth_<d>), None if the run has none."""
    records = [r for r in metrics if r["kind"] == "passkey"]
    if not records:
        return None
    depths = [v for k, v in records[-1].items() if k.startswith("passkey/depth_")]
    return statistics.fmean(depths) if depths else None


def mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def format_passkey(result: dict) -> str:
    """One line per arm: passkey accuracy per seed and its mean (the retrieval probe)."""
    lines = [f"passkey retrieval at {result.get('passkey_length')} tokens, mean over depths:"]
    for name, arm in result["arms"].items():
        per_seed = [r.get("passkey_accuracy") for r in arm["per_seed"].values()]
        shown = ", ".join("-" if v is None else f"{v:.0%}" for v in per_seed)
        mean = arm.get("passkey_accuracy_mean")
        lines.append(f"  {name}: {shown} (mean {'-' if mean is None else f'{mean:.0%}'})")
    return "\n".join(lines)


def derive_comparisons(arms: dict) -> None:
    """Each arm against its baseline, from the per-seed results alone (so a stored result file
    can be re-derived): crossing_step, the difference of the means, and the paired difference
    (arm minus baseline on the same seed: same initial weights and data order) per seed, with
    its mean and standard deviation."""
    for result in arms.values():
        baseline = arms.get(result["baseline"])
        result["crossing_step"] = result["minus_baseline_final_mean"] = None
        result["paired_minus_baseline"], result["paired_minus_baseline_mean"] = {}, None
        result["paired_minus_baseline_std"] = None
        if not baseline or baseline is result or not result["seeds"] or not baseline["seeds"]:
            continue
        if result["lighthouse_steps"]:
            mine = seed_mean([r["val_loss_dense"] for r in result["per_seed"].values()])
            theirs = seed_mean([r["val_loss_dense"] for r in baseline["per_seed"].values()])
            result["crossing_step"] = crossing_step(mine, theirs, result["lighthouse_steps"])
        result["minus_baseline_final_mean"] = (
            result["final_dense_val_loss_mean"] - baseline["final_dense_val_loss_mean"]
        )
        paired = {
            seed: mine["final_dense_val_loss"] - baseline["per_seed"][seed]["final_dense_val_loss"]
            for seed, mine in result["per_seed"].items()
            if seed in baseline["per_seed"]
        }
        result["paired_minus_baseline"] = paired
        if paired:
            result["paired_minus_baseline_mean"] = statistics.fmean(paired.values())
        if len(paired) > 1:
            result["paired_minus_baseline_std"] = statistics.stdev(paired.values())


# ---------------------------------------------------------------------------- plots


def plot(result_path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(result_path.read_text())
    arms = {n: a for n, a in result["arms"].items() if a["seeds"]}
    steps = result["steps"]
    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    written = []

    def band(ax, curves, color, label, x_of=lambda s: s):
        mean = seed_mean(curves)
        xs = [x_of(s) for s in mean]
        values = {s: [dict((int(k), v) for k, v in c)[s] for c in curves] for s in mean}
        ax.plot(xs, list(mean.values()), color=color, label=label, linewidth=1.4)
        if len(curves) > 1:
            ax.fill_between(
                xs,
                [min(v) for v in values.values()],
                [max(v) for v in values.values()],
                color=color,
                alpha=0.18,
            )

    # Dense-mode validation loss by step: whole run and the second half, zoomed.
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, first in zip(axes, (0, steps // 2)):
        for name, arm in arms.items():
            curves = [
                [p for p in r["val_loss_dense"] if p[0] >= first] for r in arm["per_seed"].values()
            ]
            band(ax, curves, colors[name], f"{name} ({len(curves)} seeds)")
            if arm["lighthouse_steps"] and arm["lighthouse_steps"] >= first:
                ax.axvline(
                    arm["lighthouse_steps"] + 0.5, color=colors[name], linestyle=":", linewidth=1
                )
        (
            ax.set_xlabel("step"),
            ax.set_ylabel("validation loss, every layer dense (nats/byte)"),
            ax.grid(alpha=0.3),
        )
    axes[0].set_title("whole run (dotted: switch to dense)")
    axes[1].set_title(f"from step {steps // 2}")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{result['recipe']}: mean over seeds, band = min..max")
    fig.tight_layout()
    written.append(result_path.with_name(f"{result_path.stem}_val_by_step.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # The same against training time alone on the GPU (stage throughputs from the timing runs).
    tokens_per_step = result["seq_len"] * result["batch_size"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, arm in arms.items():
        rates = arm["tokens_per_s_alone"]
        if not all(rates.get(a) for a in ("lighthouse", "dense") if arm[f"{a}_steps"]):
            continue
        split = arm["lighthouse_steps"]

        def seconds(step, split=split, rates=rates):
            lh = min(step, split)
            return (
                lh / (rates["lighthouse"] or 1) + (step - lh) / rates["dense"]
            ) * tokens_per_step

        curves = [
            [p for p in r["val_loss_dense"] if p[0] >= steps // 4] for r in arm["per_seed"].values()
        ]
        band(ax, curves, colors[name], name, x_of=seconds)
    ax.set_xlabel("training seconds alone on the GPU (steps x tokens / measured throughput)")
    ax.set_ylabel("validation loss, every layer dense"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_title(f"from step {steps // 4}: loss against time")
    fig.tight_layout()
    written.append(result_path.with_name(f"{result_path.stem}_val_by_time.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # The leak metric through the Lighthouse stage (and, after it, in dense mode: zero).
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, title in zip(
        axes,
        ("leak_next_token_nats", "leak_near_future_nats"),
        ("input at t+1 replaced", "inputs at t+2..t+4 replaced"),
    ):
        for name, arm in arms.items():
            curves = [r[key] for r in arm["per_seed"].values() if r[key]]
            if curves:
                band(ax, curves, colors[name], name)
        ax.axhline(0.0, color="black", linewidth=0.8)
        (
            ax.set_xlabel("step"),
            ax.set_ylabel("loss increase at t (nats)"),
            ax.set_title(title),
            ax.grid(alpha=0.3),
        )
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "leak metric: how much the loss at t reads later inputs (a causal model: exactly 0)"
    )
    fig.tight_layout()
    written.append(result_path.with_name(f"{result_path.stem}_leak.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def format_table(result: dict) -> str:
    rows = [
        "| arm | seeds | final dense-mode val loss (per seed) | mean | std | paired minus baseline: mean (std) | "
        "jump at switch | crossing step | leak t+1 (nats) | leak t+2..4 | tokens/s alone (LH / "
        "dense) | train time alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(x, fmt=".4f"):
        return "-" if x is None else format(x, fmt)

    for name, arm in result["arms"].items():
        rates = arm["tokens_per_s_alone"]
        rows.append(
            f"| {name} | {len(arm['seeds'])} | {', '.join(num(v) for v in arm['final_dense_val_loss'])} | "
            f"{num(arm['final_dense_val_loss_mean'])} | {num(arm['final_dense_val_loss_std'])} | "
            f"{num(arm.get('paired_minus_baseline_mean'), '+.4f')} "
            f"({num(arm.get('paired_minus_baseline_std'))}) vs {arm['baseline']} | "
            f"{num(arm['switch_jump_train_nats'], '+.3f')} | "
            f"{arm['crossing_step'] if arm['crossing_step'] is not None else '-'} | "
            f"{num(arm['leak_next_token_nats'], '+.4f')} | "
            f"{num(arm['leak_near_future_nats'], '+.4f')} | "
            f"{num(rates.get('lighthouse') if arm['lighthouse_steps'] else None, ',.0f')} / "
            f"{num(rates.get('dense'), ',.0f')} | "
            f"{num(arm['train_wall_s_alone'], '.0f')} s |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1600, help="total steps of every arm")
    p.add_argument("--parallel", type=int, default=6, help="training runs at a time on the device")
    p.add_argument(
        "--timing-steps",
        type=int,
        default=60,
        help="steps of each alone-on-the-GPU timing run (0: none)",
    )
    p.add_argument("--run-timeout", type=float, default=3600)
    p.add_argument(
        "--passkey-length",
        type=int,
        default=2048,
        help="tokens of the passkey evaluation every run ends with (0: none)",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--tiny", action="store_true", help="a shrunken model and sequence: a CPU smoke test"
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="only draw the PNGs (and print the table) of a result file",
    )
    p.add_argument(
        "--collect", action="store_true", help="train nothing: summarise the runs finished so far"
    )
    p.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="with --plot: first add the arms of this result file (same recipe and steps); repeatable",
    )
    args = p.parse_args(argv)
    if args.plot:
        result = json.loads(args.plot.read_text())
        for other_path in args.merge:
            other = json.loads(other_path.read_text())
            if (other["recipe"], other["steps"]) != (result["recipe"], result["steps"]):
                p.error(
                    f"--merge {other_path}: recipe/steps {other['recipe']}/{other['steps']} differ from "
                    f"{result['recipe']}/{result['steps']}"
                )
            result["arms"].update(other["arms"])
            result["runs"] = result.get("runs", []) + other.get("runs", [])
        derive_comparisons(result["arms"])  # a stored file gets the current definitions
        args.plot.write_text(json.dumps(result, indent=1))
        for path in plot(args.plot):
            print(f"wrote {path}")
        print(format_table(result))
        return 0
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    sys.path.insert(0, str(REPO))
    import torch

    from lh_cp.data.corpus import describe_python_corpus
    from lh_cp.train.recipe import load_recipe

    common = (
        [f"run.device='{args.device}'"]
        + (TINY if args.tiny else [])
        + [f"data.cache_dir='{args.out / 'token_cache'}'"]
        + (
            ["eval.passkey.enabled=true", f"eval.passkey.length={args.passkey_length}"]
            if args.passkey_length
            else []
        )
    )
    recipe = load_recipe(REPO / RECIPE, common)
    args.seq_len, args.batch_size = recipe.data.seq_len, recipe.data.batch_size
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    corpus = (
        describe_python_corpus(recipe.data.validation_fraction)
        if recipe.data.source == "python"
        else recipe.data.source
    )
    print(f"[quality] {corpus}", flush=True)
    if args.collect:
        runs = [
            json.loads((run_dir(args.out, a, seed) / "done").read_text())
            for seed in args.seeds
            for a in args.arms
            if (run_dir(args.out, a, seed) / "done").is_file()
        ]
        timing_file = args.out / "timing.json"
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else None
    else:
        # Tokenize the corpus once, before the runs start and share it through the cache.
        from lh_cp.data.loader import make_tokenizer, token_stream

        for split in ("train", "validation"):
            token_stream(recipe.data, make_tokenizer(recipe.data), split)
        # Timing first, while the device is otherwise idle (and so that it survives a cut-short run).
        timing = time_alone(args, common) if args.timing_steps else None
        (args.out / "timing.json").write_text(json.dumps(timing))
        runs = run_all(args, common)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "recipe": RECIPE,
        "common_overrides": common,
        "steps": args.steps,
        "passkey_length": args.passkey_length,
        "seeds": args.seeds,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "corpus": corpus,
        "timing_alone": timing,
        "benchmark_wall_s": time.perf_counter() - began,
        "command": "python benchmarks/quality.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        **summarise(args, runs, timing),
    }
    path = args.out / "quality.json"
    path.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(format_passkey(result))
    print(f"[quality] wrote {path}", flush=True)
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
