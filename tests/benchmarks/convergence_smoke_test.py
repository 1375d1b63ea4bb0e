"""Smoke test of the convergence benchmark: ``--quick`` runs end to end and its results hold together.

Values are not judged (12 steps say nothing about optimizers); the checks are about the suite's own
promises: the lr grids are spaced at most 1.5x and the reported best lr is bracketed (or the grid was
extended as far as allowed), every seed requested is there, the time ratio is exactly the step ratio
times the cost-per-step ratio, the target is AdamW's own final loss per seed, ADMM window ends are
evaluated and marked, every engine is evaluated at the same steps, DeepSpeed built the optimizers the
method table names (a foreach torch AdamW; DHO2 with its library defaults), and the markdown and plot
were written from the JSON.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import convergence
from benchmarks.tasks import LR_RATIO

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

SEEDS = 3
#: DHO2 keys the suite may set; everything else must be the library default
SUITE_KEYS = {"lr", "weight_decay", "seed"}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence") / "convergence_smoke"
    convergence.main(["--quick", "--seeds", str(SEEDS), "--output-name", str(out)])
    return out, json.loads(out.with_suffix(".json").read_text())


def test_schema_methods_and_seeds(quick):
    out, data = quick
    assert {"benchmark", "command", "machine", "git", "settings", "tasks"} <= set(data)
    settings = data["settings"]
    assert settings["world_size"] == 2 and settings["zero_stage"] == 2
    assert len(settings["seeds"]) >= SEEDS
    assert set(settings["methods"]) == set(convergence.QUICK_METHODS)
    assert set(data["tasks"]) == {"digits"}
    task = data["tasks"]["digits"]
    summary = task["summary"]
    assert set(summary["methods"]) == set(settings["methods"])
    for method, row in summary["methods"].items():
        assert row["seeds"] == len(settings["seeds"]) == len(row["per_seed"]), method
        assert [r["seed"] for r in row["per_seed"]] == settings["seeds"], method
        for key in ("final_val_loss", "final_val_acc", "train_seconds"):
            stats = row[key]
            assert stats["n"] == len(settings["seeds"]) and stats["min"] <= stats["mean"] <= stats["max"], (method, key)
        assert row["train_seconds"]["min"] > 0
    flattening = summary["adamw_flattening"]
    assert _finite(flattening["mean_curve"]["endpoints"])
    steps = data["tasks"]["digits"]["settings"]["steps"]
    in_window = [s for s in summary["methods"]["AdamW"]["curve"]["step"] if s >= 0.8 * steps]
    assert _finite(flattening["mean_curve"]["fitted"]) == (len(in_window) >= 2)
    assert len(flattening["per_seed"]) == len(settings["seeds"])


def test_lr_grids_are_fine_and_bracket_the_best(quick):
    _, data = quick
    task = data["tasks"]["digits"]
    max_rounds = data["settings"]["max_extensions"]
    for method, sweep in task["summary"]["lr_sweeps"].items():
        grid = sweep["grid"]
        assert grid == sorted(grid) and len(grid) >= 3, method
        assert all(b / a <= LR_RATIO * (1 + 1e-6) for a, b in zip(grid, grid[1:])), (method, grid)
        assert sweep["max_grid_ratio"] <= LR_RATIO * (1 + 1e-6)
        assert sweep["best_lr"] in grid
        means = {item["lr"]: item["final_val_loss"]["mean"] for item in sweep["by_lr"].values()}
        assert sorted(means) == grid
        finite = {lr: v for lr, v in means.items() if v is not None}
        assert sweep["best_lr"] == min(finite, key=finite.get), method
        if sweep["bracketed"]:
            assert grid[0] < sweep["best_lr"] < grid[-1]
        else:  # only when the extension rounds ran out
            assert len(sweep["extensions"]) == max_rounds, method
        for ext in sweep["extensions"]:
            assert ext["lr"] in grid and ext["direction"] in ("up", "down")
        assert summary_best(task, method) == sweep["best_lr"]
        for seed_runs in task["runs"].values():  # every seed ran every lr of the final grid
            assert {r["lr"] for r in seed_runs.values() if r["method"] == method} == set(grid)


def summary_best(task: dict, method: str) -> float:
    return task["summary"]["methods"][method]["best_lr"]


def test_targets_and_decomposition_multiply_out(quick):
    _, data = quick
    task = data["tasks"]["digits"]
    summary = task["summary"]
    rtol = 1e-4
    adamw = summary["methods"][convergence.BASELINE]
    for row in adamw["per_seed"]:
        run = task["runs"][str(row["seed"])][convergence.run_key("AdamW", adamw["best_lr"])]
        assert row["target_val_loss"] == run["evals"][-1]["val_loss"] == summary["target"]["per_seed"][str(row["seed"])]
        assert row["steps_to_target"] is not None and row["time_ratio"] == 1.0
    base = {r["seed"]: r for r in adamw["per_seed"]}
    for method, row in summary["methods"].items():
        for r in row["per_seed"]:
            if r["steps_to_target"] is None:
                assert r["time_ratio"] is None
                continue
            b = base[r["seed"]]
            assert _close(r["time_ratio"], r["step_ratio"] * r["cost_ratio"]), method
            assert _close(r["time_ratio"], b["seconds_to_target"] / r["seconds_to_target"])
            assert _close(r["step_ratio"], b["steps_to_target"] / r["steps_to_target"])
            # the run's curve really crosses the target at that step, not before
            run = task["runs"][str(r["seed"])][convergence.run_key(method, row["best_lr"])]
            below = [p["step"] for p in run["evals"] if p["step"] > 0 and p["val_loss"] is not None
                     and p["val_loss"] <= r["target_val_loss"] * (1 + rtol)]
            assert below and below[0] == r["steps_to_target"]
            assert _close(next(p["seconds"] for p in run["evals"] if p["step"] == below[0]), r["seconds_to_target"])
        ratios = [row["time_ratio"], row["step_ratio"], row["cost_ratio"]]
        if all(x["n"] == len(row["per_seed"]) for x in ratios):
            assert _close(ratios[0]["geomean"], ratios[1]["geomean"] * ratios[2]["geomean"], 1e-6), method


def test_common_eval_grid_and_window_ends(quick):
    _, data = quick
    task = data["tasks"]["digits"]
    steps = task["settings"]["steps"]
    windows = set()
    for seed_runs in task["runs"].values():
        grids = {tuple(p["step"] for p in run["evals"]) for run in seed_runs.values()}
        assert len(grids) == 1, "every engine of a task is evaluated at the same steps"
        grid = set(next(iter(grids)))
        assert {0, steps} <= grid
        for run in seed_runs.values():
            seconds = [p["seconds"] for p in run["evals"]]
            assert seconds == sorted(seconds) and seconds[0] == 0.0
            window = run.get("admm_window")
            if window is None:
                assert not any(p.get("window_end") for p in run["evals"])
                continue
            windows.add(window)
            ends = {p["step"] for p in run["evals"] if p.get("window_end")}
            assert ends == set(range(window, steps + 1, window))
            assert {e - 1 for e in ends} <= grid
    assert windows, "--quick includes a method whose ADMM windows end inside the budget"
    tuned = task["summary"]["methods"]["DHO2 tuned"]
    assert all(r["sawtooth"]["window_ends"] > 0 for r in tuned["per_seed"])
    assert tuned["refreshes"]["min"] >= 1


def test_optimizers_are_what_the_method_table_says(quick):
    from ds_dho2.config import DHO2Config

    _, data = quick
    defaults = DHO2Config().to_dict()
    task = data["tasks"]["digits"]
    for seed_runs in task["runs"].values():
        for run in seed_runs.values():
            built = run["built"]
            if run["method"] == "AdamW" or run["role"] == "anchor":
                assert built["class"] == "torch.optim.adamw.AdamW" and built["defaults"]["foreach"] is True
                continue
            assert built["class"].endswith("DHO2"), run["method"]
            config = built["config"]
            method = convergence.METHODS.get(run["method"], convergence.REFERENCE)
            set_by_method = method["params"]
            assert config["lr"] == run["lr"]
            if run["method"] == "DHO2 tuned":
                continue
            for key, value in defaults.items():
                if key in SUITE_KEYS:
                    continue
                if key in set_by_method and isinstance(value, dict):
                    for sub, sub_value in value.items():
                        expected = set_by_method[key].get(sub, sub_value)
                        assert config[key][sub] == expected, (run["method"], key, sub)
                else:
                    assert config[key] == set_by_method.get(key, value), (run["method"], key)


def test_checks_extensions_and_reports(quick):
    out, data = quick
    task = data["tasks"]["digits"]
    check = task["reference_check"]
    assert check["max_abs_val_loss_diff"] < 1e-3 and check["max_abs_param_diff"] < 1e-3
    for race in task["races"]:
        assert race["peak_rss_mib"] > 0
        if race["kind"] == "extension":
            assert race["anchor_max_abs_val_loss_diff"] is not None and race["anchor_max_abs_val_loss_diff"] < 1e-9
            assert _finite(race["time_scale"]) and race["time_scale"] > 0
    table = out.with_suffix(".md").read_text()
    assert table == convergence.markdown(data, out.with_suffix(".json").name) + "\n"
    assert all(f"| {m} |" in table for m in data["settings"]["methods"])
    png = out.parent / f"{out.name}_digits.png"
    assert png.stat().st_size > 10_000
