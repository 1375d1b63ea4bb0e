"""Lockstep race: many DeepSpeed engines trained side by side in one set of rank processes.

Every engine of a race (one per method and learning rate, all built from the same seeded initial
weights) lives in the same rank processes. At each step every engine takes one training step
(forward, backward, ``engine.step()``) on the same batch, in an order shuffled afresh each step (the
same order on every rank). Each engine's step is timed on its own with ``time.perf_counter``, after a
barrier, so both ranks start it together and no engine's collectives or stragglers leak into another
engine's time. The cumulative time of an engine is therefore measured under the same machine conditions
as every other engine's: background load on a shared machine slows all engines alike, and ratios of
times taken within one race are robust where absolute times are not.

Per-engine state that could couple engines is kept apart: each engine has its own torch RNG state
(dropout masks), restored before and saved after its step, so an engine's trajectory does not depend on
which other engines share its race (the suite checks this with an anchor engine run in two races). Python's
garbage collector is paused during the race (objects that exist when it starts are frozen out of later
collections) and run at evaluation points.

Evaluations (validation loss and accuracy, untimed, in eval mode) happen at the steps of a common grid,
so every engine is evaluated at the same steps: the regular grid plus, for every engine that couples
ADMM windows, the step that ends each window (right after its extrapolation) and the step before it.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import random
import resource
import time
from typing import Any, Iterable

import torch

from benchmarks.tasks import Task, TaskData, epoch_order

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineSpec:
    """One engine of a race."""

    key: str  # unique within the race
    method: str
    lr: float
    optimizer: dict[str, Any]  # the DeepSpeed "optimizer" block
    role: str = "sweep"  # "sweep" | "anchor" (timing/reproduction anchor) | "reference" (equality check)


def ds_config(micro_batch: int, optimizer: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed ZeRO-2, fp32, no clipping, no scheduler: the optimizer is the only difference."""
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "optimizer": optimizer, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def admm_window(optimizer: Any) -> int | None:
    """The ADMM window of an engine's optimizer, read from its own config (None: no ADMM coupling)."""
    config = getattr(optimizer, "config", None)
    admm = getattr(config, "admm", None)
    if admm is None or not getattr(admm, "enabled", False):
        return None
    window = getattr(config, "admm_window", None)
    if window is None:
        window = getattr(admm, "window", None) or getattr(config, "refresh_interval", None)
    return int(window) if window else None


def optimizer_description(optimizer: Any) -> dict[str, Any]:
    """What DeepSpeed actually built: class, and its resolved config (DHO2) or defaults (torch)."""
    cls = type(optimizer)
    out: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    config = getattr(optimizer, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        out["config"] = config.to_dict()
    else:
        defaults = getattr(optimizer, "defaults", {})
        out["defaults"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()
                           if isinstance(v, (bool, int, float, str, tuple, type(None)))}
    return out


def eval_grid(steps: int, every: int, windows: Iterable[int | None]) -> list[int]:
    """The common evaluation steps: 0, every ``every`` steps, the budget, and each window end and the
    step before it."""
    grid = set(range(0, steps + 1, every)) | {0, steps}
    for window in set(w for w in windows if w):
        for end in range(window, steps + 1, window):
            grid |= {end, end - 1}
    return sorted(s for s in grid if 0 <= s <= steps)


def _loss(output: Any) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.loss


def _refresh_count(optimizer: Any) -> int:
    stats = getattr(optimizer, "stats", None)
    return int(stats.get("refresh_count", 0)) if isinstance(stats, dict) else 0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Entry:
    def __init__(self, spec: EngineSpec, engine: Any, rng_state: torch.Tensor) -> None:
        self.spec, self.engine, self.rng = spec, engine, rng_state
        self.optimizer = engine.basic_optimizer
        self.window = admm_window(self.optimizer)
        self.refreshes: list[dict[str, Any]] = []
        self.window_ends: list[dict[str, Any]] = []
        self.error: str | None = None
        self.refresh_seen = _refresh_count(self.optimizer)


def _evaluate_all(entries: list[_Entry], data: TaskData) -> list[tuple[float, float, float]]:
    """Validation sums of every engine over every rank's share (one all-reduce)."""
    import torch.distributed as dist

    sums = torch.zeros(len(entries), 4, dtype=torch.float64)
    with torch.no_grad():
        for i, entry in enumerate(entries):
            if entry.error is not None:
                sums[i, 3] = 1.0
                continue
            module = entry.engine.module
            was_training = module.training
            module.eval()
            for args, kwargs in data.val_batches:
                loss, correct, count = data.evaluate(module, args, kwargs)
                sums[i, :3] += torch.tensor([loss, correct, count], dtype=torch.float64)
            module.train(was_training)
    dist.all_reduce(sums)
    out = []
    for i, entry in enumerate(entries):
        loss_sum, correct, count, failed = sums[i].tolist()
        if failed and entry.error is None:
            entry.error = "failed on another rank"
        out.append((loss_sum / count if count else math.nan, correct / count if count else math.nan, count))
    return out


def run_race(task: Task, data: TaskData, seed: int, specs: list[EngineSpec], rank: int, world: int,
             base_grid: Iterable[int] = (), compare: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    """Train every engine of ``specs`` for ``task.steps`` steps in lockstep; return per-engine records.

    Each record holds the per-step training time (wall clock, and the rank's CPU time; max over ranks),
    the per-step training loss (mean over ranks), the evaluations, the refreshes and ADMM window ends the
    optimizer reported, and what DeepSpeed built. ``base_grid`` adds evaluation steps (so that races of
    one task share their grid). For each pair of keys in ``compare`` the largest absolute difference of
    the two engines' final module parameters is reported (``info["param_diffs"]``).
    """
    import deepspeed
    import torch.distributed as dist

    started = time.perf_counter()
    entries: list[_Entry] = []
    for spec in specs:
        model = data.build_model(seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable,
                                          config=ds_config(task.micro_batch, spec.optimizer))
        # the same dropout stream for every engine of this seed (and per rank), kept per engine
        generator_state = torch.Generator().manual_seed(seed * 1000 + rank).get_state()
        entries.append(_Entry(spec, engine, generator_state))
    build_seconds = time.perf_counter() - started
    windows = [e.window for e in entries]
    grid = sorted(set(eval_grid(task.steps, task.eval_every, windows)) | set(base_grid))
    grid_set = set(grid)
    order = epoch_order(data.train_rows, task.steps, task.micro_batch * world, seed)
    shuffler = random.Random(seed * 7919 + 12345)  # identical on every rank
    n, steps = len(entries), task.steps
    times = torch.zeros(n, steps, dtype=torch.float64)
    cpu_times = torch.zeros(n, steps, dtype=torch.float64)
    losses = torch.full((n, steps), math.nan, dtype=torch.float64)
    evals: list[list[dict[str, Any]]] = [[] for _ in entries]

    eval_seconds = 0.0

    def record(step: int) -> None:
        nonlocal eval_seconds
        tick = time.perf_counter()
        for i, (loss, acc, _count) in enumerate(_evaluate_all(entries, data)):
            entry = entries[i]
            point = {"step": step, "val_loss": loss, "val_acc": acc if task.classifier else None}
            if entry.window:
                point["window_end"] = step > 0 and step % entry.window == 0
                point["before_window_end"] = (step + 1) % entry.window == 0
            evals[i].append(point)
        eval_seconds += time.perf_counter() - tick

    saved_rng = torch.get_rng_state()
    record(0)
    gc.collect()
    gc.freeze()  # everything built so far is long-lived: later collections skip it (a full one takes ~0.5 s)
    gc.disable()
    race_started = time.perf_counter()
    barrier_seconds = gc_seconds = 0.0
    try:
        for step in range(steps):
            args, kwargs = data.train_batch(order[step])
            turn = list(range(n))
            shuffler.shuffle(turn)
            for i in turn:
                entry = entries[i]
                if entry.error is not None:
                    continue
                torch.set_rng_state(entry.rng)
                tick = time.perf_counter()
                dist.barrier()
                barrier_seconds += time.perf_counter() - tick
                cpu_tick = time.process_time()
                tick = time.perf_counter()
                try:
                    loss = _loss(entry.engine(*args, **kwargs))
                    entry.engine.backward(loss)
                    entry.engine.step()
                except Exception as error:  # noqa: BLE001 - record the failure, keep the other engines
                    logger.exception("engine %s failed at step %d", entry.spec.key, step + 1)
                    entry.error = f"step {step + 1}: {type(error).__name__}: {error}"
                    continue
                times[i, step] = time.perf_counter() - tick
                cpu_times[i, step] = time.process_time() - cpu_tick
                losses[i, step] = float(loss.detach())
                entry.rng = torch.get_rng_state()
                _track(entry, step + 1)
            if (step + 1) % max(1, steps // 10) == 0:
                logger.info("  seed %d: step %d/%d, %.0f s", seed, step + 1, steps, time.perf_counter() - race_started)
            if step + 1 in grid_set:
                record(step + 1)
                tick = time.perf_counter()
                gc.collect()
                gc_seconds += time.perf_counter() - tick
    finally:
        gc.unfreeze()
        gc.enable()
        torch.set_rng_state(saved_rng)
    race_seconds = time.perf_counter() - race_started
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpu_times, op=dist.ReduceOp.MAX)
    dist.all_reduce(losses)
    losses /= world
    out: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        out[entry.spec.key] = {
            "method": entry.spec.method, "lr": entry.spec.lr, "role": entry.spec.role, "seed": seed,
            "optimizer_block": entry.spec.optimizer, "built": optimizer_description(entry.optimizer),
            "admm_window": entry.window, "step_seconds": times[i].tolist(),
            "step_cpu_seconds": cpu_times[i].tolist(), "train_loss": losses[i].tolist(),
            "evals": evals[i], "refreshes": entry.refreshes, "window_ends": entry.window_ends,
            "error": entry.error,
        }
    info = {"seed": seed, "engines": n, "steps": steps, "eval_steps": grid, "build_seconds": build_seconds,
            "race_seconds": race_seconds, "eval_seconds": eval_seconds, "barrier_seconds": barrier_seconds,
            "gc_seconds": gc_seconds, "peak_rss_mib": peak_rss_mib()}
    by_key = {e.spec.key: e for e in entries}
    info["param_diffs"] = {}
    for a, b in compare:
        pa = torch.cat([p.detach().reshape(-1) for p in by_key[a].engine.module.parameters()])
        pb = torch.cat([p.detach().reshape(-1) for p in by_key[b].engine.module.parameters()])
        info["param_diffs"][f"{a} vs {b}"] = {"max_abs_param_diff": float((pa - pb).abs().max()),
                                              "param_norm": float(pb.norm())}
    del entries, by_key
    gc.collect()
    return {"engines": out, "info": info}


def _track(entry: _Entry, step: int) -> None:
    """Note a finished curvature refresh and an ADMM window end, from what the optimizer reports."""
    stats = getattr(entry.optimizer, "stats", None)
    if not isinstance(stats, dict):
        return
    count = _refresh_count(entry.optimizer)
    if count > entry.refresh_seen:
        entry.refresh_seen = count
        entry.refreshes.append({"step": step, "seconds": stats.get("refresh_seconds"),
                                "iterations": stats.get("lanczos_iterations"),
                                "stop": stats.get("lanczos_stop"),
                                "eigenvalues": stats.get("eigenvalues")})
    if entry.window and step % entry.window == 0:
        entry.window_ends.append({"step": step, "extrapolation_norm": _plain(stats.get("admm_extrapolation_norm")),
                                  "safeguard_scale": _plain(stats.get("admm_safeguard_scale"))})


def _plain(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    return value
