"""Regimes: where hybrid order pays, against every optimizer a user would pick.

For each task of ``benchmarks/regime_tasks.py`` and each of its batch sizes (small batches are
noise-limited, full batch is not; docs/design.md, "Where hybrid order pays"), every method is tuned and
raced to one target loss, and the probe (:func:`ds_dho2.probe.probe_training`) is asked, at the same
(task, batch), which regime the run is in. Everything runs in one process on the CPU, seeded and offline.

Protocol per (task, batch):

* **Methods** (:func:`method_registry`): AdamW (torch, weight decay 0), SGD with momentum 0.9, DHO2 at the
  library defaults, DHO2 heavy-ball with ``rank="auto"``, DHO2 AdamW with ``rank="auto"``, and from
  ``pytorch_optimizer`` SOAP, Shampoo (scalable form), Kron (PSGD), SophiaH, AdaHessian (both given
  ``loss.backward(create_graph=True)`` on the steps where they estimate the Hessian) and schedule-free
  AdamW (switched with ``.eval()`` / ``.train()`` around every evaluation). Weight decay is 0 for all.
  Extra DHO2 variants (name -> DHO2 keyword arguments) can be added by the caller (``--dho2-variants``).
* **lr grid**, per method: 5 points of ratio 1.5 around the method's centre (``RegimeTask.lr_center``),
  one seed (0); while the lowest final training loss sits on an edge the grid grows by one point on that
  side (at most ``--max-extensions`` = 4; the JSON says when it is still unbracketed). Then every seed at
  the best lr and its two neighbours; the lowest mean final loss over seeds is the method's *tuned lr*
  (if that lands on an edge of the three, the next lr on that side is added, again at most 4 times).
  With ``--no-neighbours`` (the recorded full run, to fit the CPU budget) only the seed-0 best lr gets
  every seed and is the tuned lr.
* **Target**: the lower of tuned AdamW's and tuned SGD-momentum's mean (over seeds) final training loss.
  The training loss is the mean loss over the *whole training set*, evaluated (eval mode, no gradient)
  at a fixed grid of steps (``RegimeTask.eval_steps``: step 0 and ``eval_points`` evenly spaced steps).
* **Race**, every method at its tuned lr, per seed: the first evaluated step whose training loss is at or
  below the target (None if never), the seconds to it (cumulative measured step time, evaluations
  excluded) and the final loss; mean and spread over seeds. A seed that never reaches the target counts
  with the whole budget in the step mean (so the ratio is then an upper bound; ``censored`` in the JSON).
* **Cost**: a separate lockstep run, every method at its tuned lr, seed 0, the same batches as the race's
  seed 0, the whole budget, the methods stepping in alternation (shuffled order each round). A method's
  cost of a step is its mean lockstep step time over the steps it needed to reach the target (refreshes,
  back-off and wake refreshes included: what a user's run pays). ``cost ratio = target method's cost /
  the method's``, ``step ratio = target method's mean steps to target / the method's``, ``time ratio =
  step ratio x cost ratio`` = the target method's lockstep seconds to the target over the method's (every
  ratio > 1 favours the method). When the time ratio is below 1 the factor that lost is named (``steps``,
  ``cost``, or ``steps and cost``). The median step time of 50 steps shortly after the first DHO2 refresh
  (a step that projects on a fresh basis, ``steady_cost_ratio``) and the race's own measured seconds are
  reported next to it. ``--recost RESULT.json`` re-measures only this, at the recorded tuned lrs.
* **Probe cross-check**: after ``budget / 2`` steps of tuned AdamW and of tuned SGD-momentum (seed 0) the
  probe reports a regime; it *agrees* with the race when a curvature-limited verdict comes with some DHO2
  variant beating the target in wall-clock time by at least 1.2x, and a noise-limited (or lr-limited)
  verdict with none doing so. Disagreements are flagged.

Outputs: ``benchmarks/results/<output-name>.json`` (every run's loss curve, the protocol's decisions,
versions and constructor kwargs of every method), ``.png`` (per task: wall-clock speed-up to the target
and step ratio against batch size) and ``.md`` (one table per task and batch).

    python -m benchmarks regimes [--quick] [--tasks autoencoder,mnist1d,digits,sst2,charlm] [--batches ...]
                                 [--methods adamw,sgd,dho2,...] [--seeds 3] [--dho2-variants JSON|PATH]
                                 [--max-extensions 4] [--no-neighbours] [--threads 1] [--output-name regimes]
    python -m benchmarks regimes --merge results/regimes_a.json results/regimes_b.json [--output-name regimes]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import importlib.metadata
import itertools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, pyplot, write_results
from benchmarks.regime_tasks import RegimeData, RegimeTask, count_parameters, epoch_order, make_regime_tasks
from benchmarks.tasks import LR_RATIO, round_lr

GRID_POINTS = 5
MAX_EXTENSIONS = 4
WIN_FACTOR = 1.2  # a DHO2 variant "pays" when it reaches the target this much faster in wall-clock time
FLATTENING_WINDOW = 0.2
DIVERGED_FACTOR = 1e3  # a training loss this many times the initial one ends a run as diverged
LOCKSTEP_WARMUP, LOCKSTEP_TIMED = 5, 50
LOCKSTEP_PROTOCOL = {"steps": "the whole budget, seed 0, methods in alternation",
                     "cost": "mean lockstep step time over the steps to the target",
                     "steady": f"median of {LOCKSTEP_TIMED} steps from {LOCKSTEP_WARMUP} after the first refresh"}
PROBE_MAX_RANK = 16  # above the class counts (10, 2)
QUICK_METHODS = ("adamw", "sgd", "dho2")
TARGET_METHODS = ("adamw", "sgd")


# ------------------------------------------------------------------------------------------ methods
def _needs_graph_every_step(optimizer: torch.optim.Optimizer) -> bool:
    """AdaHessian (update period 1) estimates the Hessian diagonal at every step."""
    return True


def _needs_graph_on_update(optimizer: torch.optim.Optimizer) -> bool:
    """SophiaH estimates the Hessian diagonal when ``step % update_period == 0`` (its own rule), and only then
    needs a differentiable gradient; the other steps are plain first-order steps."""
    period = int(getattr(optimizer, "update_period", 1))
    return int(optimizer.param_groups[0].get("step", 0)) % period == 0


@dataclasses.dataclass(frozen=True)
class Method:
    """One optimizer a user could pick: ``build(params, lr)`` gives a ``torch.optim.Optimizer``.

    ``kwargs`` are the exact constructor keyword arguments besides ``params`` and ``lr`` (recorded in the
    JSON); DHO2 variants also get the run's ``seed`` (its Lanczos start vectors) and are attached to the
    model by the runner. ``needs_graph(optimizer)`` says whether the next backward must build a
    differentiable gradient (``create_graph=True``); ``anchor`` is the task lr anchor its grid centre
    follows when the task names none for it.
    """

    name: str
    label: str
    source: str  # "torch", "ds_dho2" or "pytorch_optimizer"
    cls: Callable[..., torch.optim.Optimizer]
    kwargs: dict[str, Any]
    anchor: str = "adamw"
    needs_graph: Callable[[torch.optim.Optimizer], bool] | None = None
    schedule_free: bool = False

    @property
    def is_dho2(self) -> bool:
        return self.source == "ds_dho2"

    def build(self, params: Iterable[torch.Tensor], lr: float, seed: int = 0) -> torch.optim.Optimizer:
        extra = {"seed": seed} if self.is_dho2 else {}
        return self.cls(list(params), lr=lr, **self.kwargs, **extra)

    def describe(self) -> dict[str, Any]:
        """Class, source, version and constructor kwargs, as plain values."""
        out = {"label": self.label, "source": self.source, "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
               "kwargs": _plain(self.kwargs), "lr_anchor": self.anchor, "version": package_version(self.source),
               "create_graph": None if self.needs_graph is None else self.needs_graph.__doc__.split("\n")[0].strip(),
               "schedule_free": self.schedule_free}
        if self.is_dho2:
            out["kwargs_added_per_run"] = {"seed": "the run seed"}
        return out


def package_version(source: str) -> str | None:
    """The installed version of the package a method comes from (``pytorch_optimizer`` has no
    ``__version__`` attribute in 4.1.0, so the distribution metadata is read when it is missing)."""
    if source == "torch":
        return torch.__version__
    if source == "ds_dho2":
        import ds_dho2

        return ds_dho2.__version__
    try:
        module = __import__(source)
        version = getattr(module, "__version__", None)
        return version or importlib.metadata.version(source.replace("_", "-"))
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return None


def dho2_method(name: str, kwargs: dict[str, Any], label: str | None = None) -> Method:
    """A DHO2 variant: ``DHO2(params, lr=lr, **kwargs)``. An ``lr_center`` key, if given, is not passed to
    DHO2; the grid then centres there (see :func:`variant_centers`). The heavy-ball base follows the SGD
    anchor, the AdamW base AdamW's."""
    from ds_dho2 import DHO2

    kwargs = {k: v for k, v in kwargs.items() if k != "lr_center"}
    anchor = "sgd" if str(kwargs.get("base", "adamw")).lower() == "heavyball" else "adamw"
    return Method(name, label or name, "ds_dho2", DHO2, kwargs, anchor=anchor)


def method_registry(variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Method]:
    """Every method of the benchmark, plus the caller's DHO2 ``variants`` (name -> DHO2 kwargs)."""
    methods = {
        "adamw": Method("adamw", "AdamW", "torch", torch.optim.AdamW, {"weight_decay": 0.0}),
        "sgd": Method("sgd", "SGD-momentum", "torch", torch.optim.SGD, {"momentum": 0.9}, anchor="sgd"),
        "dho2": dho2_method("dho2", {}, "DHO2 (defaults)"),
        # the first refresh after 10 steps, not 50: a heavy-ball lr above SGD's stability limit (the point of
        # the Newton part) diverges before a later first basis can take the sharp directions off its hands
        "dho2_hb_auto": dho2_method("dho2_hb_auto", {"base": "heavyball", "rank": "auto", "warmup_steps": 10},
                                    "DHO2 heavy-ball, rank auto"),
        "dho2_adamw_auto": dho2_method("dho2_adamw_auto", {"rank": "auto"}, "DHO2 AdamW, rank auto"),
    }
    try:
        import pytorch_optimizer as po
    except ImportError:  # the optional extra is missing: the torch and DHO2 methods still run
        po = None
    if po is not None:
        methods.update({
            "soap": Method("soap", "SOAP", "pytorch_optimizer", po.SOAP, {"weight_decay": 0.0}),
            # the scalable form (grafted on SGD-Nesterov for its first 25 steps and for the step size, as
            # Shampoo is run in practice); inverse roots every 10 steps, as SOAP's precondition_frequency
            # (its default of 1,000 suits long runs). The package's plain Shampoo makes no move until its
            # first roots and then diverges from a near-empty statistic at every lr tried.
            "shampoo": Method("shampoo", "Shampoo (scalable, SGD graft)", "pytorch_optimizer", po.ScalableShampoo,
                              {"weight_decay": 0.0, "preconditioning_compute_steps": 10}, anchor="sgd"),
            "kron": Method("kron", "Kron (PSGD)", "pytorch_optimizer", po.Kron, {"weight_decay": 0.0}),
            "sophiah": Method("sophiah", "SophiaH", "pytorch_optimizer", po.SophiaH, {"weight_decay": 0.0},
                              needs_graph=_needs_graph_on_update),
            "adahessian": Method("adahessian", "AdaHessian", "pytorch_optimizer", po.AdaHessian,
                                 {"weight_decay": 0.0}, needs_graph=_needs_graph_every_step),
            "sf_adamw": Method("sf_adamw", "schedule-free AdamW", "pytorch_optimizer", po.ScheduleFreeAdamW,
                               {"weight_decay": 0.0}, schedule_free=True),
        })
    for name, kwargs in (variants or {}).items():
        if name in methods:
            raise ValueError(f"DHO2 variant {name!r} clashes with a built-in method; choose another name")
        methods[name] = dho2_method(name, dict(kwargs))
    return methods


def variant_centers(variants: dict[str, dict[str, Any]] | None) -> dict[str, float]:
    """The ``lr_center`` a caller gave a DHO2 variant, by name."""
    return {name: float(kw["lr_center"]) for name, kw in (variants or {}).items() if "lr_center" in kw}


def parse_variants(text: str | None) -> dict[str, dict[str, Any]]:
    """``--dho2-variants``: a JSON object (name -> kwargs) or the path of a file holding one."""
    if not text:
        return {}
    path = Path(text)
    raw = path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError("--dho2-variants must be a JSON object mapping a name to DHO2 keyword arguments")
    return value


# ------------------------------------------------------------------------------------------ one run
def whole_set_loss(model: torch.nn.Module, data: RegimeData, tensors: tuple[torch.Tensor, ...] | None = None) -> float:
    """The mean loss over every row of ``tensors`` (default: the training set), in chunks, eval mode, no
    gradient; chunks are weighted by their rows (every task's loss is a mean over equal-sized rows)."""
    tensors = data.train if tensors is None else tensors
    rows = int(tensors[0].shape[0])
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, rows, data.eval_chunk):
            stop = min(rows, start + data.eval_chunk)
            total += float(model(*(t[start:stop] for t in tensors))) * (stop - start)
    model.train(was_training)
    return total / rows


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer, method: Method):
    """Schedule-free AdamW evaluates its averaged weights: ``.eval()`` before, ``.train()`` after."""
    if method.schedule_free:
        optimizer.eval()
    try:
        yield
    finally:
        if method.schedule_free:
            optimizer.train()


def prepare(method: Method, model: torch.nn.Module, lr: float, seed: int) -> torch.optim.Optimizer:
    """The method's optimizer over the model's trainable parameters; DHO2 is attached to the model (its
    forward returns the loss, which DHO2 replays for its curvature products)."""
    torch.manual_seed(10_000 + seed)  # Hutchinson probes, PSGD's update draws
    np.random.seed(10_000 + seed)
    random.seed(10_000 + seed)
    optimizer = method.build([p for p in model.parameters() if p.requires_grad], lr, seed)
    if method.is_dho2:
        optimizer.attach(model)
    if method.schedule_free:
        optimizer.train()
    return optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method,
               inputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """One optimizer step on ``inputs``; returns ``(batch loss, seconds)``. The Hessian methods get a
    differentiable gradient (math attention, which supports double backward) when they need it; the
    graph is released right after their step."""
    started = time.perf_counter()
    graph = method.needs_graph is not None and method.needs_graph(optimizer)
    optimizer.zero_grad(set_to_none=True)
    context = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if graph
               else contextlib.nullcontext())
    with context:
        loss = model(*inputs)
        loss.backward(create_graph=graph)
    optimizer.step()
    if graph:
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return float(loss.detach()), seconds


def _curvature_summary(optimizer: Any) -> dict[str, Any]:
    """What DHO2's curvature did in a run: refreshes, installed basis and its size."""
    tracker = getattr(optimizer, "tracker", None)
    if tracker is None:
        return {}
    try:
        basis, state = tracker.basis, tracker.state
        return {"refreshes": int(getattr(state, "refresh_count", 0)),
                "basis_version": None if basis is None else int(basis.version),
                "rank_at_end": None if basis is None else basis.rank,
                "hvp_strategy": getattr(state, "hvp_strategy", None),
                "divergence_guard_events": int(tracker.stats.get("divergence_guard_events", 0)),
                "rollbacks": int(tracker.stats.get("rollbacks", 0)),
                "dormant_at_end": bool(getattr(state, "dormant", False))}
    except Exception as error:  # noqa: BLE001 - a diagnostic only
        return {"error": f"{type(error).__name__}: {error}"}


def train_run(task: RegimeTask, data: RegimeData, batch: int, method: Method, lr: float, seed: int,
              steps: int | None = None, eval_steps: list[int] | None = None) -> dict[str, Any]:
    """Train one (method, lr, seed) for the batch's budget; the whole-training-set loss at every evaluation
    step, the cumulative step seconds there, and the end state. A non-finite loss, or one above
    ``DIVERGED_FACTOR`` times the initial loss, or an exception, ends the run as diverged."""
    steps = task.budgets[batch] if steps is None else steps
    eval_steps = task.eval_steps(batch) if eval_steps is None else eval_steps
    model = task.build_model(seed)
    order = epoch_order(data.rows, steps, batch, seed)
    record: dict[str, Any] = {"method": method.name, "lr": lr, "seed": seed, "batch": batch, "steps": steps,
                              "curve": [], "diverged": False, "error": None}
    seconds, batch_losses = 0.0, []
    try:
        optimizer = prepare(method, model, lr, seed)
        initial = whole_set_loss(model, data)
        record["curve"].append([0, initial, 0.0])
        for step in range(1, steps + 1):
            loss, elapsed = train_step(model, optimizer, method, data.batch(order[step - 1]))
            seconds += elapsed
            batch_losses.append(loss)
            if not math.isfinite(loss):
                record["diverged"] = True
                break
            if step in eval_steps:
                with evaluation_weights(optimizer, method):
                    value = whole_set_loss(model, data)
                record["curve"].append([step, value, seconds])
                if not math.isfinite(value) or value > DIVERGED_FACTOR * max(initial, 1e-12):
                    record["diverged"] = True
                    break
        if data.test is not None and not record["diverged"]:
            with evaluation_weights(optimizer, method):
                record["final_test_loss"] = whole_set_loss(model, data, data.test)
        record["curvature"] = _curvature_summary(optimizer)
    except Exception as error:  # noqa: BLE001 - an optimizer that fails on this model loses the lr, not the run
        record["diverged"] = True
        record["error"] = f"{type(error).__name__}: {error}"[:500]
        print(f"[regimes] {task.name} B={batch} {method.name} lr {lr:g} seed {seed}: {record['error']}", flush=True)
    record["seconds"] = seconds
    record["steps_done"] = len(batch_losses)
    record["final_loss"] = (math.inf if record["diverged"] or not record["curve"] else record["curve"][-1][1])
    return record


# ------------------------------------------------------------------------------------------ lr tuning
def _mean(values: list[float]) -> float:
    return math.inf if not values or any(not math.isfinite(v) for v in values) else statistics.fmean(values)


def _argmin(losses: dict[float, float]) -> float:
    """The lr of the lowest loss (ties: the smaller lr); with every loss infinite, the smallest lr."""
    return min(sorted(losses), key=lambda lr: (losses[lr], lr))


def _step_out(grid: list[float], lr: float, ratio: float) -> float:
    """The next lr beyond ``lr`` on the side where it is the edge of ``grid``."""
    return round_lr(lr / ratio if lr == grid[0] else lr * ratio)


def tune_lr(center: float, final_loss: Callable[[float, int], float], seeds: list[int], points: int = GRID_POINTS,
            ratio: float = LR_RATIO, max_extensions: int = MAX_EXTENSIONS, neighbours: bool = True) -> dict[str, Any]:
    """The lr protocol, on any ``final_loss(lr, seed)``.

    1. ``points`` lrs of ratio ``ratio`` around ``center``, seed ``seeds[0]``; while the best sits on an
       edge, one more lr beyond it (at most ``max_extensions``).
    2. Every seed at the best lr and its grid neighbours; the lowest mean over seeds is the tuned lr. If it
       is an edge of those, the next lr on that side joins (every seed; at most ``max_extensions`` more).
       Without ``neighbours`` only the best lr gets every seed (it is the tuned lr; a third of the runs).

    Every edge rule treats all-diverged as "go lower". Returns the grid, the seed-0 losses, the means,
    the tuned lr and whether each stage ended bracketed.
    """
    from benchmarks.tasks import lr_grid

    grid = lr_grid(center, points, ratio)
    first: dict[float, float] = {lr: final_loss(lr, seeds[0]) for lr in grid}
    extensions: list[float] = []
    while True:
        best = _argmin(first)
        grid = sorted(first)
        on_edge = best in (grid[0], grid[-1]) or not math.isfinite(first[best])
        if not on_edge or len(extensions) >= max_extensions:
            break
        new = round_lr(grid[0] / ratio) if not math.isfinite(first[best]) else _step_out(grid, best, ratio)
        extensions.append(new)
        first[new] = final_loss(new, seeds[0])
    bracketed = not on_edge
    grid = sorted(first)
    i = grid.index(best)
    candidates = grid[max(0, i - 1):i + 2] if neighbours else [best]
    means = {lr: _mean([final_loss(lr, s) for s in seeds]) for lr in candidates}
    seed_extensions: list[float] = []
    while neighbours:
        cands, tuned = sorted(means), _argmin(means)
        interior = math.isfinite(means[tuned]) and cands[0] < tuned < cands[-1]
        if interior or len(seed_extensions) >= max_extensions:
            break
        pool = sorted(first)
        if not math.isfinite(means[tuned]) or tuned == cands[0]:  # go lower
            below = [lr for lr in pool if lr < cands[0]]
            new = below[-1] if below else round_lr(cands[0] / ratio)
        else:
            above = [lr for lr in pool if lr > cands[-1]]
            new = above[0] if above else round_lr(cands[-1] * ratio)
        seed_extensions.append(new)
        if new not in first:
            first[new] = final_loss(new, seeds[0])
        means[new] = _mean([final_loss(new, s) for s in seeds])
    if not neighbours:
        tuned, interior = best, bracketed
    return {"center": center, "ratio": ratio, "initial_grid": lr_grid(center, points, ratio), "neighbours": neighbours,
            "grid": sorted(first), "seed0_final": {repr(lr): first[lr] for lr in sorted(first)},
            "extensions": extensions, "best_seed0": best, "bracketed": bracketed,
            "seeded_lrs": sorted(means), "mean_final": {repr(lr): means[lr] for lr in sorted(means)},
            "seed_extensions": seed_extensions, "tuned_lr": tuned, "tuned_bracketed": interior,
            "seeds": list(seeds),
            "note": None if bracketed and interior else
            ("unbracketed: the best lr is still on an edge after the allowed extensions"
             if not bracketed else "tuned lr on an edge of the seeded lrs after the allowed extensions")}


# ------------------------------------------------------------------------------------------ race arithmetic
def first_reach(curve: list[list[float]], target: float) -> tuple[int | None, float | None]:
    """The first evaluated ``(step, seconds)`` whose loss is at or below ``target``, or ``(None, None)``."""
    for step, loss, seconds in curve:
        if math.isfinite(loss) and loss <= target:
            return int(step), float(seconds)
    return None, None


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, min, max and half-range of finite values (None when there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "min": None, "max": None, "half_range": None, "n": 0}
    return {"mean": statistics.fmean(finite), "min": min(finite), "max": max(finite),
            "half_range": (max(finite) - min(finite)) / 2, "n": len(finite)}


def reach_summary(runs: list[dict[str, Any]], target: float, budget: int) -> dict[str, Any]:
    """Per seed: steps and seconds to the target and the final loss; over seeds: their means and spreads. A
    seed that never reaches the target counts with the budget (and its whole time) in the means, so they
    are lower bounds then (``censored``)."""
    per_seed, steps, seconds = [], [], []
    for run in runs:
        step, sec = first_reach(run["curve"], target) if not run["diverged"] else (None, None)
        per_seed.append({"seed": run["seed"], "steps_to_target": step, "seconds_to_target": sec,
                         "final_loss": run["final_loss"], "diverged": run["diverged"]})
        steps.append(budget if step is None else step)
        seconds.append(run["seconds"] if sec is None else sec)
    reached = sum(p["steps_to_target"] is not None for p in per_seed)
    return {"per_seed": per_seed, "reached": reached, "seeds": len(runs), "censored": reached < len(runs),
            "steps_mean": statistics.fmean(steps) if reached else None,
            "seconds_mean": statistics.fmean(seconds) if reached else None,
            "steps": spread([p["steps_to_target"] for p in per_seed]),
            "final_loss": spread([p["final_loss"] for p in per_seed]),
            "final_test_loss": spread([r.get("final_test_loss") for r in runs])}


def lost_factor(step_ratio: float | None, cost_ratio: float | None) -> str | None:
    """Which factor made the time ratio fall below 1: ``steps``, ``cost`` or ``steps and cost`` (None when the
    time ratio is at least 1 or undefined; ``steps`` when the target was never reached)."""
    if step_ratio is None:
        return "steps"
    if cost_ratio is None or step_ratio * cost_ratio >= 1.0:
        return None
    if step_ratio < 1.0 and cost_ratio < 1.0:
        return "steps and cost"
    return "steps" if step_ratio < 1.0 else "cost"


def ratios(method: dict[str, Any], reference: dict[str, Any], method_cost: float | None,
           reference_cost: float | None) -> dict[str, Any]:
    """``step ratio = reference steps / method steps``, ``cost ratio = reference step time / method step
    time``, ``time ratio`` their product (> 1: the method is faster), the factor that lost, and the ratio of
    the race's own measured seconds to the target."""
    step_ratio = (reference["steps_mean"] / method["steps_mean"]
                  if method["steps_mean"] and reference["steps_mean"] else None)
    cost_ratio = reference_cost / method_cost if method_cost and reference_cost else None
    time_ratio = step_ratio * cost_ratio if step_ratio is not None and cost_ratio is not None else None
    measured = (reference["seconds_mean"] / method["seconds_mean"]
                if method["seconds_mean"] and reference["seconds_mean"] else None)
    return {"step_ratio": step_ratio, "cost_ratio": cost_ratio, "time_ratio": time_ratio,
            "lost_on": lost_factor(step_ratio, cost_ratio) if time_ratio is None or time_ratio < 1 else None,
            "measured_seconds_ratio": measured,
            "bound": "upper" if method["censored"] and not reference["censored"] else
            ("lower" if reference["censored"] and not method["censored"] else
             ("uncertain" if method["censored"] else None))}


def flattening(curve: list[list[float]], steps: int, window: float = FLATTENING_WINDOW) -> dict[str, Any]:
    """The relative improvement of a training-loss curve over the last ``window`` of the budget (a Theil-Sen
    line through the evaluations there, and the two endpoints; ``benchmarks.convergence.flattening``), and
    the endpoints' drop as a share of the initial loss (``absolute_share``), which is the meaningful one
    when the loss falls towards zero."""
    from benchmarks.convergence import flattening as suite_flattening

    points = [{"step": s, "val_loss": loss} for s, loss, *_ in curve]
    if len(points) < 2:
        return {}
    out = suite_flattening(points, steps, window)
    start = min(points, key=lambda p: (abs(p["step"] - (1.0 - window) * steps), -p["step"]))["val_loss"]
    initial = points[0]["val_loss"]
    out["absolute_share"] = (start - points[-1]["val_loss"]) / initial if initial else None
    return out


def mean_curve(runs: list[dict[str, Any]]) -> list[list[float]]:
    """The seed-mean curve at the evaluation steps every run reached."""
    steps = sorted(set.intersection(*[{p[0] for p in r["curve"]} for r in runs])) if runs else []
    return [[s, statistics.fmean(next(p[1] for p in r["curve"] if p[0] == s) for r in runs), 0.0] for s in steps]


# ------------------------------------------------------------------------------------------ lockstep cost
def lockstep_costs(task: RegimeTask, data: RegimeData, batch: int, methods: list[Method], lrs: dict[str, float],
                   steps: int | None = None, steady_warmup: int = LOCKSTEP_WARMUP, steady_timed: int = LOCKSTEP_TIMED,
                   seed: int = 0) -> dict[str, Any]:
    """Every method at its tuned lr, seed 0, the whole budget (``steps``), all stepping in alternation on the
    same batches (a shuffled order each round), so a burst of load on a shared machine hits them alike.

    Per method: the cumulative step seconds after every step (``cumulative``; what a run of that method costs
    up to any step, its curvature refreshes, back-off and wake refreshes included) and, for reference, the
    median of ``steady_timed`` steps starting ``steady_warmup`` steps after the last DHO2 variant's first
    refresh (``steady_median_seconds``: the cost of a step that projects on a freshly installed basis)."""
    steps = task.budgets[batch] if steps is None else steps
    models = {m.name: task.build_model(seed) for m in methods}
    optimizers = {m.name: prepare(m, models[m.name], lrs[m.name], seed) for m in methods}
    first_refresh = max([int(optimizers[m.name].config.warmup_steps) for m in methods if m.is_dho2] or [0])
    steady = slice(min(first_refresh + steady_warmup, max(0, steps - steady_timed)), None)
    steady = slice(steady.start, steady.start + steady_timed)
    order = epoch_order(data.rows, steps, batch, seed)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    failed: dict[str, str] = {}
    shuffler = random.Random(seed)
    for step in range(steps):
        inputs = data.batch(order[step])
        for method in shuffler.sample(methods, len(methods)):
            if method.name in failed:
                continue
            try:
                _, seconds = train_step(models[method.name], optimizers[method.name], method, inputs)
            except Exception as error:  # noqa: BLE001
                failed[method.name] = f"{type(error).__name__}: {error}"[:300]
                continue
            times[method.name].append(seconds)
    out = {"steps": steps, "seed": seed, "steady_window": [steady.start, steady.stop], "methods": {}}
    for method in methods:
        t = times[method.name]
        out["methods"][method.name] = {
            "lr": lrs[method.name], "steps_done": len(t), "cumulative": list(itertools.accumulate(t)),
            "mean_seconds": statistics.fmean(t) if t else None,
            "steady_median_seconds": statistics.median(t[steady]) if t[steady] else None,
            "error": failed.get(method.name), "curvature": _curvature_summary(optimizers[method.name])}
    return out


def seconds_to(cost: dict[str, Any], steps: float | None) -> float | None:
    """A method's lockstep seconds for its first ``steps`` steps (linear between whole steps; None when the
    lockstep run did not get that far)."""
    cumulative = cost["cumulative"]
    if steps is None or not cumulative or steps > len(cumulative):
        return None
    whole = int(steps)
    before = cumulative[whole - 1] if whole >= 1 else 0.0
    if whole == steps or whole >= len(cumulative):
        return before
    return before + (steps - whole) * (cumulative[whole] - before)


def race_table(methods: list[Method], summaries: dict[str, dict[str, Any]], tuned: dict[str, float],
               target_method: str, cost: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: its reach summary and the ratios against the target method. The cost of a step is the
    method's mean lockstep step time over the steps it needed to the target (all of its budget when it never
    got there), so the time ratio is the target method's lockstep seconds to the target over the method's."""
    lock = cost["methods"]
    reference = summaries[target_method]
    reference_seconds = seconds_to(lock[target_method], reference["steps_mean"])
    race = {}
    for method in methods:
        summary = summaries[method.name]
        mine = seconds_to(lock[method.name], summary["steps_mean"])
        method_cost = mine / summary["steps_mean"] if mine else None
        reference_cost = reference_seconds / reference["steps_mean"] if reference_seconds else None
        entry = {"lr": tuned[method.name], **summary, **ratios(summary, reference, method_cost, reference_cost),
                 "lockstep_seconds_to_target": mine, "mean_step_seconds": lock[method.name]["mean_seconds"],
                 "steady_median_seconds": lock[method.name]["steady_median_seconds"]}
        steady, steady_ref = lock[method.name]["steady_median_seconds"], lock[target_method]["steady_median_seconds"]
        entry["steady_cost_ratio"] = steady_ref / steady if steady and steady_ref else None
        race[method.name] = entry
    return race


def compact_lockstep(cost: dict[str, Any], eval_steps: list[int]) -> dict[str, Any]:
    """The lockstep record as written to the JSON: the cumulative seconds at the evaluation steps only."""
    methods = {}
    for name, entry in cost["methods"].items():
        cumulative = entry["cumulative"]
        methods[name] = {**{k: v for k, v in entry.items() if k != "cumulative"},
                         "cumulative_at_eval": [[s, cumulative[s - 1]] for s in eval_steps if 1 <= s <= len(cumulative)]}
    return {**cost, "methods": methods}


def best_dho2_ratio(methods: list[Method], race: dict[str, dict[str, Any]]) -> float | None:
    """The best time ratio of any DHO2 variant (None when none reached the target)."""
    values = [race[m.name]["time_ratio"] for m in methods if m.is_dho2 and race[m.name]["time_ratio"] is not None]
    return max(values) if values else None


# ------------------------------------------------------------------------------------------ probe
def probe_after(task: RegimeTask, data: RegimeData, batch: int, method: Method, lr: float, steps: int,
                step_seconds: float | None, max_rank: int = PROBE_MAX_RANK, seed: int = 0) -> dict[str, Any]:
    """Train ``steps`` steps of ``method`` at ``lr`` and run :func:`ds_dho2.probe.probe_training` on the next
    batch; its gradient noise scale uses 8 disjoint chunks of a batch of ``max(batch, 512)`` rows (at most the
    training set), compared with ``batch``."""
    from ds_dho2.probe import probe_training

    started = time.perf_counter()
    model = task.build_model(seed)
    optimizer = prepare(method, model, lr, seed)
    order = epoch_order(data.rows, steps + 1, batch, seed)
    for step in range(steps):
        train_step(model, optimizer, method, data.batch(order[step]))
    current = data.batch(order[steps])
    noise_rows = min(data.rows, max(batch, 512))
    noise_order = epoch_order(data.rows, 1, noise_rows, seed + 7)[0]
    chunk = noise_rows // 8
    chunks = [data.batch(noise_order[i * chunk:(i + 1) * chunk]) for i in range(8)]
    try:
        report = probe_training(model, lambda: model(*current), optimizer,
                                batches=[lambda c=c: model(*c) for c in chunks], batch_size=batch, chunk_size=chunk,
                                dataset_size=data.rows,
                                max_rank=max_rank, metric_order=min(32, 2 * max_rank), step_seconds=step_seconds,
                                step=steps, seed=seed)
        out = report.as_dict()
    except Exception as error:  # noqa: BLE001 - the cross-check is reported, not fatal
        out = {"regime": "error", "verdict": f"{type(error).__name__}: {error}"[:500]}
    out.update(probed_method=method.name, probed_lr=lr, after_steps=steps, probe_seconds=time.perf_counter() - started)
    return out


def agreement(regime: str, best_dho2_time_ratio: float | None) -> dict[str, Any]:
    """Whether a probe verdict agrees with the race: curvature-limited <=> some DHO2 variant is at least
    ``WIN_FACTOR`` times faster than the target in wall-clock; noise-limited (and lr-limited, whose verdict
    is that a curvature step cannot help) <=> none is. Other regimes make no prediction."""
    wins = best_dho2_time_ratio is not None and best_dho2_time_ratio >= WIN_FACTOR
    predicts = {"curvature-limited": True, "noise-limited": False, "lr-limited": False}.get(regime)
    return {"regime": regime, "predicts_dho2_win": predicts, "dho2_won": wins,
            "agrees": None if predicts is None else predicts == wins}


# ------------------------------------------------------------------------------------------ one setting
def tune_method(task: RegimeTask, data: RegimeData, batch: int, method: Method, seeds: list[int],
                max_extensions: int, neighbours: bool, centers: dict[str, float] | None = None
                ) -> tuple[dict[str, Any], dict[tuple[float, int], dict[str, Any]]]:
    """One method's lr protocol at one (task, batch): its tuning record and every run it took."""
    runs: dict[tuple[float, int], dict[str, Any]] = {}

    def final_loss(lr: float, seed: int) -> float:
        if (lr, seed) not in runs:
            record = train_run(task, data, batch, method, lr, seed)
            runs[lr, seed] = record
            print(f"[regimes] {task.name} B={batch} {method.name} lr {lr:.4g} seed {seed}: final "
                  f"{record['final_loss']:.5g} ({record['seconds']:.1f} s)", flush=True)
        return runs[lr, seed]["final_loss"]

    center = (centers or {}).get(method.name) or task.lr_center(method.name, method.anchor)
    return tune_lr(center, final_loss, seeds, max_extensions=max_extensions, neighbours=neighbours), runs


def run_setting(task: RegimeTask, data: RegimeData, batch: int, methods: list[Method], seeds: list[int],
                max_extensions: int = MAX_EXTENSIONS, probe_rank: int = PROBE_MAX_RANK,
                centers: dict[str, float] | None = None, neighbours: bool = True) -> dict[str, Any]:
    """The whole protocol at one (task, batch): tuning, target, race, lockstep cost, probes, agreement."""
    started = time.perf_counter()
    budget = task.budgets[batch]
    runs: dict[str, dict[tuple[float, int], dict[str, Any]]] = {}
    tuning: dict[str, Any] = {}
    for method in methods:
        tuning[method.name], runs[method.name] = tune_method(task, data, batch, method, seeds, max_extensions,
                                                             neighbours, centers)
    tuned = {name: t["tuned_lr"] for name, t in tuning.items()}
    tuned_runs = {name: [runs[name][(tuned[name], s)] for s in seeds] for name in tuned}
    candidates = {name: _mean([r["final_loss"] for r in tuned_runs[name]]) for name in TARGET_METHODS if name in tuned}
    if not candidates:
        candidates = {m.name: _mean([r["final_loss"] for r in tuned_runs[m.name]]) for m in methods}
    target_method = min(candidates, key=lambda n: candidates[n])
    target = candidates[target_method]
    cost = lockstep_costs(task, data, batch, methods, tuned)
    summaries = {name: reach_summary(tuned_runs[name], target, budget) for name in tuned}
    race = race_table(methods, summaries, tuned, target_method, cost)
    best_dho2 = best_dho2_ratio(methods, race)
    medians = {name: c["steady_median_seconds"] for name, c in cost["methods"].items()}
    probes = {}
    for name in TARGET_METHODS:
        method = next((m for m in methods if m.name == name), None)
        if method is None:
            continue
        report = probe_after(task, data, batch, method, tuned[name], max(1, budget // 2), medians.get(name),
                             max_rank=probe_rank)
        probes[name] = {"report": report, "agreement": agreement(report.get("regime", "error"), best_dho2)}
        print(f"[regimes] {task.name} B={batch} probe after {name}: {report.get('regime')} "
              f"(agrees: {probes[name]['agreement']['agrees']})", flush=True)
    adamw_mean = mean_curve(tuned_runs["adamw"]) if "adamw" in tuned_runs else []
    return {"batch": batch, "budget": budget, "eval_steps": task.eval_steps(batch), "seeds": seeds,
            "target": {"value": target, "method": target_method, "lr": tuned[target_method],
                       "candidates": candidates,
                       "definition": "the lower of tuned AdamW's and tuned SGD-momentum's mean final training loss"},
            "adamw_flattening": {"window": FLATTENING_WINDOW, "mean_curve": flattening(adamw_mean, budget),
                                 "per_seed": {str(r["seed"]): flattening(r["curve"], budget)
                                              for r in tuned_runs.get("adamw", [])}},
            "tuning": tuning, "race": race, "lockstep": compact_lockstep(cost, task.eval_steps(batch)),
            "best_dho2_time_ratio": best_dho2,
            "dho2_wins": best_dho2 is not None and best_dho2 >= WIN_FACTOR, "probes": probes,
            "runs": {name: [r for _, r in sorted(rs.items())] for name, rs in runs.items()},
            "wall_seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------ report
def _f(value: Any, spec: str = ".3g", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def defaults_vs_adamw(race: dict[str, Any]) -> str:
    """DHO2 at its defaults against tuned AdamW, both to the setting's target: the ratio of AdamW's lockstep
    seconds to the target to DHO2's (> 1: DHO2 faster), split into steps x cost."""
    if "dho2" not in race or "adamw" not in race:
        return "-"
    dho2, adamw = race["dho2"], race["adamw"]
    if dho2["time_ratio"] is None:
        return "DHO2 never reached the target" + ("" if adamw["time_ratio"] is not None else " (nor AdamW)")
    if adamw["time_ratio"] is None:
        return "AdamW never reached the target"
    return (f"{dho2['time_ratio'] / adamw['time_ratio']:.2f}x (= {dho2['step_ratio'] / adamw['step_ratio']:.2f} x "
            f"{dho2['cost_ratio'] / adamw['cost_ratio']:.2f})")


def summary_table(payload: dict[str, Any]) -> list[str]:
    """The map in one table: per (task, batch) the target, the best DHO2 variant and the best other method by
    time ratio (with its split), and the probe's verdicts with their agreement."""
    def best(race: dict[str, Any], names: list[str]) -> str:
        timed = [n for n in names if race[n]["time_ratio"] is not None]
        if not timed:
            return "none reached the target"
        name = max(timed, key=lambda n: race[n]["time_ratio"])
        entry = race[name]
        lost = f", lost on {entry['lost_on']}" if entry["lost_on"] else ""
        return (f"{payload['methods'][name]['label']} {entry['time_ratio']:.2f}x "
                f"(= {_f(entry['step_ratio'], '.2f')} x {_f(entry['cost_ratio'], '.2f')}{lost})")

    lines = ["## The map", "",
             "| task | batch | target | best DHO2: time ratio (= steps x cost) | best other method | DHO2 defaults vs AdamW "
             "| probe after AdamW / SGD |",
             "|---|---|---|---|---|---|---|"]
    for task, entry in payload["tasks"].items():
        for batch, setting in entry["batches"].items():
            race = setting["race"]
            dho2 = [n for n in race if payload["methods"][n]["source"] == "ds_dho2"]
            others = [n for n in race if n not in dho2 and n != setting["target"]["method"]]
            verdicts = " / ".join(
                f"{p['report'].get('regime')} ({ {True: 'agrees', False: 'DISAGREES', None: 'no prediction'}[p['agreement']['agrees']] })"
                for p in setting["probes"].values())
            target = setting["target"]
            lines.append(f"| {task} | {batch} | {target['value']:.4g} ({payload['methods'][target['method']]['label']}) | "
                         f"{best(race, dho2)} | {best(race, others)} | {defaults_vs_adamw(race)} | {verdicts or '-'} |")
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """One table per (task, batch): method, tuned lr, final loss, steps to target and the three ratios."""
    if payload.get("merged"):
        origin = "Merged from " + "; ".join(f"`{s['command']}` (git {(s.get('git') or {}).get('commit', '?')[:12]}: "
                                            f"{', '.join(s['settings_run'])})" for s in payload["sources"]) + ". "
    else:
        origin = f"Command: `{payload.get('command', '')}`; git {payload.get('git', {}).get('commit', '?')[:12]}. "
    if payload.get("recosted"):
        origin += (f"Lockstep cost re-measured at the recorded tuned lrs by `{payload['recosted']['command']}` (git "
                   f"{(payload['recosted'].get('git') or {}).get('commit', '?')[:12]}). ")
    lines = ["# Regimes: where hybrid order pays", "",
             origin +
             "Training loss = mean loss over the whole training set at the evaluation grid. Target = the lower of "
             "tuned AdamW's and tuned SGD-momentum's mean final training loss. Final loss: mean ± half-range over "
             "seeds. Steps to target: mean over seeds (a seed that never reaches it counts with the budget; "
             "`k/n` seeds reached). Ratios > 1 favour the method: step ratio = target method's steps / the method's, "
             "cost ratio = target method's mean lockstep step time over its steps to target / the method's, time "
             "ratio = their product; cost after refresh = the same ratio of median step times shortly after the first "
             "DHO2 refresh.",
             ""]
    lines += summary_table(payload) + [""]
    for name, entry in payload["tasks"].items():
        lines += [f"## {name}: {entry['settings']['description']}", "",
                  f"Loss: {entry['settings']['loss']}. {entry['settings'].get('notes', '')}".strip(), ""]
        for batch, setting in entry["batches"].items():
            target = setting["target"]
            flat = setting["adamw_flattening"]["mean_curve"]
            lines += [f"### batch {batch} ({setting['budget']} steps)", "",
                      f"Target {target['value']:.5g} ({target['method']} at lr {target['lr']:g}). Tuned AdamW's mean "
                      f"curve improved {_f(flat.get('endpoints'), '.1%')} over the last 20% of the budget "
                      f"(fitted {_f(flat.get('fitted'), '.1%')}; {_f(flat.get('absolute_share'), '.2%')} of the "
                      "initial loss).", "",
                      "| method | tuned lr | final loss | steps to target | step ratio | cost ratio | time ratio | lost on "
                      "| cost after refresh |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for method, race in setting["race"].items():
                tune = setting["tuning"][method]
                lr = f"{race['lr']:.4g}" + ("" if tune["bracketed"] and tune["tuned_bracketed"] else " (edge)")
                final = race["final_loss"]
                final_text = (f"{_f(final['mean'], '.4g')} ± {_f(final['half_range'], '.2g')}" if final["n"] else "diverged")
                steps = (f"{_f(race['steps_mean'], '.0f')} ({race['reached']}/{race['seeds']})"
                         if race["reached"] else f"never (0/{race['seeds']})")
                bound = {"upper": "≤", "lower": "≥", "uncertain": "~"}.get(race["bound"], "")
                lines.append(f"| {payload['methods'][method]['label']} | {lr} | {final_text} | {steps} | "
                             f"{bound}{_f(race['step_ratio'], '.2f')} | {_f(race['cost_ratio'], '.2f')} | "
                             f"{bound}{_f(race['time_ratio'], '.2f')} | {race['lost_on'] or ''} | "
                             f"{_f(race.get('steady_cost_ratio'), '.2f')} |")
            lines.append("")
            for probed, probe in setting["probes"].items():
                agree = probe["agreement"]["agrees"]
                flag = {True: "agrees", False: "**DISAGREES**", None: "no prediction"}[agree]
                lines.append(f"- probe after {probe['report'].get('after_steps')} steps of tuned {probed}: "
                             f"**{probe['report'].get('regime')}**; best DHO2 time ratio "
                             f"{_f(setting['best_dho2_time_ratio'], '.2f')} (win needs ≥ {WIN_FACTOR}): {flag}")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    """Per task, wall-clock speed-up to the target (top) and step ratio (bottom) against batch size, one line
    per method; 1.0 marked. A method that never reached the target is drawn as an x on the floor."""
    plt = pyplot()
    tasks = list(payload["tasks"].items())
    methods = list(payload["methods"])
    fig, axes = plt.subplots(2, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 7.5), squeeze=False)
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")  # one distinct colour per method
    colors = {m: palette(i % palette.N) for i, m in enumerate(methods)}
    floor = 0.05
    for col, (name, entry) in enumerate(tasks):
        batches = sorted(entry["batches"], key=int)
        for row, key in enumerate(("time_ratio", "step_ratio")):
            ax = axes[row][col]
            for method in methods:
                points = [(int(b), entry["batches"][b]["race"].get(method, {}).get(key)) for b in batches
                          if method in entry["batches"][b]["race"]]
                if not points:
                    continue
                dho2 = payload["methods"][method]["source"] == "ds_dho2"
                style = dict(color=colors[method], lw=2.2 if dho2 else 1.0, ls="-" if dho2 else "--")
                xs = [b for b, v in points if v is not None]
                ax.plot(xs, [max(v, floor) for b, v in points if v is not None], marker="o", ms=4,
                        label=payload["methods"][method]["label"], **style)
                never = [b for b, v in points if v is None]
                ax.plot(never, [floor] * len(never), ls="none", marker="x", ms=7, color=colors[method])
            ax.axhline(1.0, color="k", lw=1)
            ax.axhline(WIN_FACTOR, color="k", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.minorticks_off()
            ax.set_xticks([int(b) for b in batches], labels=batches)
            ax.set_xlabel("batch size")
            if row == 0:
                ax.set_title(f"{name}\nwall-clock speed-up to target", fontsize=9)
            else:
                ax.set_title("step ratio (target steps / method steps)", fontsize=9)
            if col == 0:
                ax.set_ylabel("x faster than the target (>1: faster)" if row == 0 else "x fewer steps")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle("Where hybrid order pays: speed-up to the best of tuned AdamW / SGD-momentum "
                 "(x on the floor: never reached; dotted: 1.2x)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if torch.is_tensor(value):
        return _plain(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return _plain(value.item())
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)  # e.g. a torch.dtype among a peer's defaults: named, never a crash at the write


def _resolved(method: Method) -> dict[str, Any]:
    """The hyperparameters the method actually runs with (its defaults merged with the kwargs), from an
    optimizer built on a dummy parameter."""
    try:
        optimizer = method.build([torch.nn.Parameter(torch.zeros(64, 64))], 1e-3, 0)
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {error}"}
    if method.is_dho2:
        return _plain(optimizer.config.to_dict())
    return _plain({k: v for k, v in optimizer.defaults.items() if not callable(v)})


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks regimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 tasks x 2 batches, tiny budgets, methods adamw,sgd,dho2, 1 seed (CI smoke test)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes to keep (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per tuned lr (default 3; quick 1)")
    parser.add_argument("--dho2-variants", default=None,
                        help='extra DHO2 variants: a JSON object {"name": {DHO2 kwargs}} or a path to one; an '
                             '"lr_center" key sets the grid centre')
    parser.add_argument("--max-extensions", type=int, default=MAX_EXTENSIONS)
    parser.add_argument("--no-neighbours", action="store_true",
                        help="seed only the best lr of the seed-0 grid, not its two neighbours (a third of the runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    parser.add_argument("--output-name", default=None, help="results name or path (default regimes / regimes_quick)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="run nothing: combine finished result files (one per task or batch) into one map "
                             "(JSON, tables, figure) under --output-name (default regimes)")
    parser.add_argument("--recost", default=None, metavar="JSON",
                        help="run no race: measure the lockstep cost of a finished (unmerged) run again at its tuned "
                             "lrs and rewrite its ratios, under --output-name (default: the same name)")
    parser.add_argument("--rerun", default=None, metavar="METHODS",
                        help="with --recost: tune and race these methods again first (comma-separated), e.g. after "
                             "a change to them, against the recorded target")
    return parser


def merge_results(paths: list[str | Path]) -> dict[str, Any]:
    """One map from several finished runs (the full map is recorded setting by setting to fit a CPU budget):
    the union of their tasks and batches and of their methods; each file's command, git revision and settings
    are kept under ``sources``. A (task, batch) found in two files, or one method described differently in
    two files, is an error that names both files."""
    merged: dict[str, Any] = {"benchmark": "regimes", "merged": True, "sources": [], "methods": {}, "tasks": {}}
    owner: dict[tuple[str, str], str] = {}
    for path in map(Path, paths):
        run = json.loads(path.read_text())
        if run.get("benchmark") != "regimes":
            raise SystemExit(f"{path} is not a regimes result (benchmark = {run.get('benchmark')!r})")
        merged["sources"].append({"file": path.name, "command": run.get("command"), "git": run.get("git"),
                                  "settings": run.get("settings"), "peers": run.get("peers"),
                                  "machine": run.get("machine"), "wall_seconds": run.get("wall_seconds"),
                                  "settings_run": [f"{t}@{b}" for t, e in run["tasks"].items() for b in e["batches"]]})
        merged.setdefault("peers", run.get("peers"))
        for name, described in run["methods"].items():
            known = merged["methods"].setdefault(name, described)
            if known["kwargs"] != described["kwargs"]:
                raise SystemExit(f"method {name!r} has different settings in {path} than in an earlier file; "
                                 "merge only runs of the same method set")
        for task, entry in run["tasks"].items():
            into = merged["tasks"].setdefault(task, {**entry, "batches": {}})
            for batch, setting in entry["batches"].items():
                if (task, batch) in owner:
                    raise SystemExit(f"{task} at batch {batch} is in both {owner[task, batch]} and {path}; "
                                     "leave one of them out of --merge")
                owner[task, batch] = str(path)
                into["batches"][batch] = setting
        merged["wall_seconds"] = sum(s["wall_seconds"] or 0.0 for s in merged["sources"])
    for entry in merged["tasks"].values():
        entry["batches"] = dict(sorted(entry["batches"].items(), key=lambda kv: int(kv[0])))
    return merged


REACH_KEYS = ("per_seed", "reached", "seeds", "censored", "steps_mean", "seconds_mean", "steps", "final_loss",
              "final_test_loss")


def recost_results(path: str | Path, command: str, rerun: Iterable[str] = ()) -> dict[str, Any]:
    """A finished run with its lockstep cost measured again (the current protocol, the recorded tuned lrs, the
    recorded races): ratios, best DHO2 ratio and the probes' agreement follow the new cost; the tuning, the
    races, the target and the probe reports are kept. The methods named in ``rerun`` are tuned and raced
    again first (the current code, the same protocol and seeds, against the recorded target). For a merged
    map, re-measure each source and merge again."""
    from benchmarks.convergence import _git_state

    run = json.loads(Path(path).read_text())
    if run.get("benchmark") != "regimes" or run.get("merged"):
        raise SystemExit(f"{path}: --recost takes an unmerged regimes result; recost each source, then --merge")
    registry = method_registry(run["settings"].get("variants") or {})
    tasks = make_regime_tasks(quick=run["settings"]["quick"])
    for task_name, entry in run["tasks"].items():
        task = tasks[task_name]
        data = task.load_data()
        for batch_text, setting in entry["batches"].items():
            started, batch = time.perf_counter(), int(batch_text)
            methods = [registry[name] for name in setting["race"]]
            tuned = {name: race["lr"] for name, race in setting["race"].items()}
            summaries = {name: {k: race[k] for k in REACH_KEYS} for name, race in setting["race"].items()}
            for name in rerun:
                settings = run["settings"]
                tuning, runs = tune_method(task, data, batch, registry[name], setting["seeds"],
                                           settings["max_extensions"], settings["seeded_neighbours"],
                                           variant_centers(settings.get("variants")))
                tuned[name] = tuning["tuned_lr"]
                summaries[name] = reach_summary([runs[tuned[name], s] for s in setting["seeds"]],
                                                setting["target"]["value"], setting["budget"])
                setting["tuning"][name] = tuning
                setting["runs"][name] = [r for _, r in sorted(runs.items())]
                if name not in setting["race"]:
                    methods.append(registry[name])
            cost = lockstep_costs(task, data, batch, methods, tuned)
            setting["race"] = race_table(methods, summaries, tuned, setting["target"]["method"], cost)
            setting["lockstep"] = compact_lockstep(cost, task.eval_steps(batch))
            setting["best_dho2_time_ratio"] = best = best_dho2_ratio(methods, setting["race"])
            setting["dho2_wins"] = best is not None and best >= WIN_FACTOR
            for probe in setting["probes"].values():
                probe["agreement"] = agreement(probe["report"].get("regime", "error"), best)
            setting["recost_seconds"] = time.perf_counter() - started
            print(f"[regimes] {task_name} B={batch}: lockstep re-measured in {setting['recost_seconds']:.0f} s; "
                  f"best DHO2 time ratio {_f(best, '.2f')}", flush=True)
    run["settings"]["lockstep"] = LOCKSTEP_PROTOCOL
    run["recosted"] = {"command": command, "git": _git_state(), "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "rerun": list(rerun)}
    for name in rerun:
        run["methods"][name] = {**registry[name].describe(), "resolved": _resolved(registry[name])}
    return run


def main(argv: list[str] | None = None, variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the benchmark; ``variants`` adds DHO2 configurations (name -> kwargs) next to ``--dho2-variants``."""
    args = build_parser().parse_args(argv)
    if args.merge:
        payload = merge_results(args.merge)
        path = _write(args.output_name or "regimes", payload)
        print(f"[regimes] merged {len(args.merge)} runs: {path}")
        return payload
    torch.set_num_threads(args.threads)
    if args.recost:
        command = "python -m benchmarks regimes " + " ".join(argv if argv is not None else sys.argv[1:])
        rerun = [n.strip() for n in (args.rerun or "").split(",") if n.strip()]
        payload = recost_results(args.recost, command, rerun)
        path = _write(args.output_name or Path(args.recost).stem, payload)
        print(f"[regimes] re-measured cost: {path}")
        return payload
    variants = {**parse_variants(args.dho2_variants), **(variants or {})}
    registry = method_registry(variants)
    tasks = make_regime_tasks(quick=args.quick)
    if args.tasks:
        tasks = {n: tasks[n] for n in args.tasks.split(",") if n.strip()}
    default_methods = list(QUICK_METHODS) if args.quick else [m for m in registry if m not in variants]
    names = [n.strip() for n in args.methods.split(",")] if args.methods else default_methods
    names += [v for v in variants if v not in names]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(registry)}")
    methods = [registry[n] for n in names]
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    keep = None if not args.batches else {int(b) for b in args.batches.split(",")}
    name = args.output_name or ("regimes_quick" if args.quick else "regimes")
    from benchmarks.convergence import _git_state

    payload: dict[str, Any] = {
        "benchmark": "regimes", "git": _git_state(),
        "settings": {"quick": args.quick, "seeds": seeds, "threads": args.threads, "grid_points": GRID_POINTS,
                     "lr_ratio": LR_RATIO, "max_extensions": args.max_extensions, "win_factor": WIN_FACTOR,
                     "seeded_neighbours": not args.no_neighbours,
                     "lockstep": LOCKSTEP_PROTOCOL,
                     "probe": {"max_rank": 4 if args.quick else PROBE_MAX_RANK, "after": "budget // 2 steps",
                               "noise_chunks": 8},
                     "diverged_factor": DIVERGED_FACTOR, "flattening_window": FLATTENING_WINDOW,
                     "training_loss": "mean loss over the whole training set, eval mode, at the evaluation grid",
                     "variants": variants},
        "peers": {"pytorch_optimizer": package_version("pytorch_optimizer"), "torch": torch.__version__,
                  "ds_dho2": package_version("ds_dho2"), "mnist1d": _dist_version("mnist1d")},
        "methods": {m.name: {**m.describe(), "resolved": _resolved(m)} for m in methods},
        "tasks": {}}
    started = time.perf_counter()
    for task in tasks.values():
        loaded = time.perf_counter()
        data = task.load_data()
        entry = {"settings": task.settings(), "data": data.info,
                 "parameters": count_parameters(task.build_model(0)), "data_seconds": time.perf_counter() - loaded,
                 "batches": {}}
        payload["tasks"][task.name] = entry
        for batch in task.batches:
            if keep is not None and batch not in keep:
                continue
            result = run_setting(task, data, batch, methods, seeds, args.max_extensions,
                                 probe_rank=payload["settings"]["probe"]["max_rank"], centers=variant_centers(variants),
                                 neighbours=not args.no_neighbours)
            entry["batches"][str(batch)] = result
            payload["wall_seconds"] = time.perf_counter() - started
            _write(name, payload)  # after every (task, batch): a long run keeps what it finished
    payload["wall_seconds"] = time.perf_counter() - started
    path = _write(name, payload)
    print(f"[regimes] results: {path} ({payload['wall_seconds']:.0f} s)")
    return payload


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write(name: str, payload: dict[str, Any]) -> Path:
    """The JSON (with command, machine and git revision), the markdown tables and the figure."""
    payload = _plain(payload)
    path = write_results(name, payload)
    saved = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(saved))
    if any(entry["batches"] for entry in saved["tasks"].values()):
        plot(saved, path.with_suffix(".png"))
    return path


if __name__ == "__main__":
    main()
