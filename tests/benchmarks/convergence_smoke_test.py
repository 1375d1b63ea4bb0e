"""Smoke test of the convergence benchmark: ``--quick`` runs end to end and writes well-formed results.

Checks the JSON schema (keys per task and method), that every method produced a finite final validation
loss and finite time figures, and that the markdown table and plot were written. Values are not checked.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import convergence

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

SUMMARY_KEYS = {"best_lr", "final_val_loss", "final_val_acc", "steps_to_target", "seconds_to_target",
                "speedup_vs_adamw", "step_ratio_vs_adamw", "train_seconds", "seconds_per_step",
                "final_val_loss_by_lr", "verdict"}
CURVE_KEYS = {"step", "seconds", "val_loss", "val_acc"}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_quick_convergence_writes_complete_results(tmp_path):
    out = tmp_path / "convergence_smoke"
    convergence.main(["--quick", "--output-name", str(out)])

    data = json.loads(out.with_suffix(".json").read_text())
    assert {"benchmark", "command", "machine", "settings", "tasks"} <= set(data)
    assert data["settings"]["world_size"] == 2 and data["settings"]["zero_stage"] == 2
    assert set(data["tasks"]) == {"digits"}
    task = data["tasks"]["digits"]
    assert {"summary", "runs", "reference_check"} <= set(task)
    lrs = data["settings"]["tasks"]["digits"]["lrs"]
    assert set(task["runs"]) == set(convergence.METHODS)
    summary = task["summary"]
    assert _finite(summary["target_val_loss"])
    assert set(summary["methods"]) == set(convergence.METHODS)
    for method, row in summary["methods"].items():
        assert SUMMARY_KEYS <= set(row), method
        assert _finite(row["final_val_loss"]), method
        assert _finite(row["final_val_acc"]), method
        assert _finite(row["train_seconds"]) and row["train_seconds"] > 0, method
        assert _finite(row["seconds_per_step"]), method
        # reaching the target is optional, but a reached target carries finite figures
        if row["steps_to_target"] is not None:
            assert _finite(row["seconds_to_target"]) and _finite(row["speedup_vs_adamw"]), method
        assert set(task["runs"][method]) == {repr(lr) for lr in lrs}
        for run in task["runs"][method].values():
            assert run["curve"] and all(CURVE_KEYS <= set(p) for p in run["curve"])
            assert all(_finite(p["seconds"]) for p in run["curve"])
            assert _finite(run["curve"][-1]["val_loss"])
    baseline = summary["methods"][convergence.BASELINE]
    assert baseline["steps_to_target"] is not None and _finite(baseline["seconds_to_target"])
    check = task["reference_check"]
    assert _finite(check["max_abs_train_loss_diff"]) and _finite(check["max_abs_param_diff"])

    table = out.with_suffix(".md").read_text()
    assert "| method |" in table and all(f"| {m} |" in table for m in convergence.METHODS)
    assert (tmp_path / "convergence_smoke_digits.png").stat().st_size > 0
