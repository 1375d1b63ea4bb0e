"""Calibration of the convergence suite (``python -m benchmarks convergence --calibrate``).

Two short measurements, written to ``benchmarks/results/convergence_calibration.json``:

* **Costs** (real W-rank DeepSpeed engines, one short lockstep race per task): the median step time of
  every method at the task's central lr, the extra time of one curvature refresh (a probe engine runs
  DHO2's defaults with ``warmup_steps`` lowered so that a refresh happens inside the short race; that
  override exists only in this probe), the time to evaluate one engine once, the per engine-step
  overhead of the race (barriers, batch slicing) and the time to build an engine. From these,
  :func:`projected_seconds` projects the runtime of the full suite for the current task settings; the
  suite prints that projection before it starts.
* **Budgets** (AdamW alone, one process, the same global batch, so the same arithmetic as W ranks): the
  validation curve over the task's budget at each lr of its initial grid, and the relative improvement
  over the last 20% of the budget at the best lr. A budget is long enough when that figure is small.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, machine_info
from benchmarks.race import EngineSpec, run_race
from benchmarks.tasks import Task, epoch_order, setup_task

logger = logging.getLogger(__name__)

CALIBRATION_PATH = RESULTS_DIR / "convergence_calibration.json"
PROBE = "DHO2 refresh probe"
PROBE_WARMUP = 5


def _cost_worker(rank: int, world: int, plan: dict[str, Any]) -> dict[str, Any]:
    import deepspeed

    import ds_dho2  # noqa: F401 - registers "type": "DHO2"
    from benchmarks.convergence import optimizer_block

    logging.basicConfig(level=logging.WARNING, force=True)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    started = time.perf_counter()
    task = Task(**plan["task"])
    data = setup_task(task, rank, world)
    setup_seconds = time.perf_counter() - started
    lr = task.lrs[len(task.lrs) // 2]
    specs = [EngineSpec(m, m, lr, optimizer_block(block, task, lr, 0)) for m, block in plan["methods"].items()]
    probe = optimizer_block({"type": "DHO2", "params": {"warmup_steps": PROBE_WARMUP}}, task, lr, 0)
    specs.append(EngineSpec(PROBE, PROBE, lr, probe, "probe"))
    calibration_task = Task(**{**plan["task"], "steps": plan["steps"], "eval_every": max(1, plan["steps"] // 3)})
    eval_started = time.perf_counter()
    result = run_race(calibration_task, data, 0, specs, rank, world)
    wall = time.perf_counter() - eval_started
    return {"result": result, "setup_seconds": setup_seconds, "wall_seconds": wall, "lr": lr}


def _refresh_count(steps: int, warmup: int, interval: int) -> int:
    return 0 if steps < warmup else (steps - warmup) // interval + 1


def cost_model(task: Task, measured: dict[str, Any]) -> dict[str, Any]:
    """Per-method step cost, refresh cost and race overheads from one calibration race."""
    result = measured["result"]
    engines, info = result["engines"], result["info"]
    n_steps = info["steps"]
    costs: dict[str, Any] = {}
    for key, record in engines.items():
        times = record["step_seconds"]
        refresh_steps = {r["step"] for r in record["refreshes"]}
        plain = [t for s, t in enumerate(times, start=1) if s not in refresh_steps]
        costs[key] = {"median_step_seconds": statistics.median(plain),
                      "mean_step_seconds": statistics.fmean(plain),
                      "refresh_step_seconds": [times[s - 1] for s in sorted(refresh_steps)],
                      "refresh_reported_seconds": [r["seconds"] for r in record["refreshes"]],
                      "built": record["built"]}
    probe = costs.get(PROBE, {})
    probe_config = engines[PROBE]["built"].get("config", {})
    after = [t for s, t in enumerate(engines[PROBE]["step_seconds"], start=1)
             if s > PROBE_WARMUP and s not in {r["step"] for r in engines[PROBE]["refreshes"]}]
    refresh_extra = ([t - statistics.median(after or [0.0]) for t in probe.get("refresh_step_seconds", [])])
    timed = sum(sum(r["step_seconds"]) for r in engines.values())
    cpu = sum(sum(r["step_cpu_seconds"]) for r in engines.values())
    n_evals = len(info["eval_steps"])
    engine_steps = len(engines) * n_steps
    eval_seconds = info.get("eval_seconds", 0.0)
    return {
        "steps": n_steps, "lr": measured["lr"], "methods": costs,
        "dho2_after_first_refresh_median_step_seconds": statistics.median(after) if after else None,
        "refresh_extra_seconds": statistics.fmean(refresh_extra) if refresh_extra else None,
        "refresh_completed": bool(probe.get("refresh_step_seconds")),
        "dho2_default_schedule": {"warmup_steps": probe_config.get("warmup_steps"),
                                  "refresh_interval": probe_config.get("refresh_interval")},
        "eval_seconds_per_engine": eval_seconds / max(1, n_evals * len(engines)),
        "overhead_seconds_per_engine_step": max(0.0, (info["race_seconds"] - eval_seconds - timed) / engine_steps),
        "build_seconds_per_engine": info["build_seconds"] / len(engines),
        "setup_seconds": measured["setup_seconds"], "peak_rss_mib": info["peak_rss_mib"],
        # CPU time / wall time of the timed steps: about 1 on an otherwise idle machine, lower under load
        "cpu_fraction": cpu / timed if timed else None,
    }


def _engine_seconds(model: dict[str, Any], method: str, steps: int) -> float:
    """Projected training seconds of one engine of ``method`` over ``steps``."""
    cost = model["methods"].get(method)
    if cost is None:
        return math.nan
    config = cost["built"].get("config") or {}
    curvature = (config.get("curvature") or {}).get("enabled", False)
    if not curvature:
        return steps * cost["median_step_seconds"]
    warmup = config.get("warmup_steps") or steps + 1
    interval = config.get("refresh_interval") or steps + 1
    after = model["dho2_after_first_refresh_median_step_seconds"] or cost["median_step_seconds"]
    before = min(warmup, steps)
    refreshes = _refresh_count(steps, warmup, interval)
    return (before * cost["median_step_seconds"] + (steps - before) * after
            + refreshes * (model["refresh_extra_seconds"] or 0.0))


def project(task: Task, model: dict[str, Any], methods: list[str], seeds: int,
            extension_engines: int = 2) -> dict[str, Any]:
    """Projected wall seconds of one task: main races of every seed plus one extension round with
    ``extension_engines`` new engines and the anchor per seed."""
    steps = task.steps
    n_evals = len(set(range(0, steps + 1, task.eval_every))) + 2 * math.ceil(steps / 100)  # + window ends
    per_seed = 0.0
    engines = 0
    for method in methods:
        per_engine = _engine_seconds(model, method, steps)
        per_seed += len(task.lrs) * per_engine
        engines += len(task.lrs)
    overhead = (engines * steps * model["overhead_seconds_per_engine_step"]
                + engines * n_evals * model["eval_seconds_per_engine"] + engines * model["build_seconds_per_engine"])
    main = seeds * (per_seed + overhead) + _engine_seconds(model, "AdamW", steps)  # + the equality engine
    mean_engine = per_seed / max(engines, 1)
    extension = seeds * (extension_engines * mean_engine + _engine_seconds(model, "AdamW", steps)
                         + (extension_engines + 1) * (steps * model["overhead_seconds_per_engine_step"]
                                                      + n_evals * model["eval_seconds_per_engine"]))
    total = main + extension + model["setup_seconds"] + 15.0
    return {"main_races": main, "one_extension_round": extension, "setup": model["setup_seconds"],
            "total": total, "total_idle_machine": total * min(1.0, model.get("cpu_fraction") or 1.0)}


def projected_seconds(tasks: dict[str, Task], methods: list[str], seeds: int,
                      path: Path = CALIBRATION_PATH) -> dict[str, Any] | None:
    """The projected runtime of the given task settings from the last calibration (None without one)."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())["tasks"]
    except (OSError, ValueError, KeyError):
        return None
    out: dict[str, float] = {}
    idle: dict[str, float] = {}
    for name, task in tasks.items():
        if name not in saved or "costs" not in saved[name]:
            return None
        projection = project(task, saved[name]["costs"], methods, seeds)
        if not math.isfinite(projection["total"]):
            return None
        out[name], idle[name] = projection["total"], projection["total_idle_machine"]
    return {"total": sum(out.values()), "tasks": out, "total_idle_machine": sum(idle.values()),
            "tasks_idle_machine": idle, "calibration": str(path.name),
            "note": "total: at the load the calibration saw (its load_average); idle: scaled by the measured "
                    "CPU/wall fraction of the timed steps"}


def budget_curves(task: Task, world: int) -> dict[str, Any]:
    """AdamW alone (torch.optim.AdamW, foreach) in this process with the suite's global batch, over the
    task's budget at every lr of its initial grid: the evidence a budget is long enough."""
    torch.set_num_threads(1)
    data = setup_task(task, 0, 1)
    order = epoch_order(data.train_rows, task.steps, task.micro_batch * world, 0)
    grid = sorted(set(range(0, task.steps + 1, task.eval_every)) | {task.steps})
    curves: dict[str, Any] = {}
    started = time.perf_counter()
    for lr in task.lrs:
        model = data.build_model(0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=task.weight_decay, foreach=True)
        torch.manual_seed(0)
        curve = []
        for step in range(task.steps + 1):
            if step in grid:
                model.eval()
                with torch.no_grad():
                    sums = torch.tensor([data.evaluate(model, a, k) for a, k in data.val_batches]).sum(0)
                model.train()
                curve.append({"step": step, "val_loss": float(sums[0] / sums[2]),
                              "val_acc": float(sums[1] / sums[2])})
            if step == task.steps:
                break
            args, kwargs = data.train_batch(order[step])
            out = model(*args, **kwargs)
            loss = out if torch.is_tensor(out) else out.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        curves[f"{lr:.6g}"] = curve
    from benchmarks.convergence import flattening

    best = min(curves, key=lambda lr: curves[lr][-1]["val_loss"])
    curve = curves[best]
    return {"steps": task.steps, "best_lr": float(best), "curves": curves,
            "relative_improvement_last_20pct": flattening(curve, task.steps),
            "min_val_loss_step": min(curve, key=lambda p: p["val_loss"])["step"],
            "seconds": time.perf_counter() - started}


def calibrate(tasks: dict[str, Task], methods: dict[str, dict], seeds: list[int], world: int, steps: int,
              command: str, what: str = "costs") -> dict[str, Any]:
    """Run the cost and/or budget calibration of ``tasks``; merge into the calibration file."""
    from ds_dho2.dist.local_ranks import run_ranks

    previous = json.loads(CALIBRATION_PATH.read_text()) if CALIBRATION_PATH.exists() else {}
    out: dict[str, Any] = {"benchmark": "convergence_calibration", "command": command,
                           "finished_at": None, "machine": machine_info(), "load_average": os.getloadavg(),
                           "steps": steps,
                           "tasks": previous.get("tasks", {})}
    for name, task in tasks.items():
        entry = out["tasks"].setdefault(name, {})
        entry["settings"] = task.settings()
        if what in ("costs", "all"):
            print(f"[calibrate] {name}: cost race of {len(methods) + 1} engines x {steps} steps", flush=True)
            measured = run_ranks(_cost_worker, world, {"task": task.settings(), "methods": methods, "steps": steps},
                                 timeout=3600)[0]
            model = cost_model(task, measured)
            projection = project(task, model, list(methods), len(seeds))
            entry.update(costs=model, projection_seconds=projection, costs_command=command,
                         load_average=os.getloadavg())
            steps_line = ", ".join(f"{m} {c['median_step_seconds'] * 1e3:.1f} ms" for m, c in model["methods"].items())
            print(f"[calibrate] {name}: median step {steps_line}; refresh "
                  f"+{model['refresh_extra_seconds'] or 0:.2f} s; eval {model['eval_seconds_per_engine'] * 1e3:.1f} "
                  f"ms/engine; overhead {model['overhead_seconds_per_engine_step'] * 1e3:.2f} ms/engine-step; "
                  f"projected {projection['total'] / 60:.1f} min", flush=True)
        if what in ("budgets", "all"):
            print(f"[calibrate] {name}: budget curves of AdamW over {task.steps} steps at {task.lrs}", flush=True)
            budget = budget_curves(task, world)
            entry.update(budget=budget, budget_command=command)
            flat = budget["relative_improvement_last_20pct"]
            print(f"[calibrate] {name}: AdamW best lr {budget['best_lr']:.3g} improved {100 * flat['fitted']:.2f}% "
                  f"(line fit; endpoints {100 * flat['endpoints']:.2f}%, noise ±{100 * flat['noise']:.2f}%) "
                  f"over the last 20% "
                  f"of {task.steps} steps",
                  flush=True)
    out["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    CALIBRATION_PATH.parent.mkdir(parents=True, exist_ok=True)
    CALIBRATION_PATH.write_text(json.dumps(out, indent=1, default=float) + "\n")
    total = projected_seconds(tasks, list(methods), len(seeds))
    if total:
        print(f"[calibrate] projected suite runtime for these settings: {total['total'] / 60:.0f} min at the "
              f"calibration's load, {total['total_idle_machine'] / 60:.0f} min on an idle machine", flush=True)
    return out
