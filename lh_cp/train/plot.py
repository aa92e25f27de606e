"""`lh-cp plot`: the loss curves of a run, read from its TensorBoard event files, as a PNG.

Train loss (every logged step) and validation loss (stage ends and intervals) against the
global step: in the stage's attention mode and with every layer dense (the comparable one:
a Lighthouse-mode loss can read later tokens, docs/LIGHTHOUSE.md s.10). A dashed line marks
where each stage after the first begins (from the `train/stage` scalar the trainer logs),
labelled with the stage's name and attention.
"""

from __future__ import annotations

import json
from pathlib import Path

from lh_cp.train.metrics import STAGES_TAG


def _events(logdir: str | Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(logdir)
    if not folder.is_dir() or not any(folder.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard event files in {str(folder)!r}")
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard folder: tag -> [(step, value)] sorted by step."""
    events = _events(logdir)
    series = {}
    for tag in events.Tags()["scalars"]:
        latest = {
            e.step: e.value for e in events.Scalars(tag)
        }  # a redone step keeps its last value
        series[tag] = sorted(latest.items())
    return series


def read_stage_names(logdir: str | Path) -> list[str]:
    """'name (attention)' of each stage, from the text the trainer logs; [] if absent."""
    events = _events(logdir)
    tag = f"{STAGES_TAG}/text_summary"
    if tag not in events.Tags()["tensors"]:
        return []
    stages = json.loads(events.Tensors(tag)[-1].tensor_proto.string_val[0].decode())
    return [f"{name} ({attention})" for name, attention in stages]


def stage_starts(stage_series: list[tuple[int, float]]) -> list[tuple[int, int]]:
    """(first logged step, stage index) for every stage after the first."""
    starts, previous = [], None
    for step, stage in stage_series:
        if previous is not None and int(stage) != previous:
            starts.append((step, int(stage)))
        previous = int(stage)
    return starts


def plot_losses(logdir: str | Path, output: str | Path | None = None) -> Path:
    """Write the loss PNG; default path: <logdir>/../loss.png. Returns the path."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "lh-cp plot needs the Python package 'matplotlib' (pip install matplotlib)"
        ) from err
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    series = read_scalars(logdir)
    if "train/loss" not in series:
        raise ValueError(
            f"{logdir} has no train/loss scalars (is it a lh-cp run's TensorBoard folder?)"
        )
    out = Path(output) if output else Path(logdir).resolve().parent / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    steps, values = zip(*series["train/loss"])
    ax.plot(steps, values, label="train loss", linewidth=1.2)
    if "val/loss" in series:
        val_steps, val_values = zip(*series["val/loss"])
        ax.plot(
            val_steps, val_values, "o-", label="validation loss (stage's attention)", markersize=5
        )
    if "val/loss_dense" in series:
        val_steps, val_values = zip(*series["val/loss_dense"])
        ax.plot(
            val_steps, val_values, "s--", label="validation loss, every layer dense", markersize=4
        )
    names = read_stage_names(logdir)
    for step, stage in stage_starts(series.get("train/stage", [])):
        label = names[stage] if stage < len(names) else f"stage {stage + 1}"
        ax.axvline(step - 0.5, color="gray", linestyle="--", linewidth=1)
        # Text on the side of the line with more room, so it stays inside the axes.
        right_half = step > (steps[0] + steps[-1]) / 2
        ax.annotate(
            f"{label} from step {step}",
            (step - 0.5, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-4 if right_half else 4, -14),
            textcoords="offset points",
            color="gray",
            ha="right" if right_half else "left",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{Path(logdir).resolve().parent.name}: loss by step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
