"""The main demo: DHO2 and AdamW side by side in one multi-process DeepSpeed run, timed the same way.

``python -m benchmarks.demo`` (``bash scripts/run_demo.sh``) starts ``--nproc`` gloo ranks (CPU) with a
DeepSpeed ZeRO-2 engine per optimizer -- DeepSpeed's own AdamW (``torch_adam``) and DHO2 with its library
defaults -- built from the same initial weights and trained on the same batches in a lockstep race (the
convergence benchmark's ``benchmarks/race.py``): at every step each engine takes its step in turn, so both
are timed under the same machine conditions. It prints the validation loss each reached, the steps and
seconds DHO2 needed to reach AdamW's final validation loss, and the split time ratio = step ratio x cost
ratio, says plainly which one won, and writes ``loss_vs_seconds.png`` and ``summary.json`` to
``--output-dir`` (default ``outputs/demo``).

It runs from the source checkout (it uses the benchmark suite's tasks and race) and reads the shared data
in ``../shared/data`` (or ``$DS_DHO2_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

#: per task: the budget (steps) and each optimizer's lr -- the best lr of each method (DHO2: its defaults,
#: "DHO2 w/o ADMM") over 3 seeds in the convergence benchmark (``benchmarks/results/convergence_<task>.md``),
#: so neither is handicapped by its learning rate
DEMO_TASKS: dict[str, dict[str, Any]] = {
    "charlm": {"steps": 1000, "lrs": {"AdamW": 3e-3, "DHO2": 3e-3}},
    "digits": {"steps": 600, "lrs": {"AdamW": 1.0125e-2, "DHO2": 2e-3}},
    "sst2": {"steps": 250, "lrs": {"AdamW": 3e-4, "DHO2": 3e-4}},
    # the regime map's full-batch autoencoder: each method's tuned lr there (benchmarks/results/regimes*.md)
    "autoencoder": {"steps": 3000, "lrs": {"AdamW": 2.25e-2, "DHO2": 1.5e-2}},
}
METHODS = {"AdamW": {"type": "AdamW", "params": {"torch_adam": True, "foreach": True}},
           "DHO2": {"type": "DHO2", "params": {}}}


def race_worker(rank: int, world: int, task_name: str, steps: int, lrs: dict[str, float], seed: int) -> dict:
    """One rank: build both engines and race them (``benchmarks.race.run_race``)."""
    import dataclasses
    import logging

    import deepspeed
    import torch

    import ds_dho2  # noqa: F401 - registers "type": "DHO2"
    from benchmarks.convergence import optimizer_block
    from benchmarks.race import EngineSpec, run_race
    from benchmarks.tasks import make_tasks, setup_task

    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if rank != 0:
        logging.getLogger("ds_dho2").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    task = dataclasses.replace(make_tasks()[task_name], steps=steps)
    data = setup_task(task, rank, world)
    specs = [EngineSpec(name, name, lrs[name], optimizer_block(METHODS[name], task, lrs[name], seed))
             for name in METHODS]
    result = run_race(task, data, seed, specs, rank, world)
    return {"task": task.settings(), "engines": result["engines"], "info": result["info"]}


def reach(evals: list[dict], seconds: list[float], target: float) -> tuple[int | None, float | None]:
    """The first evaluation at or below ``target``: (step, cumulative training seconds)."""
    for point in evals:
        if math.isfinite(point["val_loss"]) and point["val_loss"] <= target * (1 + 1e-4):
            return point["step"], sum(seconds[: point["step"]])
    return None, None


def summarise(result: dict) -> dict[str, Any]:
    engines = result["engines"]
    target = engines["AdamW"]["evals"][-1]["val_loss"]
    rows: dict[str, Any] = {}
    for name, run in engines.items():
        step, seconds = reach(run["evals"], run["step_seconds"], target)
        rows[name] = {"lr": run["lr"], "final_val_loss": run["evals"][-1]["val_loss"],
                      "final_val_acc": run["evals"][-1].get("val_acc"), "train_seconds": sum(run["step_seconds"]),
                      "steps_to_target": step, "seconds_to_target": seconds,
                      "refreshes": len(run.get("refreshes", []))}
    a, d = rows["AdamW"], rows["DHO2"]
    summary: dict[str, Any] = {"target": target, "methods": rows}
    if d["steps_to_target"]:
        step_ratio = a["steps_to_target"] / d["steps_to_target"]
        cost_ratio = (a["seconds_to_target"] / a["steps_to_target"]) / (d["seconds_to_target"] / d["steps_to_target"])
        summary.update(step_ratio=step_ratio, cost_ratio=cost_ratio, time_ratio=step_ratio * cost_ratio)
    return summary


def verdict(summary: dict) -> str:
    d, a = summary["methods"]["DHO2"], summary["methods"]["AdamW"]
    if "time_ratio" not in summary:
        return (f"DHO2 did not reach AdamW's final validation loss ({summary['target']:.4f}) within the budget: it "
                f"ended at {d['final_val_loss']:.4f}. On this task AdamW wins.")
    ratio = summary["time_ratio"]
    head = "DHO2 wins" if ratio > 1 else "AdamW wins"
    pace = "as fast as AdamW" if abs(ratio - 1) < 0.005 else (
        f"{ratio:.2f}x AdamW's speed to target" if ratio > 1 else f"{1 / ratio:.2f}x AdamW's time")
    return (f"{head}: DHO2 reached AdamW's final validation loss {summary['target']:.4f} in "
            f"{d['seconds_to_target']:.1f} s ({d['steps_to_target']} steps) vs AdamW's {a['seconds_to_target']:.1f} s "
            f"({a['steps_to_target']} steps): {pace}. Time ratio {ratio:.2f} = step ratio "
            f"{summary['step_ratio']:.2f} (AdamW's steps / DHO2's) x cost ratio {summary['cost_ratio']:.2f} "
            f"(AdamW's seconds per step / DHO2's).")


def plot(result: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in result["engines"].items():
        cumulative = [0.0]
        for t in run["step_seconds"]:
            cumulative.append(cumulative[-1] + t)
        steps = [p["step"] for p in run["evals"]]
        losses = [p["val_loss"] for p in run["evals"]]
        label = f"{name} (lr {run['lr']:g})"
        axes[0].plot([cumulative[s] for s in steps], losses, label=label)
        axes[1].plot(steps, losses, label=label)
    for ax, xlabel in zip(axes, ("training seconds (same race, same machine conditions)", "step")):
        ax.axhline(summary["target"], color="grey", ls="--", lw=0.8, label="AdamW's final loss")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=8)
    axes[0].set_title("Time to the same loss")
    axes[1].set_title("Steps to the same loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(DEMO_TASKS), default="autoencoder",
                        help="autoencoder (default): where the regime map measured a DHO2 gain; charlm: a "
                             "noise-limited case, where it measured none")
    parser.add_argument("--steps", type=int, default=None, help="step budget (default: the task's)")
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel ranks (processes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "outputs" / "demo"))
    args = parser.parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    for key, value in (("DS_ACCELERATOR", "cpu"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false"), ("OMP_NUM_THREADS", "1")):
        os.environ.setdefault(key, value)
    from ds_dho2.dist.local_ranks import run_ranks
    from ds_dho2.logging_utils import configure_cli_logging

    configure_cli_logging()

    config = DEMO_TASKS[args.task]
    steps = args.steps or config["steps"]
    print(f"== demo: {args.nproc}-process DeepSpeed ZeRO-2 (CPU, gloo), {args.task}, {steps} steps; AdamW and DHO2 "
          f"(library defaults) raced step by step ==", flush=True)
    started = time.perf_counter()
    result = run_ranks(race_worker, args.nproc, args.task, steps, config["lrs"], args.seed, timeout=3600)[0]
    wall = time.perf_counter() - started
    summary = summarise(result)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, summary, out / "loss_vs_seconds.png")
    (out / "summary.json").write_text(json.dumps({"task": args.task, "steps": steps, "nproc": args.nproc,
                                                  "wall_seconds": wall, **summary}, indent=2) + "\n")
    print(f"\n{'':<30}{'AdamW':>12}{'DHO2':>12}")
    rows = summary["methods"]
    print(f"{'learning rate':<30}{rows['AdamW']['lr']:>12g}{rows['DHO2']['lr']:>12g}")
    print(f"{'final validation loss':<30}{rows['AdamW']['final_val_loss']:>12.4f}{rows['DHO2']['final_val_loss']:>12.4f}")
    print(f"{'training seconds (whole run)':<30}{rows['AdamW']['train_seconds']:>12.1f}{rows['DHO2']['train_seconds']:>12.1f}")

    def cell(value: Any, spec: str) -> str:
        return f"{value:>12{spec}}" if value is not None else f"{'not reached':>12}"

    print(f"{'steps to AdamW final loss':<30}{cell(rows['AdamW']['steps_to_target'], 'd')}"
          f"{cell(rows['DHO2']['steps_to_target'], 'd')}")
    print(f"{'seconds to AdamW final loss':<30}{cell(rows['AdamW']['seconds_to_target'], '.1f')}"
          f"{cell(rows['DHO2']['seconds_to_target'], '.1f')}")
    print(f"DHO2 curvature refreshes: {rows['DHO2']['refreshes']}")
    print("\n" + verdict(summary))
    print(f"\nplot: {out / 'loss_vs_seconds.png'}; summary: {out / 'summary.json'}; wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
