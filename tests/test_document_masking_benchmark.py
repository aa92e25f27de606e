"""benchmarks/document_masking.py: the CPU smoke run writes every table's numbers, and its
load-balance and mix helpers agree with hand counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import document_masking  # noqa: E402


def test_attention_pairs_by_hand():
    # N = 8, W = 2: chunks of 2; rank 0 holds positions 0, 1, 6, 7, rank 1 positions 2..5.
    # One document: causal pairs p + 1 -> rank 0: 1 + 2 + 7 + 8 = 18, rank 1: 3 + 4 + 5 + 6 = 18.
    assert document_masking.attention_pairs([0, 8], 8, 2) == [18, 18]
    # Documents [0, 3) and [3, 8): position p in the second counts p - 3 + 1.
    # rank 0: 1 + 2 + 4 + 5 = 12, rank 1: 3 + 1 + 2 + 3 = 9
    assert document_masking.attention_pairs([0, 3, 8], 8, 2) == [12, 9]


def test_mixes_are_windows_of_one_packed_stream():
    found = document_masking.mixes(4096, {"short": 64, "long": 1024}, windows=3, seed=1)
    for windows in found.values():
        assert len(windows) == 3
        for bounds in windows:
            assert bounds[0] == 0 and bounds[-1] == 4096
            assert all(b > a for a, b in zip(bounds, bounds[1:]))
    assert found["one"] == [[0, 4096]] * 3
    assert sum(map(len, found["short"])) > sum(map(len, found["long"]))


@pytest.mark.timeout(240)
def test_smoke_run_writes_every_table(tmp_path, one_thread):
    out = tmp_path / "result.json"
    assert document_masking.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    mixes = ["mean_4", "mean_32", "mean_128", "one"]
    assert list(result["mixes"]) == mixes and result["smoke"]
    for row in result["timing_ms"].values():
        assert {"single_device", "cp_w1_allgather", "cp_w1_ring", "windows"} <= set(row)
        assert all(ms > 0 for ms in row.values())
    assert list(result["timing_ms"]) == [*mixes, "full_causal"]
    for world in ("2", "4", "8"):
        traffic = result["traffic_mib"][world]
        # one document per window is the unmasked ring; short documents send far less
        assert traffic["one"]["ring_masked_max_mib"] == traffic["one"]["ring_unmasked_mib"]
        assert traffic["mean_4"]["ring_masked_max_mib"] < traffic["one"]["ring_unmasked_mib"] / 4
        assert len({row["allgather_mib"] for row in traffic.values()}) == 1
        work = result["work"][world]
        assert work["unmasked"]["max_over_mean"] == 1.0  # head-tail balances causal work
        assert work["one"]["worst_window"] == 1.0
        assert work["mean_4"]["worst_window"] >= work["mean_4"]["max_over_mean"] >= 1.0
