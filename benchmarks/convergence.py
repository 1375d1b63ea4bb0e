"""Convergence: steps and seconds to AdamW's validation loss, DHO2 vs AdamW and the ADMM ablations.

Design (each choice answers a way a comparison of optimizers can mislead):

* **Real engines.** Every run is a DeepSpeed ZeRO-2 engine (``deepspeed.initialize`` with the
  ``"optimizer"`` block below) on ``W`` gloo ranks on CPU (default 2).
* **Methods are data** (:data:`METHODS`). The baseline is DeepSpeed's own AdamW,
  ``{"type": "AdamW", "params": {"torch_adam": true, "foreach": true}}`` (DeepSpeed builds a foreach
  ``torch.optim.AdamW`` from it; the suite records the class it got). The ablation of docs/design.md, "ADMM":
  ``AdamW+ADMM`` is DHO2 with ``curvature.enabled=false, admm.enabled=true``; ``DHO2 w/o ADMM`` is DHO2
  with ``admm.enabled=false``; ``DHO2`` is DHO2 with ``admm.enabled=true``. Apart from those switches
  every DHO2 method uses the *library defaults*; the suite sets only ``lr``, ``weight_decay`` and
  ``seed``, so it measures whatever the defaults are when it runs (recorded in the JSON). ``DHO2 tuned``
  (per-task overrides from ``benchmarks/tasks.py``) is optional and never the headline.
* **Lockstep race** (``benchmarks/race.py``). For one (task, seed) every engine (method x lr) is built in
  the same rank processes and all advance one step at a time, in a shuffled order, each step timed on
  its own after a barrier. Time ratios are therefore taken under the same machine conditions, which a
  shared, noisy 2-core machine does not give sequential runs.
* **lr sweeps** on a geometric grid of ratio 1.5 (:data:`benchmarks.tasks.LR_RATIO`). The best lr of a
  method is the one with the lowest mean-over-seeds final validation loss. If it lies on an edge of the
  method's grid, the grid is extended by one point in that direction and the new engines race (for
  every seed) next to an *anchor*: AdamW at its best lr, which also ran in the main race. The anchor
  puts the new engines' times on the main race's clock (times scaled by the anchor's main/extension
  time ratio) and shows that an engine's trajectory does not depend on its race (its validation curve
  must repeat exactly). This repeats up to ``--max-extensions`` rounds; every extension is recorded.
* **Seeds** (default 3) change the model initialisation, data order, dropout masks and DHO2's Lanczos
  start vectors; every figure is reported as mean and spread over seeds.
* **Target, per seed**: AdamW's final validation loss at its best lr in that seed. Per seed and method
  (at the method's best lr): steps and seconds to the first evaluation at or below the target, and the
  decomposition ``time ratio = step ratio x cost-per-step ratio`` with
  ``time ratio = AdamW seconds-to-target / method seconds-to-target``,
  ``step ratio = AdamW steps-to-target / method steps-to-target`` and
  ``cost ratio = (AdamW seconds/step) / (method seconds/step)``, both up to the target. A ratio > 1 means
  the method is faster. Ratios are summarised over seeds by their geometric mean (so the summaries
  multiply out too) and min/max.
* **ADMM window ends** are evaluated (the step right after the extrapolation, and the step before),
  for every engine, so a sawtooth is visible; the JSON marks those points and summarises the jumps.
* **Flattening.** The budgets were chosen (``--calibrate budgets``) so that AdamW's validation curve has
  flattened; the JSON reports the relative improvement of AdamW's best-lr curve over the last 20% of the
  budget (a robust line fit, and the two endpoints).
* **Cost per step** is reported three ways against AdamW in the same race: mean and median wall-clock
  step time, and CPU time (insensitive to other jobs on the machine). Peak memory per rank is recorded.
* **Equality check.** One extra engine in the first seed's race runs DHO2 with curvature and ADMM off;
  it must train like the AdamW engine of the same lr (loss and parameter differences are reported).

Runtime: ``--calibrate costs`` measures step, refresh and evaluation costs in a short race per task and
projects the suite's runtime (printed again before every full run).

    python -m benchmarks convergence [--quick] [--tasks digits,charlm,sst2] [--seeds 3] [--steps-scale 1]
                                     [--methods ...] [--max-extensions 3] [--calibrate [costs|budgets|all]]
                                     [--output-name NAME]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, machine_info, pyplot
from benchmarks.race import EngineSpec, run_race
from benchmarks.tasks import LR_RATIO, Task, make_tasks, round_lr, setup_task

logger = logging.getLogger(__name__)

#: The ablation (docs/design.md, "ADMM") as data: the DeepSpeed ``"optimizer"`` block of each method, before
#: ``lr``, ``weight_decay`` and (DHO2) ``seed`` are filled in. DHO2 keys not named here keep the library
#: defaults.
METHODS: dict[str, dict[str, Any]] = {
    "AdamW": {"type": "AdamW", "params": {"torch_adam": True, "foreach": True}},
    "AdamW+ADMM": {"type": "DHO2", "params": {"curvature": {"enabled": False}, "admm": {"enabled": True}}},
    "DHO2 w/o ADMM": {"type": "DHO2", "params": {"admm": {"enabled": False}}},
    "DHO2": {"type": "DHO2", "params": {"admm": {"enabled": True}}},
    # optional, never the headline: DHO2 + ADMM with the task's own overrides (Task.dho2_tuned)
    "DHO2 tuned": {"type": "DHO2", "params": {"admm": {"enabled": True}}, "task_overrides": "dho2_tuned"},
}
DEFAULT_METHODS = ["AdamW", "AdamW+ADMM", "DHO2 w/o ADMM", "DHO2"]
QUICK_METHODS = [*DEFAULT_METHODS, "DHO2 tuned"]
BASELINE = "AdamW"
#: The equality check: DHO2 with curvature and ADMM off must train exactly like the baseline.
REFERENCE = {"type": "DHO2", "params": {"curvature": {"enabled": False}, "admm": {"enabled": False}}}
FLATTENING_WINDOW = 0.2  # the last 20% of the budget
#: "reached" means val loss <= target * (1 + TARGET_RTOL): a method that trains exactly like AdamW up to
#: float rounding must not miss AdamW's own final loss by 1e-7
TARGET_RTOL = 1e-4


# ------------------------------------------------------------------------------------------ method blocks
def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def optimizer_block(method: dict[str, Any], task: Task, lr: float, seed: int) -> dict[str, Any]:
    """The DeepSpeed ``"optimizer"`` block of one run: the method's block with lr, weight decay, seed."""
    params = copy.deepcopy(method["params"])
    overrides = method.get("task_overrides")
    if overrides:
        params = _merge(params, getattr(task, overrides))
    params.update(lr=lr, weight_decay=task.weight_decay)
    if method["type"] == "DHO2":
        params["seed"] = seed
    return {"type": method["type"], "params": params}


def run_key(method: str, lr: float) -> str:
    return f"{method}@{lr:.6g}"


# ------------------------------------------------------------------------------------------ rank side
def _final(record: dict[str, Any]) -> float:
    value = record["evals"][-1]["val_loss"]
    return value if _finite(value) else math.inf


def _best_lr(runs: dict[int, dict[str, dict]], method: str, grid: list[float]) -> float:
    def score(lr: float) -> float:
        finals = [_final(runs[seed][run_key(method, lr)]) for seed in runs]
        return sum(finals) / len(finals)

    return min(sorted(grid), key=score)


def next_extensions(grids: dict[str, list[float]], best: dict[str, float]) -> dict[str, float]:
    """The lr to add per method whose best lr is on an edge of its (sorted) grid: one grid step beyond it."""
    new: dict[str, float] = {}
    for method, grid in grids.items():
        if len(grid) > 1 and best[method] == grid[0]:
            new[method] = round_lr(grid[0] / LR_RATIO)
        elif best[method] == grid[-1]:
            new[method] = round_lr(grid[-1] * LR_RATIO)
    return new


def task_worker(rank: int, world: int, plan: dict[str, Any]) -> dict[str, Any]:
    """One rank: the main race of every seed, then extension rounds until every best lr is bracketed."""
    import deepspeed

    import ds_dho2  # noqa: F401 - registers "type": "DHO2"

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(message)s", force=True)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "ds_dho2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    started = time.perf_counter()
    task = Task(**plan["task"])
    data = setup_task(task, rank, world)
    setup_seconds = time.perf_counter() - started
    methods: dict[str, dict] = plan["methods"]
    seeds: list[int] = plan["seeds"]
    grids = {m: sorted(task.lrs) for m in methods}
    runs: dict[int, dict[str, dict]] = {seed: {} for seed in seeds}
    races: list[dict[str, Any]] = []
    extensions: list[dict[str, Any]] = []
    base_grid: list[int] = []

    def spec(method: str, lr: float, seed: int, role: str = "sweep", key: str | None = None) -> EngineSpec:
        return EngineSpec(key or run_key(method, lr), method, lr, optimizer_block(methods[method], task, lr, seed),
                          role)

    reference_lr = task.lrs[len(task.lrs) // 2]
    for index, seed in enumerate(seeds):
        specs = [spec(m, lr, seed) for m in methods for lr in grids[m]]
        compare = []
        if plan["reference_check"] and index == 0 and BASELINE in methods:
            specs.append(EngineSpec("reference", "reference", reference_lr,
                                    optimizer_block(REFERENCE, task, reference_lr, seed), "reference"))
            compare = [("reference", run_key(BASELINE, reference_lr))]
        logger.info("%s seed %d: main race of %d engines x %d steps", task.name, seed, len(specs), task.steps)
        result = run_race(task, data, seed, specs, rank, world, base_grid, compare)
        base_grid = result["info"]["eval_steps"]
        races.append({"kind": "main", "round": 0, **result["info"]})
        runs[seed].update(result["engines"])
        logger.info("%s seed %d: race took %.0f s (peak RSS %.0f MiB)", task.name, seed,
                    result["info"]["race_seconds"], result["info"]["peak_rss_mib"])

    for round_index in range(1, plan["max_extensions"] + 1):
        best = {m: _best_lr(runs, m, grids[m]) for m in methods}
        new = next_extensions(grids, best)
        if not new:
            break
        anchor_method = BASELINE if BASELINE in methods else next(iter(methods))
        anchor_lr = best[anchor_method]
        for m, lr in new.items():
            extensions.append({"round": round_index, "method": m, "lr": lr,
                               "direction": "down" if lr < grids[m][0] else "up",
                               "reason": f"best lr {best[m]:.6g} was at the "
                                         f"{'lower' if lr < grids[m][0] else 'upper'} edge of {grids[m]}"})
        for seed in seeds:
            specs = [spec(m, lr, seed) for m, lr in new.items()]
            specs.append(spec(anchor_method, anchor_lr, seed, role="anchor", key="anchor"))
            logger.info("%s seed %d: extension round %d: %s", task.name, seed, round_index,
                        ", ".join(s.key for s in specs))
            result = run_race(task, data, seed, specs, rank, world, base_grid)
            anchor = result["engines"].pop("anchor")
            main = runs[seed][run_key(anchor_method, anchor_lr)]
            scale = sum(main["step_seconds"]) / max(sum(anchor["step_seconds"]), 1e-12)
            by_step = {p["step"]: p["val_loss"] for p in main["evals"]}
            repro = [abs(p["val_loss"] - by_step[p["step"]]) for p in anchor["evals"]
                     if p["step"] in by_step and _finite(p["val_loss"]) and _finite(by_step[p["step"]])]
            races.append({"kind": "extension", "round": round_index, "anchor": run_key(anchor_method, anchor_lr),
                          "time_scale": scale, "anchor_max_abs_val_loss_diff": max(repro) if repro else None,
                          **result["info"]})
            for key, record in result["engines"].items():
                record["clock"] = {"race": len(races) - 1, "scale": scale,
                                   "raw_train_seconds": sum(record["step_seconds"])}
                record["step_seconds"] = [t * scale for t in record["step_seconds"]]
                runs[seed][key] = record
        for m, lr in new.items():
            grids[m] = sorted(grids[m] + [lr])
    return {"runs": runs, "races": races, "grids": grids, "extensions": extensions,
            "data_info": data.info, "setup_seconds": setup_seconds, "reference_lr": reference_lr}


# ------------------------------------------------------------------------------------------ summary
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def stats(values: list[Any]) -> dict[str, Any]:
    """Mean, std, min, max and count of the finite values."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio_stats(values: list[Any]) -> dict[str, Any]:
    """Geometric mean (the summary of ratios that multiplies out), min, max and count."""
    vals = [float(v) for v in values if _finite(v) and v > 0]
    if not vals:
        return {"geomean": None, "min": None, "max": None, "n": 0}
    return {"geomean": math.exp(statistics.fmean(math.log(v) for v in vals)), "min": min(vals),
            "max": max(vals), "n": len(vals)}


def cumulative_seconds(record: dict[str, Any]) -> list[float]:
    """Training seconds after each step (index s = after s steps)."""
    out, total = [0.0], 0.0
    for t in record["step_seconds"]:
        total += t
        out.append(total)
    return out


def first_reach(record: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """The first evaluation at or below ``target``: (step, cumulative training seconds)."""
    cum = cumulative_seconds(record)
    for point in record["evals"]:
        if point["step"] > 0 and _finite(point["val_loss"]) and point["val_loss"] <= target * (1 + TARGET_RTOL):
            return point["step"], cum[point["step"]]
    return None, None


def sawtooth(record: dict[str, Any]) -> dict[str, Any] | None:
    """Validation-loss jumps across ADMM window ends: loss right after the extrapolation minus the loss
    one step before (positive = the extrapolation hurt)."""
    if not record.get("admm_window"):
        return None
    by_step = {p["step"]: p["val_loss"] for p in record["evals"]}
    jumps = [by_step[p["step"]] - by_step[p["step"] - 1] for p in record["evals"]
             if p.get("window_end") and p["step"] - 1 in by_step
             and _finite(p["val_loss"]) and _finite(by_step[p["step"] - 1])]
    return {"window": record["admm_window"], "window_ends": len(jumps),
            "mean_jump": statistics.fmean(jumps) if jumps else None,
            "max_jump": max(jumps) if jumps else None,
            "positive_jumps": sum(j > 0 for j in jumps)}


def _curve_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and min/max over seeds of the validation curves at the common evaluation steps."""
    steps = sorted(set.intersection(*(set(p["step"] for p in r["evals"]) for r in records)))
    out: dict[str, Any] = {"step": steps, "seconds_mean": [], "val_loss_mean": [], "val_loss_min": [],
                           "val_loss_max": [], "val_acc_mean": [], "window_end": []}
    cums = [cumulative_seconds(r) for r in records]
    maps = [{p["step"]: p for p in r["evals"]} for r in records]
    for step in steps:
        losses = [m[step]["val_loss"] for m in maps]
        finite = [v for v in losses if _finite(v)]
        accs = [m[step]["val_acc"] for m in maps if _finite(m[step]["val_acc"])]
        out["seconds_mean"].append(statistics.fmean(c[step] for c in cums))
        out["val_loss_mean"].append(statistics.fmean(finite) if len(finite) == len(losses) else None)
        out["val_loss_min"].append(min(finite) if finite else None)
        out["val_loss_max"].append(max(finite) if len(finite) == len(losses) else None)
        out["val_acc_mean"].append(statistics.fmean(accs) if accs else None)
        out["window_end"].append(bool(maps[0][step].get("window_end", False)))
    return out


def summarise(task: Task, result: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    runs, grids = result["runs"], result["grids"]
    methods = list(grids)
    out: dict[str, Any] = {"methods": {}, "lr_sweeps": {}}
    best: dict[str, float] = {}
    for m in methods:
        grid = sorted(grids[m])
        per_lr = {}
        for lr in grid:
            finals = [runs[s][run_key(m, lr)]["evals"][-1]["val_loss"] for s in seeds]
            per_lr[f"{lr:.6g}"] = {"lr": lr, "final_val_loss": stats(finals), "per_seed": finals,
                                   "diverged_seeds": sum(not _finite(v) for v in finals)}
        best[m] = _best_lr(runs, m, grid)
        ratios = [b / a for a, b in zip(grid, grid[1:])]
        out["lr_sweeps"][m] = {
            "grid": grid, "max_grid_ratio": max(ratios) if ratios else None, "best_lr": best[m],
            "bracketed": grid[0] < best[m] < grid[-1],
            "extensions": [e for e in result["extensions"] if e["method"] == m], "by_lr": per_lr}

    base = {s: runs[s][run_key(BASELINE, best[BASELINE])] for s in seeds} if BASELINE in best else None
    targets = {s: base[s]["evals"][-1]["val_loss"] for s in seeds} if base else {}
    base_reach = {s: first_reach(base[s], targets[s]) for s in seeds} if base else {}
    for m in methods:
        per_seed = []
        for s in seeds:
            record = runs[s][run_key(m, best[m])]
            final = record["evals"][-1]
            total = sum(record["step_seconds"])
            cpu_total = sum(record["step_cpu_seconds"])
            row: dict[str, Any] = {
                "seed": s, "target_val_loss": targets.get(s), "final_val_loss": final["val_loss"],
                "final_val_acc": final["val_acc"], "train_seconds": total,
                "seconds_per_step": total / task.steps, "train_cpu_seconds": cpu_total,
                "median_step_seconds": statistics.median(record["step_seconds"]),
                "refreshes": len(record["refreshes"]),
                "refresh_seconds": sum(r["seconds"] or 0.0 for r in record["refreshes"]),
                "sawtooth": sawtooth(record), "error": record.get("error")}
            if base:
                steps, seconds = first_reach(record, targets[s])
                b_steps, b_seconds = base_reach[s]
                row.update(steps_to_target=steps, seconds_to_target=seconds)
                base_total = sum(base[s]["step_seconds"])
                base_median = statistics.median(base[s]["step_seconds"])
                row["step_cost_vs_adamw"] = total / base_total if base_total else None
                base_cpu = sum(base[s]["step_cpu_seconds"])
                row["cpu_step_cost_vs_adamw"] = cpu_total / base_cpu if base_cpu else None
                row["median_step_cost_vs_adamw"] = (row["median_step_seconds"] / base_median
                                                    if base_median else None)
                if steps and b_steps and seconds and b_seconds:
                    row["step_ratio"] = b_steps / steps
                    row["cost_ratio"] = (b_seconds / b_steps) / (seconds / steps)
                    row["time_ratio"] = b_seconds / seconds
                else:
                    row["step_ratio"] = row["cost_ratio"] = row["time_ratio"] = None
            per_seed.append(row)
        agg: dict[str, Any] = {"best_lr": best[m], "seeds": len(per_seed), "per_seed": per_seed}
        for key in ("final_val_loss", "final_val_acc", "steps_to_target", "seconds_to_target", "train_seconds",
                    "train_cpu_seconds",
                    "seconds_per_step", "median_step_seconds", "refreshes", "refresh_seconds"):
            agg[key] = stats([r.get(key) for r in per_seed])
        for key in ("time_ratio", "step_ratio", "cost_ratio", "step_cost_vs_adamw", "median_step_cost_vs_adamw",
                    "cpu_step_cost_vs_adamw"):
            agg[key] = ratio_stats([r.get(key) for r in per_seed])
        reached = sum(r.get("steps_to_target") is not None for r in per_seed)
        agg["reached_target"] = reached
        agg["verdict"] = _verdict(m, agg, len(seeds))
        jumps = [r["sawtooth"]["mean_jump"] for r in per_seed if r["sawtooth"]]
        agg["window_end_mean_jump"] = stats(jumps) if jumps else None
        agg["curve"] = _curve_stats([runs[s][run_key(m, best[m])] for s in seeds])
        out["methods"][m] = agg

    out["target"] = {"definition": "per seed: AdamW's final validation loss at its best lr (the lr with the "
                                   "lowest mean-over-seeds final validation loss); reached at the first "
                                   f"evaluation with val loss <= target x (1 + {TARGET_RTOL:g})",
                     "per_seed": targets, "stats": stats(list(targets.values()))}
    if base:
        steps = task.steps
        start = (1.0 - FLATTENING_WINDOW) * steps
        curve = out["methods"][BASELINE]["curve"]
        mean_points = [{"step": st, "val_loss": v} for st, v in zip(curve["step"], curve["val_loss_mean"])]
        out["adamw_flattening"] = {
            "definition": f"relative improvement of AdamW's best-lr validation loss over the last 20% of the "
                          f"budget (steps {start:.0f}-{steps}): 'fitted' from a Theil-Sen line (robust to single "
                          f"noisy evaluations) through the evaluations in that range, (fit({start:.0f}) - "
                          f"fit({steps})) / fit({start:.0f}); 'endpoints' from the evaluations nearest both ends; "
                          "'noise': the standard deviation of the evaluations around the line, relative to its "
                          "start (improvements within it are indistinguishable from flat)",
            "mean_curve": flattening(mean_points, steps),
            "per_seed": {s: flattening(base[s]["evals"], steps) for s in seeds}}
    return out


def flattening(evals: list[dict[str, Any]], steps: int, window: float = FLATTENING_WINDOW) -> dict[str, Any]:
    """Relative improvement of a validation curve over the last ``window`` of ``steps`` (fitted, endpoints)."""
    start = (1.0 - window) * steps
    points = [(p["step"], p["val_loss"]) for p in evals if p["step"] >= start - 1e-9 and _finite(p["val_loss"])]
    fitted = noise = None
    if len(points) >= 2:
        # Theil-Sen line: the median of the pairwise slopes, so one noisy evaluation cannot tilt it
        slope = statistics.median((y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
                                  for x2, y2 in points[i + 1:] if x2 != x1)
        intercept = statistics.median(y - slope * x for x, y in points)
        at_start = intercept + slope * start
        fitted = -slope * (steps - start) / at_start if at_start else None
        residuals = [y - (intercept + slope * x) for x, y in points]
        noise = statistics.pstdev(residuals) / at_start if at_start else None
    first = min(evals, key=lambda p: (abs(p["step"] - start), -p["step"]))["val_loss"]
    last = evals[-1]["val_loss"]
    endpoints = (first - last) / first if _finite(first) and _finite(last) and first else None
    return {"fitted": fitted, "endpoints": endpoints, "noise": noise}


def _verdict(method: str, agg: dict[str, Any], seeds: int) -> str:
    if method == BASELINE:
        return "baseline"
    if agg["reached_target"] < seeds:
        return f"LOSES: target missed in {seeds - agg['reached_target']} of {seeds} seeds"
    ratio = agg["time_ratio"]
    if ratio["min"] is not None and ratio["min"] > 1.0:
        return "wins in every seed"
    if ratio["max"] is not None and ratio["max"] < 1.0:
        return "LOSES in every seed"
    return "mixed: wins in some seeds, loses in others"


def reference_summary(task: Task, result: dict[str, Any]) -> dict[str, Any] | None:
    main = next((r for r in result["races"] if r["kind"] == "main" and r.get("param_diffs")), None)
    if main is None:
        return None
    seed = main["seed"]
    lr = result["reference_lr"]
    ours = result["runs"][seed].get("reference")
    base = result["runs"][seed].get(run_key(BASELINE, lr))
    if ours is None or base is None:
        return None
    ((pair, diffs),) = main["param_diffs"].items()
    val = [abs(a["val_loss"] - b["val_loss"]) for a, b in zip(ours["evals"], base["evals"])]
    train = [abs(a - b) for a, b in zip(ours["train_loss"], base["train_loss"]) if _finite(a) and _finite(b)]
    return {"what": f"DHO2 {REFERENCE['params']} vs DeepSpeed {METHODS[BASELINE]}", "lr": lr, "seed": seed,
            "steps": task.steps, "max_abs_val_loss_diff": max(val), "max_abs_train_loss_diff": max(train),
            **diffs, "step_cost_vs_adamw": sum(ours["step_seconds"]) / sum(base["step_seconds"]),
            "median_step_cost_vs_adamw": statistics.median(ours["step_seconds"])
            / statistics.median(base["step_seconds"])}


# ------------------------------------------------------------------------------------------ reporting
def _f(value: Any, spec: str, none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec)


def _pct(flat: dict[str, Any], key: str) -> str:
    value = (flat.get("mean_curve") or {}).get(key)
    return "-" if value is None else f"{100 * value:.2f}%"


def _ms(s: dict[str, Any], spec: str) -> str:
    """``mean ± std`` of a stats dict."""
    if s is None or s.get("mean") is None:
        return "-"
    return f"{format(s['mean'], spec)} ± {format(s['std'], spec)}"


def _range(s: dict[str, Any], spec: str) -> str:
    if s is None or s.get("n", 0) == 0:
        return "-"
    central = s["geomean"] if "geomean" in s else s["mean"]
    return f"{format(central, spec)} [{format(s['min'], spec)}, {format(s['max'], spec)}]"


def markdown(payload: dict[str, Any], json_name: str = "convergence.json") -> str:
    """The report, generated from the JSON payload alone (written as ``json_name``)."""
    settings = payload["settings"]
    lines = [
        f"# Convergence: DeepSpeed ZeRO-2, W={settings['world_size']} CPU ranks (gloo), "
        f"{len(settings['seeds'])} seeds",
        "",
        f"Generated from `{json_name}` (command and machine inside). Every engine of a (task, seed) ran in "
        "one lockstep race (`benchmarks/race.py`), so time ratios are measured under the same machine "
        "conditions. Methods: " + "; ".join(f"**{m}** = `{json.dumps(settings['methods'][m])}`"
                                            for m in settings["methods"]) + ". DHO2 library defaults at run "
        f"time: `{json.dumps(settings['dho2_defaults'])}`.",
        "",
        "Target per seed: AdamW's final validation loss at its best lr. Ratios are AdamW / method (> 1: the "
        "method is faster) as geometric mean [min, max] over seeds; **time ratio = step ratio x cost ratio** "
        "(seconds to target, steps to target, seconds per step up to the target). `step cost` is the "
        "method's mean step time over the whole budget relative to AdamW's, with the median step's ratio and the "
        "ratio of CPU time (each rank's process CPU time; insensitive to other load on the machine). Other "
        "figures: mean ± std over seeds.",
        "",
    ]
    for name, entry in payload["tasks"].items():
        task, summary = entry["settings"], entry["summary"]
        flat = summary.get("adamw_flattening") or {}
        lines += [f"## {name}: {task['description']}", "",
                  f"Budget {task['steps']} steps (micro batch {task['micro_batch']} per rank), evaluation every "
                  f"{task['eval_every']} steps plus ADMM window ends; "
                  f"{entry['data_info'].get('trainable_params', 0):,} "
                  f"trainable parameters. Flattening: AdamW's best-lr curve (mean over seeds) improved "
                  f"{_pct(flat, 'fitted')} (robust line fit; endpoints {_pct(flat, 'endpoints')}; evaluation noise "
                  f"±{_pct(flat, 'noise')}) over the last 20% of the budget. Target "
                  f"{_ms(summary['target']['stats'], '.4f')}. Wall time {entry['wall_seconds']:.0f} s; peak RSS of "
                  f"rank 0 {max(r['peak_rss_mib'] for r in entry['races']):.0f} MiB with "
                  f"{max(r['engines'] for r in entry['races'])} engines alive.",
                  ""]
        if task.get("notes"):
            lines += [task["notes"], ""]
        lines += ["| method | best lr | final val loss | final val acc | steps to target | s to target | "
                  "time ratio | = step ratio | x cost ratio | step cost: mean (median, CPU) | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, row in summary["methods"].items():
            reached = f" ({row['reached_target']}/{row['seeds']})" if m != BASELINE else ""
            lines.append(
                f"| {m} | {row['best_lr']:.3g} | {_ms(row['final_val_loss'], '.4f')} | "
                f"{_ms(row['final_val_acc'], '.3f')} | {_ms(row['steps_to_target'], '.0f')}{reached} | "
                f"{_ms(row['seconds_to_target'], '.1f')} | {_range(row['time_ratio'], '.2f')} | "
                f"{_range(row['step_ratio'], '.2f')} | {_range(row['cost_ratio'], '.2f')} | "
                f"{_f(row['step_cost_vs_adamw']['geomean'], '.2f')}x "
                f"({_f(row['median_step_cost_vs_adamw']['geomean'], '.2f')}x, "
                f"{_f(row['cpu_step_cost_vs_adamw']['geomean'], '.2f')}x) | {row['verdict']} |")
        lines += ["", "lr sweeps (mean final validation loss over seeds; **bold** = best; * = extended grid):", "",
                  "| method | " + " | ".join(["grid (ratio)", "bracketed", "final val loss by lr"]) + " |",
                  "|---|---|---|---|"]
        for m, sweep in summary["lr_sweeps"].items():
            extended = {e["lr"] for e in sweep["extensions"]}
            cells = []
            for item in sweep["by_lr"].values():
                value = _f(item["final_val_loss"]["mean"], ".4f", "diverged")
                if item["diverged_seeds"] and item["final_val_loss"]["mean"] is not None:
                    value += f" ({item['diverged_seeds']} diverged)"
                label = f"{item['lr']:.3g}{'*' if item['lr'] in extended else ''}: {value}"
                cells.append(f"**{label}**" if item["lr"] == sweep["best_lr"] else label)
            lines.append(f"| {m} | {len(sweep['grid'])} lrs ({_f(sweep['max_grid_ratio'], '.2f')}x) | "
                         f"{'yes' if sweep['bracketed'] else 'NO'} | {'; '.join(cells)} |")
        saw = [(m, r["window_end_mean_jump"]) for m, r in summary["methods"].items() if r.get("window_end_mean_jump")]
        if saw:
            lines += ["", "ADMM window ends (validation loss right after the extrapolation minus one step before; "
                          "> 0 = the extrapolation hurt): " + "; ".join(
                              f"{m}: {_ms(s, '+.4f')} "
                              f"(window {summary['methods'][m]['per_seed'][0]['sawtooth']['window']})"
                              for m, s in saw) + "."]
        refresh = [(m, r) for m, r in summary["methods"].items() if r["refreshes"]["mean"]]
        if refresh:
            lines += ["", "Curvature refreshes within the budget: " + "; ".join(
                f"{m}: {r['refreshes']['mean']:.0f}, {_f(r['refresh_seconds']['mean'], '.1f')} s in all"
                for m, r in refresh) + "."]
        check = entry.get("reference_check")
        if check:
            lines += ["", f"Equality check (seed {check['seed']}, lr {check['lr']:g}, {check['steps']} steps, same "
                          f"race): {check['what']}: max |val loss diff| {check['max_abs_val_loss_diff']:.2e}, max "
                          f"|train loss diff| {check['max_abs_train_loss_diff']:.2e}, max |param diff| "
                          f"{check['max_abs_param_diff']:.2e} (param norm {check['param_norm']:.2f}); its step costs "
                          f"{check['step_cost_vs_adamw']:.2f}x AdamW's "
                          f"(median {check['median_step_cost_vs_adamw']:.2f}x)."]
        ext = [r for r in entry["races"] if r["kind"] == "extension"]
        if ext:
            lines += ["", f"Extension races: {len(ext)} (anchor {ext[0]['anchor']}); anchor curve reproduced to "
                          f"{_f(max((r['anchor_max_abs_val_loss_diff'] or 0.0) for r in ext), '.1e')}; clock "
                          f"scales {min(r['time_scale'] for r in ext):.2f}-{max(r['time_scale'] for r in ext):.2f}."]
        lines.append("")
    return "\n".join(lines)


def plot(name: str, entry: dict[str, Any], path: Path) -> None:
    """Validation loss vs steps and vs seconds (mean over seeds, min-max band) and the lr sweeps."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    summary = entry["summary"]
    colors = {}
    for index, (m, row) in enumerate(summary["methods"].items()):
        color = colors.setdefault(m, f"C{index}")
        curve = row["curve"]
        keep = [i for i, v in enumerate(curve["val_loss_mean"]) if v is not None]
        steps = [curve["step"][i] for i in keep]
        secs = [curve["seconds_mean"][i] for i in keep]
        mean = [curve["val_loss_mean"][i] for i in keep]
        low = [curve["val_loss_min"][i] for i in keep]
        high = [curve["val_loss_max"][i] for i in keep]
        label = f"{m} (lr {row['best_lr']:.3g})"
        width = 2.2 if m == BASELINE else 1.3
        for ax, xs in ((axes[0], steps), (axes[1], secs)):
            ax.plot(xs, mean, color=color, linewidth=width, label=label, zorder=3 if m == BASELINE else 2)
            ax.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)
            ends = [i for i in range(len(keep)) if curve["window_end"][keep[i]]]
            if ends:
                ax.scatter([xs[i] for i in ends], [mean[i] for i in ends], color=color, marker="v", s=14, zorder=4)
        sweep = summary["lr_sweeps"][m]
        lrs = [item["lr"] for item in sweep["by_lr"].values()]
        means = [item["final_val_loss"]["mean"] for item in sweep["by_lr"].values()]
        lows = [item["final_val_loss"]["min"] for item in sweep["by_lr"].values()]
        highs = [item["final_val_loss"]["max"] for item in sweep["by_lr"].values()]
        ok = [i for i, v in enumerate(means) if v is not None]
        axes[2].errorbar([lrs[i] for i in ok], [means[i] for i in ok],
                         yerr=[[means[i] - lows[i] for i in ok], [highs[i] - means[i] for i in ok]],
                         color=color, marker="o", markersize=3, capsize=2, label=m)
    target = summary["target"]["stats"]["mean"]
    means = [v for row in summary["methods"].values() for v in row["curve"]["val_loss_mean"] if v is not None]
    lows = [v for row in summary["methods"].values() for v in row["curve"]["val_loss_min"] if v is not None]
    if means and lows:  # the top 10% of the curves (the first steps) would squash the part that matters
        bottom, top = min(lows) * 0.97, sorted(means)[int(0.9 * (len(means) - 1))] * 1.05
    for ax, xlabel in ((axes[0], "step"), (axes[1], "training seconds (lockstep race, mean over seeds)")):
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target (mean over seeds)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_yscale("log")
        if means and lows and top > bottom:
            ax.set_ylim(bottom, top)
        ax.grid(alpha=0.3, which="both")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("learning rate")
    axes[2].set_ylabel("final validation loss (mean, min-max over seeds)")
    axes[2].grid(alpha=0.3, which="both")
    sweep_lows = [item["final_val_loss"]["min"] for sweep in summary["lr_sweeps"].values()
                  for item in sweep["by_lr"].values() if item["final_val_loss"]["min"] is not None]
    if sweep_lows:
        axes[2].set_ylim(min(sweep_lows) * 0.97, min(sweep_lows) * 2.0)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: validation loss at each method's best lr, mean over seeds with min-max band "
                 "(triangles: right after an ADMM window-end extrapolation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ driver
def _output_paths(name: str) -> tuple[Path, str]:
    """``name`` is a bare name (written under benchmarks/results/) or a path (its directory is used)."""
    candidate = Path(name)
    if candidate.parent != Path("."):
        return candidate.parent, candidate.name
    return RESULTS_DIR, name


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"commit": commit, "modified_files": [line[3:] for line in dirty if line.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {}


def _sanitize(value: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    if torch.is_tensor(value):
        return _sanitize(value.tolist())
    return value


def compact_run(record: dict[str, Any]) -> dict[str, Any]:
    """A run as stored in the JSON: per-step times (microseconds resolution, max over ranks) kept, and each
    evaluation gains its cumulative training seconds and the mean training loss since the previous one."""
    out = {k: v for k, v in record.items() if k not in ("step_seconds", "step_cpu_seconds", "train_loss")}
    out["train_cpu_seconds"] = sum(record["step_cpu_seconds"])
    cum = cumulative_seconds(record)
    losses = record["train_loss"]
    evals, previous = [], 0
    for point in record["evals"]:
        step = point["step"]
        window = [v for v in losses[previous:step] if _finite(v)]
        evals.append({**point, "seconds": cum[step],
                      "train_loss": statistics.fmean(window) if window else None})
        previous = step
    out["evals"] = evals
    out["train_seconds"] = cum[-1]
    out["step_seconds"] = [round(t, 6) for t in record["step_seconds"]]
    return out


def dho2_defaults() -> dict[str, Any]:
    from ds_dho2.config import DHO2Config

    return DHO2Config().to_dict()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="digits only, 3-point grid, 24 steps, one extension round (CI smoke test)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of digits,charlm,sst2,autoencoder")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1), default 3")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="scale every step budget (and evaluation interval) by this factor")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {list(METHODS)} (default: {DEFAULT_METHODS}; "
                             f"--quick adds 'DHO2 tuned')")
    parser.add_argument("--max-extensions", type=int, default=None,
                        help="rounds of automatic lr-grid extension (default 3, --quick 1)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--output-name", default=None,
                        help="results name under benchmarks/results/ (default convergence[_quick]) or a path")
    parser.add_argument("--no-reference-check", action="store_true",
                        help="skip the DHO2-with-everything-off vs AdamW equality engine")
    parser.add_argument("--calibrate", nargs="?", const="costs", choices=("costs", "budgets", "all"), default=None,
                        help="costs: measure per-step and refresh costs in a short race per task and project the "
                             "suite's runtime; budgets: AdamW-only validation curves over each budget (flattening); "
                             "all: both (benchmarks/calibrate.py)")
    parser.add_argument("--calibrate-steps", type=int, default=30, help="steps of each calibration race")
    parser.add_argument("--estimate", action="store_true",
                        help="print the plan and the runtime projected from the last cost calibration, then exit")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ds_dho2.dist.local_ranks import run_ranks

    parser = build_parser()
    args = parser.parse_args(argv)
    all_tasks = make_tasks(args.quick)
    names = list(all_tasks) if not args.tasks else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in all_tasks]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(all_tasks)}")
    method_names = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
                    else (QUICK_METHODS if args.quick else DEFAULT_METHODS))
    if any(m not in METHODS for m in method_names):
        parser.error(f"methods must be among {list(METHODS)}")
    if args.seeds < 1 or args.steps_scale <= 0:
        parser.error("--seeds must be >= 1 and --steps-scale > 0")
    tasks = {n: (all_tasks[n].scaled(args.steps_scale) if args.steps_scale != 1.0 else all_tasks[n]) for n in names}
    seeds = list(range(args.seeds))
    max_extensions = args.max_extensions if args.max_extensions is not None else (1 if args.quick else 3)
    command = " ".join([Path(sys.executable).name, "-m", "benchmarks", "convergence",
                        *(argv if argv is not None else sys.argv[1:])])

    if args.calibrate:
        from benchmarks.calibrate import calibrate

        return calibrate(tasks, {m: METHODS[m] for m in method_names}, seeds, args.world_size,
                         args.calibrate_steps, command, args.calibrate)

    from benchmarks.calibrate import projected_seconds

    projection = projected_seconds(tasks, method_names, len(seeds))
    if args.estimate:
        for name, task in tasks.items():
            print(f"{name}: {task.steps} steps, eval every {task.eval_every}, {len(method_names)} methods x "
                  f"{len(task.lrs)} lrs {task.lrs} x {len(seeds)} seeds")
        if projection is None:
            print("no cost calibration for these tasks and methods: run --calibrate costs first")
        else:
            for name in tasks:
                print(f"{name}: projected {projection['tasks'][name] / 60:.0f} min at the calibration's load, "
                      f"{projection['tasks_idle_machine'][name] / 60:.0f} min on an idle machine")
            print(f"total: {projection['total'] / 60:.0f} min at the calibration's load, "
                  f"{projection['total_idle_machine'] / 60:.0f} min on an idle machine")
        return {"projection": projection}
    default_name = "convergence_quick" if args.quick else "convergence"
    out_dir, out_name = _output_paths(args.output_name or default_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    if projection:
        print(f"[convergence] projected from the last calibration: {projection['total'] / 60:.0f} min at its load "
              f"({', '.join(f'{k} {v / 60:.0f} min' for k, v in projection['tasks'].items())}), "
              f"{projection['total_idle_machine'] / 60:.0f} min on an idle machine", flush=True)

    results: dict[str, Any] = {}
    load_before = os.getloadavg()
    started = time.perf_counter()
    for name, task in tasks.items():
        launched = time.perf_counter()
        grid_text = ", ".join(f"{lr:.3g}" for lr in task.lrs)
        print(f"[convergence] {name}: {len(method_names)} methods x lrs [{grid_text}] x {len(seeds)} seeds, "
              f"{task.steps} steps, W={args.world_size}", flush=True)
        plan = {"task": task.settings(), "methods": {m: METHODS[m] for m in method_names}, "seeds": seeds,
                "max_extensions": max_extensions, "reference_check": not args.no_reference_check}
        result = run_ranks(task_worker, args.world_size, plan, timeout=6 * 3600)[0]
        result["wall_seconds"] = time.perf_counter() - launched
        results[name] = result
        print(f"[convergence] {name} done in {result['wall_seconds']:.0f} s", flush=True)
    total = time.perf_counter() - started

    settings = {"quick": args.quick, "world_size": args.world_size, "zero_stage": 2, "seeds": seeds,
                "steps_scale": args.steps_scale, "max_extensions": max_extensions, "lr_ratio": LR_RATIO,
                "methods": {m: METHODS[m] for m in method_names}, "baseline": BASELINE,
                "dho2_defaults": dho2_defaults(), "wall_seconds": total, "projection": projection,
                "load_average": {"start": load_before, "end": os.getloadavg()}}
    payload = {
        "benchmark": "convergence", "command": command, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(), "git": _git_state(), "settings": settings,
        "tasks": {n: {"settings": tasks[n].settings(), "summary": summarise(tasks[n], r, seeds),
                      "reference_check": reference_summary(tasks[n], r), "races": r["races"],
                      "extensions": r["extensions"], "data_info": r["data_info"],
                      "setup_seconds": r["setup_seconds"], "wall_seconds": r["wall_seconds"],
                      "runs": {str(seed): {key: compact_run(run) for key, run in by_key.items()}
                               for seed, by_key in r["runs"].items()}}
                  for n, r in results.items()},
    }
    payload = _sanitize(payload)
    json_path = out_dir / f"{out_name}.json"
    json_path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    table = markdown(payload, json_path.name)
    (out_dir / f"{out_name}.md").write_text(table + "\n")
    for name in tasks:
        plot(name, payload["tasks"][name], out_dir / f"{out_name}_{name}.png")
    print(table)
    print(f"total wall time {total:.0f} s; results: {json_path}")
    return payload


if __name__ == "__main__":
    main()
