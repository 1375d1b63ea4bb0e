"""The README's main job (``python -m benchmarks.demo``): its verdict arithmetic, and a short real race."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import demo

ROOT = Path(__file__).resolve().parents[2]


def _result(adamw: list[float], dho2: list[float], seconds: tuple[float, float]) -> dict:
    def run(losses: list[float], step_s: float, lr: float) -> dict:
        evals = [{"step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(losses)]
        return {"lr": lr, "evals": evals, "step_seconds": [step_s] * 10 * len(losses), "refreshes": [1, 2]}

    return {"engines": {"AdamW": run(adamw, seconds[0], 1e-3), "DHO2": run(dho2, seconds[1], 2e-3)}}


def test_time_ratio_is_step_ratio_times_cost_ratio_and_the_verdict_names_the_winner() -> None:
    # DHO2 reaches AdamW's final loss (1.0) at step 20 instead of 40, at 1.5x the seconds per step
    summary = demo.summarise(_result([3.0, 2.0, 1.5, 1.0], [2.5, 1.0, 0.9, 0.8], (0.1, 0.15)))
    assert summary["target"] == 1.0
    assert summary["methods"]["DHO2"]["steps_to_target"] == 20
    assert summary["step_ratio"] == pytest.approx(2.0) and summary["cost_ratio"] == pytest.approx(1 / 1.5)
    assert summary["time_ratio"] == pytest.approx(4.0 / 3.0)
    text = demo.verdict(summary)
    assert text.startswith("DHO2 wins") and "1.33x AdamW's speed to target" in text

    slower = demo.summarise(_result([3.0, 2.0, 1.5, 1.0], [3.0, 2.0, 1.5, 1.0], (0.1, 0.2)))
    assert slower["time_ratio"] == pytest.approx(0.5)
    assert demo.verdict(slower).startswith("AdamW wins") and "2.00x AdamW's time" in demo.verdict(slower)

    missed = demo.summarise(_result([3.0, 2.0, 1.5, 1.0], [3.0, 2.0, 1.5, 1.2], (0.1, 0.1)))
    assert "time_ratio" not in missed
    assert "did not reach" in demo.verdict(missed) and "AdamW wins" in demo.verdict(missed)


@pytest.mark.timeout(600)
def test_demo_races_both_optimizers_on_two_processes_and_writes_the_plot(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.demo", "--task", "digits", "--steps", "60",
                           "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2-process DeepSpeed ZeRO-2" in done.stdout
    assert ("DHO2 wins" in done.stdout) or ("AdamW wins" in done.stdout)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["nproc"] == 2 and summary["steps"] == 60
    assert set(summary["methods"]) == {"AdamW", "DHO2"}
    assert summary["methods"]["DHO2"]["refreshes"] >= 1  # warmup 50: the curvature ran inside the budget
    assert (tmp_path / "loss_vs_seconds.png").stat().st_size > 10_000
