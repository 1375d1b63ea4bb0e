"""The regime benchmark decides what it says: its lr protocol brackets and extends as documented, its race
arithmetic names the factor that lost, its tasks build real data (MNIST-1D generated locally), every peer
optimizer trains through the runner, and ``--quick`` writes the JSON, tables and figure end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import regimes
from benchmarks.regime_tasks import make_regime_tasks, mnist1d
from benchmarks.tasks import round_lr


def _parabola(best: float, diverge_above: float = math.inf):
    """A final loss that is a parabola in log lr around ``best`` (the same for every seed up to a shift),
    infinite (diverged) above ``diverge_above``; the calls are recorded."""
    calls: list[tuple[float, int]] = []

    def final_loss(lr: float, seed: int) -> float:
        calls.append((lr, seed))
        if lr > diverge_above:
            return math.inf
        return (math.log(lr) - math.log(best)) ** 2 + 0.01 * seed

    return final_loss, calls


def test_tune_lr_brackets_a_best_inside_the_first_grid():
    loss, calls = _parabola(best=1e-2)
    out = regimes.tune_lr(1e-2, loss, seeds=[0, 1, 2])
    assert out["bracketed"] and out["tuned_bracketed"] and out["extensions"] == [] and out["note"] is None
    assert out["tuned_lr"] == out["best_seed0"] == round_lr(1e-2)
    assert len(out["seeded_lrs"]) == 3  # the best and its two neighbours, every seed
    assert sum(seed != 0 for _, seed in calls) == 3 * 2


def test_tune_lr_extends_towards_a_best_beyond_the_grid_and_goes_lower_when_everything_diverges():
    loss, _ = _parabola(best=6e-2)  # ~2.7x above the grid's top edge of 1e-2 * 1.5^2
    out = regimes.tune_lr(1e-2, loss, seeds=[0])
    assert out["extensions"] and all(lr > out["initial_grid"][-1] for lr in out["extensions"])
    assert out["bracketed"] and abs(math.log(out["tuned_lr"] / 6e-2)) < math.log(1.5)

    loss, _ = _parabola(best=1e-3, diverge_above=1e-3)
    out = regimes.tune_lr(1e-1, loss, seeds=[0], max_extensions=2)
    assert out["extensions"] == sorted(out["extensions"], reverse=True)  # every step goes lower
    assert not out["bracketed"] and "unbracketed" in out["note"]


def test_tune_lr_without_neighbours_seeds_only_the_best():
    loss, calls = _parabola(best=1e-2)
    out = regimes.tune_lr(1e-2, loss, seeds=[0, 1, 2], neighbours=False)
    assert out["seeded_lrs"] == [out["best_seed0"]] == [out["tuned_lr"]]
    assert {lr for lr, seed in calls if seed != 0} == {out["tuned_lr"]}


def _run(seed: int, curve: list[list[float]], diverged: bool = False) -> dict:
    return {"seed": seed, "curve": curve, "diverged": diverged, "final_loss": curve[-1][1], "seconds": curve[-1][2]}


def test_race_arithmetic_counts_censored_seeds_with_the_budget_and_names_the_losing_factor():
    assert regimes.first_reach([[0, 2.0, 0.0], [10, 1.0, 1.0], [20, 0.5, 2.0]], 1.0) == (10, 1.0)
    assert regimes.first_reach([[0, 2.0, 0.0], [10, math.nan, 1.0]], 1.0) == (None, None)
    method = regimes.reach_summary([_run(0, [[0, 2.0, 0.0], [10, 0.9, 1.0]]),
                                    _run(1, [[0, 2.0, 0.0], [10, 1.5, 1.2]])], target=1.0, budget=40)
    assert method["reached"] == 1 and method["censored"] and method["steps_mean"] == (10 + 40) / 2
    assert method["seconds_mean"] == pytest.approx((1.0 + 1.2) / 2)
    reference = regimes.reach_summary([_run(0, [[0, 2.0, 0.0], [20, 1.0, 1.0]])], target=1.0, budget=40)
    # method: 25 steps on average, each 2x the reference's cost -> 20/25 * 0.5 = 0.4, steps and cost lost
    out = regimes.ratios(method, reference, method_cost=2.0, reference_cost=1.0)
    assert out["step_ratio"] == pytest.approx(0.8) and out["cost_ratio"] == pytest.approx(0.5)
    assert out["time_ratio"] == pytest.approx(0.4) and out["lost_on"] == "steps and cost" and out["bound"] == "upper"
    assert regimes.lost_factor(2.0, 0.4) == "cost" and regimes.lost_factor(0.5, 1.5) == "steps"
    assert regimes.lost_factor(2.0, 0.6) is None and regimes.lost_factor(None, 1.0) == "steps"


def test_race_cost_is_the_mean_lockstep_step_over_the_steps_to_target():
    # the method pays 3 s a step for 10 steps (a refresh), then 1 s (dormant); the reference 1.5 s throughout
    lock = {"methods": {
        "ref": {"cumulative": [1.5 * (i + 1) for i in range(40)], "mean_seconds": 1.5, "steady_median_seconds": 1.5},
        "dho2": {"cumulative": [3.0 * min(i + 1, 10) + max(0, i + 1 - 10) for i in range(40)], "mean_seconds": 1.0,
                 "steady_median_seconds": 3.0}}}
    assert regimes.seconds_to(lock["methods"]["dho2"], 20) == pytest.approx(40.0)
    assert regimes.seconds_to(lock["methods"]["dho2"], 20.5) == pytest.approx(40.5)
    assert regimes.seconds_to(lock["methods"]["dho2"], 41) is None
    summaries = {"ref": regimes.reach_summary([_run(0, [[0, 2.0, 0.0], [30, 1.0, 1.0]])], target=1.0, budget=40),
                 "dho2": regimes.reach_summary([_run(0, [[0, 2.0, 0.0], [20, 1.0, 1.0]])], target=1.0, budget=40)}
    methods = [regimes.Method("ref", "ref", "torch", torch.optim.SGD, {}),
               regimes.dho2_method("dho2", {}, "DHO2")]
    race = regimes.race_table(methods, summaries, {"ref": 0.1, "dho2": 0.1}, "ref", lock)
    entry = race["dho2"]
    # 30 reference steps take 45 s, 20 DHO2 steps 40 s: time ratio 45/40 = 1.5 steps x 0.75 cost
    assert entry["step_ratio"] == pytest.approx(1.5) and entry["cost_ratio"] == pytest.approx(1.5 / 2.0)
    assert entry["time_ratio"] == pytest.approx(45 / 40) and entry["lockstep_seconds_to_target"] == pytest.approx(40)
    assert entry["steady_cost_ratio"] == pytest.approx(0.5) and race["ref"]["time_ratio"] == pytest.approx(1.0)
    assert regimes.best_dho2_ratio(methods, race) == pytest.approx(45 / 40)
    # DHO2 at its defaults against AdamW when SGD-momentum set the target: the ratio of their time ratios
    race_both = {"adamw": {"time_ratio": 0.72, "step_ratio": 0.92, "cost_ratio": 0.79},
                 "dho2": {"time_ratio": 0.83, "step_ratio": 1.12, "cost_ratio": 0.74}}
    assert regimes.defaults_vs_adamw(race_both) == "1.15x (= 1.22 x 0.94)"
    assert regimes.defaults_vs_adamw({**race_both, "dho2": {"time_ratio": None}}) == "DHO2 never reached the target"
    compact = regimes.compact_lockstep(lock, [10, 40, 50])
    assert compact["methods"]["dho2"]["cumulative_at_eval"] == [[10, 30.0], [40, 60.0]]
    assert "cumulative" not in compact["methods"]["dho2"]


def test_probe_agreement_and_flattening():
    assert regimes.agreement("curvature-limited", 1.5)["agrees"] is True
    assert regimes.agreement("curvature-limited", 1.1)["agrees"] is False
    assert regimes.agreement("noise-limited", 0.9)["agrees"] is True
    assert regimes.agreement("undetermined", 2.0)["agrees"] is None
    curve = [[s, 1.0 / (1 + s), 0.0] for s in range(0, 101, 10)]
    flat = regimes.flattening(curve, 100)
    assert flat["absolute_share"] == pytest.approx((1 / 81 - 1 / 101) / 1.0)


def test_mnist1d_is_generated_locally_and_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    import random

    import numpy as np

    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    data = mnist1d(samples=500)
    assert np.array_equal(np.random.get_state()[1], before)
    x, y = data.train
    assert x.shape[1] == 40 and x.shape[0] == data.info["train_rows"] and set(y.tolist()) <= set(range(10))
    assert data.test is not None and data.info["generator"].startswith("mnist1d.data.make_dataset")
    random.random()  # untouched module state still works


@pytest.mark.parametrize("name", ["sophiah", "adahessian", "sf_adamw", "kron", "shampoo", "soap"])
def test_every_peer_trains_through_the_runner(name):
    task = make_regime_tasks(quick=True)["digits"]
    data = task.load_data()
    method = regimes.method_registry()[name]
    record = regimes.train_run(task, data, 32, method, lr=task.lr_center(name, method.anchor), seed=0, steps=12,
                               eval_steps=[6, 12])
    assert record["error"] is None and not record["diverged"], record
    assert [s for s, *_ in record["curve"]] == [0, 6, 12] and record["final_loss"] < record["curve"][0][1]


def test_dho2_variant_installs_curvature_in_a_short_run():
    task = make_regime_tasks(quick=True)["autoencoder"]
    data = task.load_data()
    method = regimes.dho2_method("probe_variant", {"warmup_steps": 5, "refresh_interval": 5, "rank": 2,
                                                    "curvature": {"back_off": False}})
    record = regimes.train_run(task, data, 128, method, lr=3e-3, seed=0, steps=12, eval_steps=[12])
    assert record["error"] is None and record["curvature"]["refreshes"] >= 1, record


@pytest.mark.timeout(600)
def test_quick_main_writes_json_tables_and_figure(tmp_path):
    payload = regimes.main(["--quick", "--output-name", str(tmp_path / "regimes_quick")])
    saved = json.loads((tmp_path / "regimes_quick.json").read_text())
    assert (tmp_path / "regimes_quick.md").read_text().count("|") > 20 and (tmp_path / "regimes_quick.png").stat().st_size
    assert saved["command"] and saved["peers"]["torch"] == torch.__version__ and saved["peers"]["mnist1d"]
    assert set(saved["tasks"]) == {"autoencoder", "digits"} == set(payload["tasks"])
    for task in saved["tasks"].values():
        assert len(task["batches"]) == 2
        for setting in task["batches"].values():
            assert math.isfinite(setting["target"]["value"]) and setting["target"]["method"] in ("adamw", "sgd")
            assert set(setting["race"]) == {"adamw", "sgd", "dho2"} and set(setting["probes"]) == {"adamw", "sgd"}
            assert all(p["report"].get("regime") for p in setting["probes"].values())
            target = setting["race"][setting["target"]["method"]]
            assert target["step_ratio"] == pytest.approx(1.0) and target["time_ratio"] == pytest.approx(1.0)

    # the map is recorded setting by setting; --merge puts the pieces back together (and refuses overlaps)
    for task in saved["tasks"]:
        part = {**saved, "tasks": {task: saved["tasks"][task]}}
        (tmp_path / f"part_{task}.json").write_text(json.dumps(part))
    parts = [str(tmp_path / f"part_{task}.json") for task in saved["tasks"]]
    merged = regimes.main(["--merge", *parts, "--output-name", str(tmp_path / "regimes_merged")])
    assert merged["tasks"] == saved["tasks"] and [s["file"] for s in merged["sources"]] == [Path(p).name for p in parts]
    table = (tmp_path / "regimes_merged.md").read_text()
    assert "## The map" in table and table.count("| autoencoder |") == 2 and (tmp_path / "regimes_merged.png").stat().st_size
    with pytest.raises(SystemExit, match="in both"):
        regimes.merge_results([parts[0], parts[0]])

    # --recost measures the lockstep again at the recorded tuned lrs and keeps the races
    recosted = regimes.main(["--recost", str(tmp_path / "regimes_quick.json"), "--rerun", "dho2", "--output-name",
                             str(tmp_path / "regimes_recosted")])
    again = json.loads((tmp_path / "regimes_recosted.json").read_text())
    assert again["recosted"]["command"].startswith("python -m benchmarks regimes --recost")
    assert recosted["recosted"]["rerun"] == ["dho2"]
    for task, entry in again["tasks"].items():
        for batch, setting in entry["batches"].items():
            before = saved["tasks"][task]["batches"][batch]
            assert setting["lockstep"]["steps"] == setting["budget"] and setting["target"] == before["target"]
            for name, race in setting["race"].items():
                if name == "dho2":  # tuned and raced again: its own new runs
                    assert setting["tuning"][name]["grid"] and race["lr"] == setting["tuning"][name]["tuned_lr"]
                    assert len(setting["runs"][name]) >= len(setting["tuning"][name]["grid"])
                    continue
                assert setting["tuning"][name] == before["tuning"][name]
                assert race["per_seed"] == before["race"][name]["per_seed"] and race["lr"] == before["race"][name]["lr"]
                assert len(setting["lockstep"]["methods"][name]["cumulative_at_eval"]) == len(
                    [s for s in setting["eval_steps"] if s >= 1])
    assert "re-measured" in (tmp_path / "regimes_recosted.md").read_text()
    with pytest.raises(SystemExit, match="unmerged"):
        regimes.recost_results(tmp_path / "regimes_merged.json", "x")

    # the heavy-ball check walks SGD-momentum's recorded grid, seed by seed
    from benchmarks import map_stability

    checked = map_stability.main(["--map", str(tmp_path / "regimes_quick.json"), "--tasks", "digits", "--seeds", "0,1",
                                  "--output-name", str(tmp_path / "map_stability")])
    rows = [row for batch in checked["tasks"]["digits"].values() for row in batch]
    grid = [lr for batch in saved["tasks"]["digits"]["batches"].values()
            for lr, _, _ in map_stability.sgd_lrs(batch, "grid")]
    assert len(rows) == len(grid) == checked["checks"] and all(len(row["runs"]) == 2 for row in rows)
    for row in rows:
        for run in row["runs"]:
            assert run["passes"] == (not run["applies"] or (run["final_loss"] is not None and
                                                            run["final_loss"] < 0.5 * run["initial_loss"]))
    assert "| digits |" in (tmp_path / "map_stability.md").read_text()


def test_results_are_json_safe_for_every_peer_default():
    json.dumps(regimes._plain({"methods": {n: regimes._resolved(m) for n, m in regimes.method_registry().items()},
                               "dtype": torch.float32, "inf": math.inf}))
    assert regimes._plain(torch.float32) == "torch.float32" and regimes._plain(math.inf) is None
