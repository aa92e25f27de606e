"""benchmarks/offload.py: the longest-context search on a made-up memory limit, and the script
end to end at toy sizes on CPU (--smoke: the quickstart model at 512 tokens), in two calls
that add to one result file as the GPU runs will."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import offload  # noqa: E402

K = 65536


def fake_probe(limit: int, unknown: int | None = None):
    asked = []

    def probe(n: int):
        asked.append(n)
        return None if n == unknown else n <= limit

    return probe, asked


def test_search_doubles_then_bisects_in_steps():
    probe, asked = fake_probe(limit=23 * K)  # trains up to 1.4375M tokens
    found = offload.search_longest(probe, 4 * K, 32 * K, K)
    assert found == {"longest": 23 * K, "shortest_failing": 24 * K, "stopped_at": None}
    assert asked == [4 * K, 8 * K, 16 * K, 32 * K, 24 * K, 20 * K, 22 * K, 23 * K]


def test_search_reports_the_cap_a_failing_start_and_an_unknown():
    probe, asked = fake_probe(limit=100 * K)
    assert offload.search_longest(probe, 4 * K, 24 * K, K) == {
        "longest": 24 * K,
        "shortest_failing": None,
        "stopped_at": None,
    }
    assert asked == [4 * K, 8 * K, 16 * K, 24 * K]  # doubling is capped at the limit
    probe, _ = fake_probe(limit=2 * K)
    assert offload.search_longest(probe, 4 * K, 32 * K, K)["longest"] == 2 * K
    probe, _ = fake_probe(limit=0)
    assert offload.search_longest(probe, 4 * K, 32 * K, K)["longest"] is None
    probe, asked = fake_probe(limit=23 * K, unknown=24 * K)
    assert offload.search_longest(probe, 4 * K, 32 * K, K) == {
        "longest": 16 * K,
        "shortest_failing": 32 * K,
        "stopped_at": 24 * K,
    }
    with pytest.raises(ValueError, match="start=100 must be a positive multiple of step=65536"):
        offload.search_longest(probe, 100, 32 * K, K)


def test_outcomes_tell_memory_from_other_failures():
    assert offload.outcome_of(0, "", trained=True) == "trained"
    assert offload.outcome_of(1, "torch.OutOfMemoryError: CUDA out of memory.", False) == (
        "out_of_memory"
    )
    refused = "parallel.offload_activations=true pins 120.0 GiB of host memory (1 rank(s)"
    assert offload.outcome_of(2, refused, False) == "refused_host_memory"
    assert offload.outcome_of(124, "timeout after 10 s", False) == "timeout"
    assert offload.outcome_of(1, "ValueError: something else", False) == "error"


@pytest.mark.timeout(240)
def test_smoke_run_writes_the_result_file(tmp_path, capsys):
    results, runs = tmp_path / "offload.json", tmp_path / "runs"
    common = ["--smoke", "--results", str(results), "--out", str(runs), "--attention", "lighthouse"]
    assert offload.main(common + ["--skip-search", "--offload", "on"]) == 0  # throughput: both
    assert offload.main(common + ["--skip-throughput", "--offload", "on"]) == 0
    result = json.loads(results.read_text())
    assert result["device"] == "cpu"
    rates = {r["offload"]: r for r in result["throughput"]}
    assert sorted(rates) == [False, True]
    assert all(r["outcome"] == "trained" and r["tokens_per_s"] > 0 for r in rates.values())
    assert rates[True]["offload_host_gib"] > 0 and rates[False]["offload_host_gib"] is None
    assert result["throughput_ratio"]["lighthouse@512"] == pytest.approx(
        rates[True]["tokens_per_s"] / rates[False]["tokens_per_s"]
    )
    (probe,) = result["probes"]
    assert (probe["N"], probe["offload"], probe["outcome"], probe["steps"]) == (
        512,
        True,
        "trained",
        1,
    )
    assert result["longest"]["lighthouse/on"]["longest"] == 512
    assert not any(runs.glob("*/checkpoints"))  # deleted after each run
    out = capsys.readouterr().out
    assert "offload on / off, lighthouse@512:" in out and "lighthouse/on" in out
