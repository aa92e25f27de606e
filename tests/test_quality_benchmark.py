"""benchmarks/quality.py's definitions (crossing step, loss jump, paired differences) on
hand-made curves, and the committed result file's layout (the keys the README and CI read)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402


def test_crossing_step_is_where_the_arm_goes_below_for_good():
    baseline = {100: 2.0, 200: 1.8, 300: 1.6, 400: 1.5}
    assert (
        quality.crossing_step({100: 2.5, 200: 1.7, 300: 1.65, 400: 1.4}, baseline, after=100) == 400
    )
    assert (
        quality.crossing_step({100: 2.5, 200: 1.7, 300: 1.5, 400: 1.4}, baseline, after=100) == 200
    )
    assert (
        quality.crossing_step({100: 2.5, 200: 1.7, 300: 1.5, 400: 1.6}, baseline, after=100) is None
    )
    assert (
        quality.crossing_step({100: 1.0, 200: 1.9}, baseline, after=100) is None
    )  # only steps after the switch


def test_loss_jump_compares_the_steps_on_each_side_of_the_switch():
    losses = [[s, 1.0] for s in range(1, 11)] + [[s, 1.5] for s in range(11, 21)]
    assert quality.loss_jump(losses, 10, width=10) == pytest.approx(0.5)
    assert quality.loss_jump(losses, 10, width=3) == pytest.approx(0.5)
    assert quality.loss_jump(losses[:-1], 10, width=10) is None  # a missing step is no jump


def test_paired_differences_pair_by_seed():
    def arm(baseline, finals, lighthouse_steps=0):
        per_seed = {
            str(s): {"final_dense_val_loss": v, "val_loss_dense": [[100, v]]}
            for s, v in finals.items()
        }
        return {
            "baseline": baseline,
            "seeds": sorted(finals),
            "lighthouse_steps": lighthouse_steps,
            "final_dense_val_loss_mean": sum(finals.values()) / len(finals),
            "per_seed": per_seed,
        }

    arms = {
        "dense": arm("dense", {0: 1.5, 1: 1.7}),
        "lh": arm("dense", {0: 1.4, 1: 1.8, 2: 9.0}, lighthouse_steps=50),
    }
    quality.derive_comparisons(arms)
    assert arms["lh"]["paired_minus_baseline"] == pytest.approx({"0": -0.1, "1": 0.1})
    assert arms["lh"]["paired_minus_baseline_mean"] == pytest.approx(0.0)
    assert arms["dense"]["paired_minus_baseline_mean"] is None  # its own baseline


def test_committed_result_has_the_layout_its_readers_expect():
    result = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text())
    assert (
        result["arms"][result["dense_arm"]]["seeds"]
        == result["arms"][result["paper_split_arm"]]["seeds"]
    )
    for name, arm in result["arms"].items():
        assert len(arm["final_dense_val_loss"]) >= 3, name
        assert all(isinstance(v, float) for v in arm["final_dense_val_loss"])
        assert isinstance(arm["leak_next_token_nats"], float), name
    # Dense attention reads nothing after t: its leak is exactly zero, measured.
    assert result["arms"][result["dense_arm"]]["leak_next_token_nats"] == 0.0
