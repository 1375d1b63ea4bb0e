"""The ZeRO-3 memory benchmark's counts on a small model: every part divides by W, and during a refresh
the curvature state is k eigenvectors + the Lanczos basis + two partition-length vectors, nothing whole."""

from __future__ import annotations

import json

import pytest

from benchmarks import memory_zero3


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_quick_run_divides_by_the_world_size(tmp_path):
    memory_zero3.main(["--quick", "--worlds", "1,2", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "memory_zero3.json").read_text())
    one, two = summary["rows"]
    assert one["refresh_in_flight"] and two["refresh_in_flight"]
    for key in ("parameters", "gradients", "optimizer", "curvature"):
        assert one[key] / two[key] == pytest.approx(2.0, rel=0.02), key
    assert summary["total_bytes_ratio_w1_over_w2"] == pytest.approx(2.0, rel=0.02)
    for row in summary["rows"]:
        assert row["curvature_vectors_during_refresh"] == pytest.approx(3 * summary["rank"] + 2, abs=0.05)
    assert (tmp_path / "memory_zero3.png").is_file() and summary["command"].startswith("python -m benchmarks")
