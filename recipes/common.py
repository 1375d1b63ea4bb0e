"""Shared code for the Hugging Face recipes: arguments, DeepSpeed configs, running DHO2 and AdamW, plots.

A recipe supplies the model, data and metrics (:class:`Task`); :func:`run_recipe` trains once per
optimizer named by ``--optimizer`` (``both`` = DHO2 then AdamW from the same initial weights), writes
``<output-dir>/<optimizer>/log_history.json`` and ``<output-dir>/summary.json``, plots the loss curves
to ``<output-dir>/loss_curves.png`` and prints a side-by-side summary on rank 0.

DeepSpeed configs: ``--dho2-config`` / ``--adamw-config`` (defaults: ``recipes/configs/*_zero2.json``;
under ``accelerate launch`` with a DeepSpeed plugin the plugin's ``deepspeed_config_file`` is the DHO2
default). The recipe's DHO2 flags (``--rank``, ``--refresh-interval``...) and ``--zero-stage`` override
the file; HF fills the ``"auto"`` entries from the TrainingArguments. ``--no-deepspeed`` trains with the
plain Trainer instead (DHO2 through ``optimizer_cls_and_kwargs``; AdamW is HF's ``adamw_torch``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

RECIPES_DIR = Path(__file__).resolve().parent
REPO_ROOT = RECIPES_DIR.parent
CONFIG_DIR = RECIPES_DIR / "configs"
OPTIMIZERS = ("dho2", "adamw")

# Make `import ds_dho2` work from a source checkout even without the editable install.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@dataclasses.dataclass
class Task:
    """What a recipe trains: ``model_init()`` builds a fresh model (called after seeding)."""

    name: str
    model_init: Callable[[], Any]
    train_dataset: Any
    eval_dataset: Any
    data_collator: Any = None
    compute_metrics: Callable[[Any], dict] | None = None
    processing_class: Any = None
    headline_metric: str = "eval_loss"      # the figure compared in the summary
    extra_metrics: Callable[[dict], dict] | None = None  # e.g. perplexity from eval_loss


def add_common_arguments(parser: argparse.ArgumentParser, *, lr: float, max_steps: int, batch_size: int,
                         output_dir: str) -> argparse.ArgumentParser:
    """The arguments every recipe shares (model- and data-specific ones are added by the recipe)."""
    g = parser.add_argument_group("training")
    g.add_argument("--optimizer", choices=(*OPTIMIZERS, "both"), default="both",
                   help="optimizer to train with; 'both' runs DHO2 then AdamW from the same initial weights")
    g.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps per run")
    g.add_argument("--batch-size", type=int, default=batch_size, help="per-process micro batch size")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (both optimizers)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--lr-scheduler", default="linear",
                   help="HF lr_scheduler_type (used when the DeepSpeed config has no scheduler block)")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="HF scheduler warm-up steps")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--logging-steps", type=int, default=10)
    g.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (ZeRO 1/2)")
    g.add_argument("--output-dir", default=output_dir)
    g.add_argument("--no-plot", action="store_true", help="do not write loss_curves.png")
    g.add_argument("--report-to", default="none", help="HF reporters, e.g. tensorboard (default: none)")
    d = parser.add_argument_group("DeepSpeed")
    d.add_argument("--no-deepspeed", action="store_true",
                   help="plain HF Trainer (DHO2 via optimizer_cls_and_kwargs) instead of DeepSpeed")
    d.add_argument("--dho2-config", default=None,
                   help="DeepSpeed JSON for DHO2 (default: the accelerate plugin's file, else "
                        "recipes/configs/dho2_zero2.json)")
    d.add_argument("--adamw-config", default=str(CONFIG_DIR / "adamw_zero2.json"), help="DeepSpeed JSON for AdamW")
    d.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="override zero_optimization.stage")
    h = parser.add_argument_group("DHO2 (override the config file)")
    h.add_argument("--rank", type=int, default=None, help="curvature subspace dimension k")
    h.add_argument("--lanczos-order", type=int, default=None, help="Lanczos iterations per refresh")
    h.add_argument("--refresh-interval", type=int, default=None, help="steps between curvature refreshes")
    h.add_argument("--warmup-steps", type=int, default=None, help="steps before the first refresh")
    h.add_argument("--alpha", type=float, default=None, help="Newton step size in the subspace")
    h.add_argument("--lanczos-dtype", choices=("float64", "float32"), default=None)
    h.add_argument("--no-back-off", action="store_true",
                   help="keep the curvature even where the Newton step carries less than curvature.payoff_share "
                        "of the update (by default DHO2 then steps as its base optimizer)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------- configs
def dho2_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {"rank": "rank", "lanczos_order": "lanczos_order", "refresh_interval": "refresh_interval",
             "warmup_steps": "warmup_steps", "alpha": "alpha", "lanczos_dtype": "lanczos_dtype"}
    return {key: getattr(args, attr) for attr, key in names.items() if getattr(args, attr) is not None}


def apply_dho2_overrides(params: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the command-line DHO2 settings into ``params``; ``--no-back-off`` goes into its ``curvature``
    block, whose other keys stay."""
    params.update(dho2_overrides(args))
    if getattr(args, "no_back_off", False):
        params["curvature"] = {**params.get("curvature", {}), "back_off": False}


def deepspeed_config(optimizer: str, args: argparse.Namespace) -> dict[str, Any]:
    """The DeepSpeed config dict for one run: the JSON file plus the command-line overrides."""
    if optimizer == "dho2":
        path = args.dho2_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or CONFIG_DIR / "dho2_zero2.json"
    else:
        path = args.adamw_config
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    if optimizer == "dho2":
        if config.get("optimizer", {}).get("type", "").upper() != "DHO2":
            raise SystemExit(f"{path} does not select optimizer type DHO2")
        apply_dho2_overrides(config["optimizer"].setdefault("params", {}), args)
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    return config


def dho2_params(args: argparse.Namespace) -> dict[str, Any]:
    """DHO2 keyword arguments for the non-DeepSpeed path (DHO2 defaults of the DHO2 JSON + overrides)."""
    path = args.dho2_config or CONFIG_DIR / "dho2_zero2.json"
    with open(path, encoding="utf-8") as fh:
        params = dict(json.load(fh)["optimizer"].get("params", {}))
    params = {k: v for k, v in params.items() if v != "auto"}
    apply_dho2_overrides(params, args)
    params.update(lr=args.lr, weight_decay=args.weight_decay)
    return params


# --------------------------------------------------------------------------------------------- runs
def cpu_ddp_backend() -> str | None:
    """``"gloo"`` for several CPU processes; None otherwise (accelerate fails on a backend without ranks)."""
    import torch

    return "gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def single_process_launch() -> None:
    """Started alone (``python recipe.py``, no launcher), give DeepSpeed the environment of a one-process
    torchrun (RANK=0, WORLD_SIZE=1, a free MASTER_PORT...); otherwise it falls back to MPI discovery and asks
    for mpi4py. Under a launcher nothing changes."""
    from ds_dho2.cli import single_process_environment

    os.environ.update(single_process_environment())


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _reset_accelerate_state() -> None:
    """Let a second Trainer in this process build its own Accelerator / DeepSpeed plugin."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    except Exception:  # noqa: BLE001 - older accelerate: nothing to reset
        pass


def run_one(optimizer: str, task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one optimizer; returns the run's summary (also written to disk)."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    import ds_dho2  # noqa: F401 - registers "type": "DHO2" with DeepSpeed
    from ds_dho2.integrations.hf import add_curvature_callback, dho2_optimizer_cls_and_kwargs, find_dho2

    _reset_accelerate_state()
    out = Path(args.output_dir) / optimizer
    use_ds = not args.no_deepspeed
    training_args = TrainingArguments(
        output_dir=str(out),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 32),
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.lr_warmup_steps,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="no",
        report_to=args.report_to,
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=cpu_ddp_backend(),
        deepspeed=deepspeed_config(optimizer, args) if use_ds else None,
        dataloader_num_workers=0,
        disable_tqdm=not is_main_process(),
    )
    set_seed(args.seed)  # same initial weights for every optimizer
    model = task.model_init()
    kwargs: dict[str, Any] = {}
    if not use_ds and optimizer == "dho2":
        kwargs["optimizer_cls_and_kwargs"] = dho2_optimizer_cls_and_kwargs(**dho2_params(args))
    trainer = Trainer(model=model, args=training_args, train_dataset=task.train_dataset,
                      eval_dataset=task.eval_dataset, data_collator=task.data_collator,
                      compute_metrics=task.compute_metrics, processing_class=task.processing_class, **kwargs)
    add_curvature_callback(trainer)
    started = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - started
    metrics = trainer.evaluate()
    if task.extra_metrics:
        metrics.update(task.extra_metrics(metrics))
    dho2 = find_dho2(trainer.optimizer) or find_dho2(trainer.model_wrapped)
    inner = trainer.model_wrapped
    summary = {
        "optimizer": optimizer,
        "optimizer_class": type(dho2).__name__ if dho2 is not None else
        type(getattr(inner, "basic_optimizer", None) or trainer.optimizer).__name__,
        "deepspeed": use_ds,
        "world_size": training_args.world_size,
        "steps": trainer.state.global_step,
        "train_loss": float(train_output.training_loss),
        "final_logged_loss": _last(trainer.state.log_history, "loss"),
        "train_seconds": train_seconds,
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        "curvature": dho2.curvature_stats() if dho2 is not None else None,
    }
    summary["headline"] = summary["metrics"].get(task.headline_metric)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1, default=str))
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["log_history"] = trainer.state.log_history
    del trainer, model
    return summary


def _last(history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in history if key in entry]
    return float(values[-1]) if values else None


def run_recipe(task: Task, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the optimizers asked for, then plot and print the summary (rank 0)."""
    import torch

    names = OPTIMIZERS if args.optimizer == "both" else (args.optimizer,)
    if not args.no_deepspeed:
        single_process_launch()
    results = [run_one(name, task, args) for name in names]
    if is_main_process():
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k != "log_history"} for r in results]
        (out / "summary.json").write_text(json.dumps({"task": task.name, "runs": slim}, indent=1, default=str))
        if not args.no_plot:
            plot_losses(results, out / "loss_curves.png", title=task.name)
        print_summary(task, results, args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return results


def plot_losses(results: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Training loss (and evaluation loss, when logged) against step for each run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for result in results:
        history = result["log_history"]
        train = [(e["step"], e["loss"]) for e in history if "loss" in e]
        if train:
            line, = ax.plot(*zip(*train), label=f"{result['optimizer']} train")
            evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
            if evals:
                ax.plot(*zip(*evals), "o--", color=line.get_color(), label=f"{result['optimizer']} eval")
        refreshes = sorted({int(e["dho2/refresh_step"]) for e in history if "dho2/refresh_step" in e})
        for step in refreshes:
            ax.axvline(step, color="grey", alpha=0.25, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} (grey lines: DHO2 curvature refreshes)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_summary(task: Task, results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    width = 16
    keys = [task.headline_metric] + sorted(
        k for k in results[0]["metrics"] if k != task.headline_metric and not k.endswith(("_runtime", "per_second")))
    header = f"{'':<24}" + "".join(f"{r['optimizer'].upper():>{width}}" for r in results)
    lines = ["", f"== {task.name}: summary ==", header]

    def row(label: str, values: list[Any]) -> str:
        cells = []
        for value in values:
            if value is None:
                cells.append(f"{'-':>{width}}")
            elif isinstance(value, float):
                cells.append(f"{value:>{width}.4f}")
            else:
                cells.append(f"{str(value):>{width}}")
        return f"{label:<24}" + "".join(cells)

    lines.append(row("optimizer class", [r["optimizer_class"] for r in results]))
    lines.append(row("steps", [r["steps"] for r in results]))
    lines.append(row("mean train loss", [r["train_loss"] for r in results]))
    lines.append(row("last logged loss", [r["final_logged_loss"] for r in results]))
    for key in keys:
        lines.append(row(key, [r["metrics"].get(key) for r in results]))
    lines.append(row("train seconds", [r["train_seconds"] for r in results]))
    curvature = [r["curvature"] or {} for r in results]
    if any(curvature):
        lines.append(row("curvature refreshes", [c.get("refresh_count") for c in curvature]))
        lines.append(row("top eigenvalue", [max(c["eigenvalues"]) if c.get("eigenvalues") else None
                                            for c in curvature]))
        lines.append(row("subspace grad fraction", [c.get("subspace_grad_fraction") for c in curvature]))
    where = "DeepSpeed" if not args.no_deepspeed else "plain Trainer"
    lines.append(f"({where}, world size {results[0]['world_size']}; outputs in {args.output_dir})")
    print("\n".join(lines), flush=True)


def perplexity(metrics: dict) -> dict:
    loss = metrics.get("eval_loss")
    return {} if loss is None else {"eval_perplexity": math.exp(min(loss, 50.0))}
