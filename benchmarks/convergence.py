"""Convergence: time and steps to a target validation loss, DHO2 vs AdamW and the ADMM ablations.

For each task (``benchmarks/tasks.py``) and each method, over the same learning-rate grid, trains under
DeepSpeed ZeRO-2 with ``W`` gloo ranks on CPU (one process launch per task; every run inside it calls
``deepspeed.initialize`` afresh) with the same step budget, seed and data order. All four methods are
``"type": "DHO2"`` configs (DESIGN.md section 4 ablation):

* ``AdamW``          curvature off (exactly AdamW: checked once per suite against DeepSpeed's own
                     ``{"type": "AdamW", "params": {"torch_adam": true}}``, reported as ``reference_check``);
* ``AdamW+ADMM``     curvature off, ADMM on;
* ``DHO2 w/o ADMM``  curvature on;
* ``DHO2``           curvature on, ADMM on.

Validation loss (and accuracy for classifiers) is measured every ``eval_every`` steps on a fixed
validation subset, summed over the ranks' shares. Only training is timed (forward, backward, step; with
``time.perf_counter``), and the figure at each evaluation is the maximum over ranks of the cumulative
training time. Per method the lr with the lowest final validation loss is reported. The target is
AdamW's best final validation loss at the budget; time/steps to target are read at the first evaluation
at or below it (``null`` = not reached within the budget), and ``speedup_vs_adamw`` is AdamW's
time-to-target divided by the method's.

    python -m benchmarks convergence [--quick] [--tasks digits,charlm,sst2] [--world-size 2]
                                     [--output-name NAME_OR_PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, machine_info, pyplot
from benchmarks.tasks import Task, epoch_order, make_tasks, setup_task

METHODS: dict[str, dict[str, Any]] = {
    "AdamW": {"curvature": False, "admm": False},
    "AdamW+ADMM": {"curvature": False, "admm": True},
    "DHO2 w/o ADMM": {"curvature": True, "admm": False},
    "DHO2": {"curvature": True, "admm": True},
}
BASELINE = "AdamW"
_STAT_KEYS = ("refresh_count", "eigenvalues", "subspace_grad_fraction", "lanczos_stop",
              "admm_extrapolation_norm", "admm_safeguard_scale")
_RUN_KEYS = ("curve", "train_seconds", "wall_seconds", "refresh_seconds", "train_loss", "dho2_stats")


def optimizer_params(task: Task, method: str, lr: float) -> dict[str, Any]:
    """The ``"params"`` block of the ``"type": "DHO2"`` optimizer for one run."""
    spec = METHODS[method]
    params: dict[str, Any] = {"lr": lr, "weight_decay": task.weight_decay, "seed": task.seed, **task.dho2,
                              "curvature": {"enabled": spec["curvature"], "mode": "blocking"}}
    if spec["admm"]:
        params["admm"] = copy.deepcopy(task.admm)
    return params


def ds_config(task: Task, optimizer: dict[str, Any]) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": task.micro_batch, "gradient_accumulation_steps": 1,
            "optimizer": optimizer, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


# ------------------------------------------------------------------------------------------ rank side
def _loss(output: Any) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.loss


def _evaluate(engine: Any, data: Any, train_seconds: float) -> tuple[float, float | None, float]:
    """Validation loss/accuracy over all ranks' shares, and the max over ranks of the training time."""
    import torch.distributed as dist

    module = engine.module
    was_training = module.training
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for args, kwargs in data.val_batches:
            loss, correct, count = data.evaluate(module, args, kwargs)
            sums += torch.tensor([loss, correct, count], dtype=torch.float64)
    module.train(was_training)
    seconds = torch.tensor([train_seconds], dtype=torch.float64)
    dist.all_reduce(sums)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    loss_sum, correct, count = sums.tolist()
    return loss_sum / count, correct / count, float(seconds)


def _train_run(task: Task, data: Any, order: torch.Tensor, rank: int, optimizer: dict[str, Any],
               keep_params: bool = False) -> dict[str, Any]:
    import deepspeed

    torch.manual_seed(task.seed * 1000 + rank)  # dropout masks: the same sequence for every method
    model = data.build_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable,
                                      config=ds_config(task, optimizer))
    opt = engine.basic_optimizer
    curve: list[dict[str, Any]] = []
    train_losses: list[float] = []
    refresh_seconds: list[float] = []
    train_seconds = 0.0

    def record(step: int) -> None:
        loss, acc, seconds = _evaluate(engine, data, train_seconds)
        curve.append({"step": step, "seconds": seconds, "val_loss": loss,
                      "val_acc": acc if task.classifier else None})

    record(0)
    for step in range(task.steps):
        args, kwargs = data.train_batch(order[step])
        started = time.perf_counter()
        loss = _loss(engine(*args, **kwargs))
        engine.backward(loss)
        engine.step()
        train_seconds += time.perf_counter() - started
        train_losses.append(float(loss.detach()))
        stats = getattr(opt, "stats", {})
        if stats.get("refresh_step") == step + 1 and len(refresh_seconds) < stats.get("refresh_count", 0):
            refresh_seconds.append(float(stats["refresh_seconds"]))
        if (step + 1) % task.eval_every == 0 or step + 1 == task.steps:
            record(step + 1)
    result: dict[str, Any] = {"curve": curve, "train_loss": train_losses,
                              "train_seconds": curve[-1]["seconds"], "refresh_seconds": refresh_seconds}
    if hasattr(opt, "curvature_stats"):
        stats = opt.curvature_stats()
        eig = stats.get("eigenvalues")
        result["dho2_stats"] = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in stats.items()
                                if k in _STAT_KEYS}
        if eig is None and opt.eigenvalues is not None:
            result["dho2_stats"]["eigenvalues"] = opt.eigenvalues.tolist()
    if keep_params:
        result["params"] = torch.cat([p.detach().float().reshape(-1) for p in trainable])
    del engine, opt, model
    gc.collect()
    return result


def task_worker(rank: int, world: int, settings: dict[str, Any], methods: list[str],
                reference_check: bool) -> dict:
    """One rank: every (method, lr) run of one task, then (optionally) the AdamW reference check."""
    import logging

    import ds_dho2  # noqa: F401 - registers "type": "DHO2"

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    started = time.perf_counter()
    task = Task(**settings)
    data = setup_task(task, rank, world)
    order = epoch_order(data.train_rows, task.steps, task.micro_batch * world, task.seed)
    out: dict[str, Any] = {"runs": {}, "train_rows": data.train_rows,
                           "setup_seconds": time.perf_counter() - started}
    for method in methods:
        for lr in task.lrs:
            run_started = time.perf_counter()
            optimizer = {"type": "DHO2", "params": optimizer_params(task, method, lr)}
            run = _train_run(task, data, order, rank, optimizer,
                             keep_params=reference_check and method == BASELINE and lr == task.lrs[0])
            run["wall_seconds"] = time.perf_counter() - run_started  # incl. initialize and evaluation
            out["runs"].setdefault(method, {})[repr(lr)] = run
    if reference_check and BASELINE in methods:
        lr = task.lrs[0]
        ours = out["runs"][BASELINE][repr(lr)]
        reference = _train_run(task, data, order, rank, {"type": "AdamW", "params": {
            "lr": lr, "weight_decay": task.weight_decay, "torch_adam": True}}, keep_params=True)
        diff = [abs(a - b) for a, b in zip(ours["train_loss"], reference["train_loss"])]
        out["reference_check"] = {
            "lr": lr, "steps": task.steps,
            "reference": "DeepSpeed {'type': 'AdamW', 'params': {'torch_adam': true}}",
            "max_abs_train_loss_diff": max(diff),
            "final_val_loss": {"DHO2 curvature off": ours["curve"][-1]["val_loss"],
                               "DeepSpeed AdamW": reference["curve"][-1]["val_loss"]},
            "max_abs_param_diff": float((ours["params"] - reference["params"]).abs().max()),
            "param_norm": float(reference["params"].norm()),
            "train_seconds": {"DHO2 curvature off": ours["train_seconds"],
                              "DeepSpeed AdamW": reference["train_seconds"]},
        }
    for runs in out["runs"].values():
        for run in runs.values():
            run.pop("params", None)
    return out


# ------------------------------------------------------------------------------------------ summary
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def time_to_target(curve: list[dict[str, Any]], target: float) -> tuple[int | None, float | None]:
    for point in curve:
        if _finite(point["val_loss"]) and point["val_loss"] <= target:
            return point["step"], point["seconds"]
    return None, None


def summarise(task: Task, runs: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Best lr per method, target = AdamW's best final validation loss, time/steps to it, speed-up."""
    best: dict[str, str] = {}
    for method, by_lr in runs.items():
        finals = {lr: r["curve"][-1]["val_loss"] for lr, r in by_lr.items()}
        candidates = [lr for lr, v in finals.items() if _finite(v)]
        best[method] = min(candidates, key=lambda lr: finals[lr]) if candidates else next(iter(by_lr))
    target = runs[BASELINE][best[BASELINE]]["curve"][-1]["val_loss"] if BASELINE in runs else math.nan
    base_steps, base_seconds = (time_to_target(runs[BASELINE][best[BASELINE]]["curve"], target)
                                if BASELINE in runs else (None, None))
    rows = {}
    for method, by_lr in runs.items():
        run = by_lr[best[method]]
        final = run["curve"][-1]
        steps, seconds = time_to_target(run["curve"], target)
        speedup = base_seconds / seconds if seconds and base_seconds else None
        if method == BASELINE:
            verdict = "baseline"
        elif seconds is None:
            verdict = "LOSES: target not reached"
        else:
            verdict = "wins" if speedup > 1.0 else "LOSES: slower to target"
        rows[method] = {
            "best_lr": float(best[method]), "final_val_loss": final["val_loss"],
            "final_val_acc": final["val_acc"],
            "steps_to_target": steps, "seconds_to_target": seconds, "speedup_vs_adamw": speedup,
            "step_ratio_vs_adamw": (base_steps / steps) if steps and base_steps else None,
            "train_seconds": run["train_seconds"], "seconds_per_step": run["train_seconds"] / task.steps,
            "final_val_loss_by_lr": {lr: r["curve"][-1]["val_loss"] for lr, r in by_lr.items()},
            "verdict": verdict,
        }
    return {"target_val_loss": target, "methods": rows,
            "target_source": f"{BASELINE} best final val loss at {task.steps} steps"}


def _fmt(value: Any, spec: str, none: str = "not reached") -> str:
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec)


def markdown(tasks: dict[str, Task], results: dict[str, Any], world: int) -> str:
    lines = [f"Convergence, DeepSpeed ZeRO-2, W={world} CPU ranks (gloo). Target: AdamW's best final "
             "validation loss; time = training only (max over ranks); speed-up = AdamW time-to-target / "
             "method time-to-target.", ""]
    for name, task in tasks.items():
        summary = results[name]["summary"]
        lines += [f"### {name}: {task.description}",
                  f"budget {task.steps} steps, lr grid {task.lrs}, "
                  f"target val loss {summary['target_val_loss']:.4f}",
                  "",
                  "| method | best lr | final val loss | final val acc | steps to target | s to target | "
                  "speed-up vs AdamW | train s | s/step | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method, row in summary["methods"].items():
            lines.append(
                f"| {method} | {row['best_lr']:g} | {_fmt(row['final_val_loss'], '.4f')} | "
                f"{_fmt(row['final_val_acc'], '.3f', '-')} | {_fmt(row['steps_to_target'], 'd')} | "
                f"{_fmt(row['seconds_to_target'], '.1f')} | {_fmt(row['speedup_vs_adamw'], '.2f', '-')} | "
                f"{row['train_seconds']:.1f} | {row['seconds_per_step']:.3f} | {row['verdict']} |")
        check = results[name].get("reference_check")
        if check:
            lines += ["", f"Reference check (lr {check['lr']:g}, {check['steps']} steps): DHO2 curvature off "
                          f"vs {check['reference']}: max |train loss diff| "
                          f"{check['max_abs_train_loss_diff']:.2e}, "
                          f"max |param diff| {check['max_abs_param_diff']:.2e} (param norm "
                          f"{check['param_norm']:.2f}), final val loss "
                          f"{check['final_val_loss']['DHO2 curvature off']:.6f} vs "
                          f"{check['final_val_loss']['DeepSpeed AdamW']:.6f}."]
        lines.append("")
    return "\n".join(lines)


def plot(task: Task, result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    summary = result["summary"]
    for method, row in summary["methods"].items():
        curve = result["runs"][method][repr(row["best_lr"])]["curve"]
        label = f"{method} (lr {row['best_lr']:g})"
        axes[0].plot([p["seconds"] for p in curve], [p["val_loss"] for p in curve], marker=".", label=label)
        axes[1].plot([p["step"] for p in curve], [p["val_loss"] for p in curve], marker=".", label=label)
    for ax, xlabel in zip(axes, ("training seconds (max over ranks)", "step")):
        ax.axhline(summary["target_val_loss"], color="gray", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task.name}: validation loss, best lr per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _output_paths(name: str) -> tuple[Path, str]:
    """``name`` is a bare name (written under benchmarks/results/) or a path (its directory is used)."""
    candidate = Path(name)
    if candidate.parent != Path("."):
        return candidate.parent, candidate.name
    return RESULTS_DIR, name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tests.helpers.distributed import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits only, 1 lr, tiny budget (CI smoke test)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of digits,charlm,sst2")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--output-name", default=None,
                        help="results name under benchmarks/results/ (default convergence[_quick]) or a path")
    parser.add_argument("--no-reference-check", action="store_true",
                        help="skip the DeepSpeed AdamW equality check run")
    args = parser.parse_args(argv)
    all_tasks = make_tasks(args.quick)
    names = list(all_tasks) if not args.tasks else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in all_tasks]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(all_tasks)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in methods):
        parser.error(f"methods must be among {list(METHODS)}")
    tasks = {n: all_tasks[n] for n in names}
    default_name = "convergence_quick" if args.quick else "convergence"
    out_dir, out_name = _output_paths(args.output_name or default_name)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {}
    started = time.perf_counter()
    for index, (name, task) in enumerate(tasks.items()):
        launched = time.perf_counter()
        print(f"[convergence] {name}: {len(methods)} methods x {len(task.lrs)} lrs, {task.steps} steps, "
              f"W={args.world_size}", flush=True)
        per_rank = run_ranks(task_worker, args.world_size, task.settings(), methods,
                             not args.no_reference_check and index == 0, timeout=3 * 3600)
        result = per_rank[0]
        result["wall_seconds"] = time.perf_counter() - launched
        result["summary"] = summarise(task, result["runs"])
        results[name] = result
        print(f"[convergence] {name} done in {result['wall_seconds']:.0f} s", flush=True)
    total = time.perf_counter() - started

    table = markdown(tasks, results, args.world_size)
    command = [Path(sys.executable).name, "-m", "benchmarks", "convergence",
               *(argv if argv is not None else sys.argv[1:])]
    settings = {"quick": args.quick, "world_size": args.world_size, "zero_stage": 2,
                "methods": {m: METHODS[m] for m in methods}, "baseline": BASELINE, "wall_seconds": total,
                "tasks": {n: t.settings() for n, t in tasks.items()}}
    payload = {
        "benchmark": "convergence", "command": " ".join(command),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(), "settings": settings,
        "tasks": {n: {"summary": r["summary"], "reference_check": r.get("reference_check"),
                      "train_rows": r["train_rows"], "wall_seconds": r["wall_seconds"],
                      "setup_seconds": r["setup_seconds"],
                      "runs": {m: {lr: {k: run[k] for k in _RUN_KEYS if k in run}
                                   for lr, run in by_lr.items()} for m, by_lr in r["runs"].items()}}
                  for n, r in results.items()},
    }
    json_path = out_dir / f"{out_name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (out_dir / f"{out_name}.md").write_text(table + "\n")
    for name, task in tasks.items():
        plot(task, results[name], out_dir / f"{out_name}_{name}.png")
    print(table)
    print(f"total wall time {total:.0f} s; results: {json_path}")
    return payload


if __name__ == "__main__":
    main()
