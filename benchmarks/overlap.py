"""Cost per step: DHO2 against AdamW in a lockstep race, with the curvature work broken down.

Every contestant trains its own copy of the same model from the same initial weights on the same batch
sequence; at each step the contestants take their step in a shuffled order, so all of them are timed
under the same machine conditions (the machines are noisy: only ratios within one run are reported).
A step is timed whole: ``zero_grad`` + forward + backward + optimizer step.

Contestants: ``adamw`` (``torch.optim.AdamW(foreach=True)``; under DeepSpeed its ``{"type": "AdamW",
"params": {"torch_adam": true}}``), ``dho2`` (the library defaults, blocking refreshes) and
``dho2_interleaved`` (the defaults with ``curvature.mode="interleaved"``). Figures per task:

* non-refresh step / AdamW step: medians over the steps without curvature products, once a basis is
  installed (the hybrid projection's cost);
* curvature amortised per step: the time of the product steps beyond a non-refresh step, summed, per
  step, in units of an AdamW step (the refresh cost at the default interval; the first, cold refresh is
  included);
* the same after the first refresh (which also times every HVP strategy and starts cold), and each
  refresh's cost in AdamW steps: first and later (mean);
* whole DHO2 step / AdamW step: total time over the run;
* slowest / median step of each contestant (refresh spikes; interleaved mode spreads them);
* HVP cost per strategy and batch fraction, in units of one full-batch gradient, and the strategy
  ``hvp="auto"`` chose.

    python -m benchmarks overlap [--quick] [--tasks charlm,digits] [--steps 600] [--world-size 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, pyplot, write_results

CONTESTANTS = ("adamw", "dho2", "dho2_interleaved")
SKIP = 5  # start-up steps left out of the medians


# --------------------------------------------------------------------------------------------- tasks
def charlm_task(quick: bool) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from ds_dho2.data import char_lm_blocks, load_tinyshakespeare

    blocks, tokenizer = char_lm_blocks(load_tinyshakespeare(), 64, split="train")
    layers, width = (1, 32) if quick else (3, 96)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=width, n_layer=layers, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        return GPT2LMHeadModel(config)

    def batch(generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        rows = blocks[torch.randint(0, len(blocks), (size,), generator=generator)][:, :-1]
        return {"input_ids": rows, "labels": rows}

    return {"name": "charlm", "description": f"char-level GPT-2 ({layers}x{width}, block 64) on tinyshakespeare",
            "build": build, "batch": batch, "batch_size": 16, "lr": 3e-3}


def digits_task(quick: bool) -> dict[str, Any]:
    from ds_dho2.data import load_digits_split

    x_train, y_train, _, _ = load_digits_split()

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                           torch.nn.GELU(), torch.nn.Linear(128, 10))

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.net(x), y)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return MLP()

    def batch(generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        rows = torch.randint(0, len(y_train), (size,), generator=generator)
        return {"x": x_train[rows], "y": y_train[rows]}

    return {"name": "digits", "description": "sklearn digits, MLP 64-128-128-10", "build": build, "batch": batch,
            "batch_size": 64, "lr": 1e-2}


TASKS = {"charlm": charlm_task, "digits": digits_task}


# ------------------------------------------------------------------------------------------ contestants
def dho2_params(name: str, lr: float, quick: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"lr": lr}
    if name == "dho2_interleaved":
        params["curvature"] = {"mode": "interleaved"}
    if quick:
        params.update(refresh_interval=8, warmup_steps=4)
        if name == "dho2_interleaved":
            params["curvature"]["iterations_per_step"] = 2
    return params


class Contestant:
    """One optimizer training its own model copy; ``step(batch)`` returns (seconds, took products)."""

    def __init__(self, name: str, task: dict, quick: bool, world: int, rank: int) -> None:
        from ds_dho2 import DHO2

        self.name, self.world, self.rank = name, world, rank
        self.model = task["build"]()
        self.engine = None
        if world > 1:
            import deepspeed

            optimizer = ({"type": "AdamW", "params": {"lr": task["lr"], "torch_adam": True}} if name == "adamw" else
                         {"type": "DHO2", "params": dho2_params(name, task["lr"], quick)})
            config = {"train_micro_batch_size_per_gpu": task["batch_size"] // world, "optimizer": optimizer,
                      "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}
            self.engine, *_ = deepspeed.initialize(model=self.model, config=config)
            self.optimizer = self.engine.basic_optimizer
        elif name == "adamw":
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=task["lr"], foreach=True)
        else:
            self.optimizer = DHO2(self.model.parameters(), **dho2_params(name, task["lr"], quick)).attach(self.model)
        self.is_dho2 = name != "adamw"
        self.times: list[float] = []
        self.product_steps: list[bool] = []
        self.basis_steps: list[bool] = []

    def _products_step(self) -> int:
        if not self.is_dho2:
            return -1
        return self.optimizer.tracker.state.last_products_step

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        if self.world > 1:
            per = next(iter(batch.values())).shape[0] // self.world
            batch = {k: v[self.rank * per:(self.rank + 1) * per] for k, v in batch.items()}
        before = self._products_step()
        started = time.perf_counter()
        if self.engine is not None:
            out = self.engine(**batch)
            loss = out if torch.is_tensor(out) else out.loss
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.optimizer.zero_grad()
            out = self.model(**batch)
            (out if torch.is_tensor(out) else out.loss).backward()
            self.optimizer.step()
        self.times.append(time.perf_counter() - started)
        self.product_steps.append(self._products_step() != before)
        self.basis_steps.append(self.is_dho2 and self.optimizer.eigenvalues is not None)


def race(task: dict, steps: int, quick: bool, world: int = 1, rank: int = 0) -> dict[str, Any]:
    contestants = [Contestant(name, task, quick, world, rank) for name in CONTESTANTS]
    generator = torch.Generator().manual_seed(1)
    shuffler = random.Random(2)  # the same order on every rank
    for _ in range(steps):
        batch = task["batch"](generator, task["batch_size"])
        order = list(contestants)
        shuffler.shuffle(order)
        for contestant in order:
            contestant.step(batch)
    out: dict[str, Any] = {}
    for c in contestants:
        entry: dict[str, Any] = {"times": c.times, "product_steps": c.product_steps, "basis_steps": c.basis_steps}
        if c.is_dho2:
            stats = c.optimizer.curvature_stats()
            entry["stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, list))}
            entry["hvp_report"] = stats.get("hvp_report")
        out[c.name] = entry
    return out


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    adamw = raw["adamw"]["times"]
    steps = len(adamw)
    adamw_median = statistics.median(adamw[SKIP:])
    summary: dict[str, Any] = {"adamw": {"median_step_s": adamw_median, "mean_step_s": statistics.fmean(adamw[SKIP:]),
                                         "slowest_over_median": max(adamw[SKIP:]) / adamw_median}}
    for name in CONTESTANTS[1:]:
        run = raw[name]
        times, products, basis = run["times"], run["product_steps"], run["basis_steps"]
        window = range(SKIP, steps)
        plain = [times[i] for i in window if not products[i] and basis[i]]
        plain_adamw = [adamw[i] for i in window if not products[i] and basis[i]]
        median_plain = statistics.median(plain) if plain else float("nan")
        median = statistics.median(times[SKIP:])
        excess = sum(max(0.0, times[i] - median_plain) for i in window if products[i])
        # the first refresh also times every HVP strategy (auto) and starts cold: reported apart, since a
        # long run amortises it away and the steady state is what each later refresh costs
        installed = next((i for i in range(steps) if basis[i]), steps)
        later = [i for i in window if i > installed]
        excess_later = sum(max(0.0, times[i] - median_plain) for i in later if products[i])
        refreshes = run["stats"].get("refresh_count", 0)
        summary[name] = {
            "median_step_s": median, "mean_step_s": statistics.fmean(times[SKIP:]),
            "slowest_over_median": max(times[SKIP:]) / median,
            "non_refresh_step_over_adamw": median_plain / statistics.median(plain_adamw) if plain_adamw else None,
            "curvature_amortised_over_adamw_step": excess / len(window) / adamw_median if plain else None,
            "whole_step_over_adamw": sum(times[SKIP:]) / sum(adamw[SKIP:]),
            "curvature_amortised_after_first_refresh": excess_later / len(later) / adamw_median if later and plain
            else None,
            "first_refresh_adamw_steps": (excess - excess_later) / adamw_median if plain else None,
            "later_refresh_adamw_steps": excess_later / adamw_median / (refreshes - 1) if plain and refreshes > 1
            else None,
            "slowest_over_median_after_first_refresh": max(times[i] for i in later) / median if later else None,
            "product_steps": sum(products), "refreshes": refreshes,
            "hvp_strategy": run["stats"].get("hvp_strategy"), "final_interval": run["stats"].get("refresh_interval"),
            "lanczos_iterations_last": run["stats"].get("lanczos_iterations"),
            "hvp_candidates": (run.get("hvp_report") or {}).get("candidates"),
        }
    return summary


# ------------------------------------------------------------------------------- multi-process (W > 1)
def _rank_race(rank: int, world: int, task_name: str, steps: int, quick: bool) -> dict[str, Any]:
    import ds_dho2  # noqa: F401 - registers DHO2

    torch.set_num_threads(1)
    return race(TASKS[task_name](quick), steps, quick, world, rank)


def race_distributed(task_name: str, steps: int, quick: bool, world: int) -> dict[str, Any]:
    """The race on ``world`` gloo ranks under DeepSpeed ZeRO-2; a step's time is the slowest rank's."""
    from ds_dho2.dist.local_ranks import run_ranks

    results = run_ranks(_rank_race, world, task_name, steps, quick, timeout=3600)
    merged = results[0]
    for name in CONTESTANTS:
        merged[name]["times"] = [max(r[name]["times"][i] for r in results) for i in range(len(merged[name]["times"]))]
    return merged


# ------------------------------------------------------------------------------------------- HVP cost
def hvp_costs(task: dict, fractions: tuple[float, ...]) -> dict[str, Any]:
    """Gradients per product of each strategy at each batch fraction, at the model's initial weights."""
    from benchmarks.curvature import product_seconds
    from ds_dho2.config import HVPMethod
    from ds_dho2.hvp.capture import slice_batch
    from ds_dho2.hvp.selection import ProductInputs, open_session
    from ds_dho2.hvp.strategies import hvp_context

    model = task["build"]()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = task["batch"](torch.Generator().manual_seed(3), task["batch_size"])

    def closure(fraction: float):
        args, kwargs = slice_batch((), batch, fraction)
        return lambda: (lambda out: out if torch.is_tensor(out) else out.loss)(model(*args, **kwargs))

    def gradient() -> None:
        with hvp_context(model):
            torch.autograd.grad(closure(1.0)(), params)

    gradient()
    unit = min(_seconds(gradient) for _ in range(5))
    out: dict[str, Any] = {"gradient_s": unit}

    class _View:  # what product_seconds needs
        pass

    view = _View()
    view.params = params
    for method in (HVPMethod.FINITE_DIFFERENCE, HVPMethod.REVERSE, HVPMethod.FORWARD):
        for fraction in fractions:
            session = open_session(method, ProductInputs(model=model, params=params, replay=closure(fraction)))
            out[f"{method.value}@{fraction:g}"] = product_seconds(session, view, repeats=5) / unit
            session.close()
    return out


def _seconds(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps (CI smoke test)")
    parser.add_argument("--tasks", default="charlm,digits")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 30
    results: dict[str, Any] = {}
    for name in args.tasks.split(","):
        task = TASKS[name](args.quick)
        started = time.perf_counter()
        raw = race_distributed(name, args.steps, args.quick, args.world_size) if args.world_size > 1 else \
            race(task, args.steps, args.quick)
        summary = analyse(raw)
        summary["hvp_cost_gradients"] = hvp_costs(task, (1.0, 0.5, 0.25, 0.125))
        results[name] = {"description": task["description"], "summary": summary,
                         "raw": {k: {"times": v["times"], "product_steps": v["product_steps"]} for k, v in raw.items()},
                         "seconds": time.perf_counter() - started}
        print_task(name, summary)
    suffix = ("_quick" if args.quick else "") + (f"_w{args.world_size}" if args.world_size > 1 else "")
    path = write_results(f"overlap{suffix}", {"settings": vars(args), "tasks": results})
    plot(results, RESULTS_DIR / f"overlap{suffix}.png")
    print("results:", path)
    return results


def print_task(name: str, summary: dict) -> None:
    def fmt(value: Any, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    print(f"\n== {name}: per-step cost (ratios to AdamW within this run) ==")
    print(f"{'contestant':<18}{'median ms':>10}{'slow/med':>9}{'(later)':>8}{'non-refresh':>12}{'curv amort':>11}"
          f"{'(later)':>8}{'whole':>7}{'refreshes':>10}{'hvp':>19}")
    a = summary["adamw"]
    print(f"{'adamw':<18}{1000 * a['median_step_s']:>10.1f}{a['slowest_over_median']:>9.2f}")
    for contestant in CONTESTANTS[1:]:
        s = summary[contestant]
        print(f"{contestant:<18}{1000 * s['median_step_s']:>10.1f}{s['slowest_over_median']:>9.2f}"
              f"{fmt(s['slowest_over_median_after_first_refresh']):>8}"
              f"{fmt(s['non_refresh_step_over_adamw']):>12}{fmt(s['curvature_amortised_over_adamw_step'], '.3f'):>11}"
              f"{fmt(s['curvature_amortised_after_first_refresh'], '.3f'):>8}"
              f"{fmt(s['whole_step_over_adamw']):>7}{s['refreshes']:>10}{str(s['hvp_strategy']):>19}")
    costs = summary["hvp_cost_gradients"]
    print("HVP cost (gradients per product):", {k: round(v, 2) for k, v in costs.items() if k != "gradient_s"})


def plot(results: dict, path: Any) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        for contestant, raw in result["raw"].items():
            ax.plot([1000 * t for t in raw["times"]], label=contestant, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("step wall time (ms)")
        s = result["summary"]
        ax.set_title(f"{name}: whole step {s['dho2']['whole_step_over_adamw']:.2f}x AdamW "
                     f"(interleaved slowest/median {s['dho2_interleaved']['slowest_over_median']:.2f})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
