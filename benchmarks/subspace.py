"""Why DHO2 saves no steps on the suite's tasks: how much of AdamW's step lies in the curvature subspace.

DHO2 can only change a run through the top-k Hessian eigendirections it tracks. This benchmark follows
an AdamW trajectory (one process, the convergence suite's global batch, budget and AdamW's best lr) and,
at evenly spaced steps, computes on that step's batch the top eigenpairs of

* the Hessian ``H`` (largest magnitude, as DHO2 selects them), and
* AdamW's preconditioned Hessian ``D^-1/2 H D^-1/2`` with ``D = sqrt(v_hat) + eps`` (AdamW's own
  denominator at that step): the curvature AdamW's step actually feels,

to a relative tolerance of 1e-3 (ARPACK on autograd Hessian-vector products). Per probe it records

* ``grad_share`` and ``update_share``: ``||V x||^2 / ||x||^2`` for the gradient and for AdamW's actual
  step, ``V`` the top-k eigenvectors (for ``D^-1/2 H D^-1/2``: in the coordinates ``z = D^1/2 x``);
* ``adam_over_newton``: AdamW's move along each eigenvector divided by a full Newton step along it;
* ``newton_gain``: the quadratic-model decrease ``sum_i (v_i . g)^2 / (2 |lambda_i|)`` of a full Newton step
  in the subspace, next to the batch loss: the most a perfect curvature step could add per step, for the
  probe batch's gradient and (``newton_gain_mean_gradient``) for the mean gradient of 8 other batches,
  which separates the persistent part of the gain from the part that only fits the probe batch's noise;
* for ``D^-1/2 H D^-1/2``: ``lr * lambda_max`` against AdamW's stability limit ``2 (1 + beta1) / (1 - beta1)``
  (38 at beta1 = 0.9) and the spectral gap ``lambda_1 / lambda_{k+1}``: how far the base lr could rise if
  the top k directions were taken out of AdamW's hands.

A second part trains the digits MLP with the whole training set as the batch (no gradient noise), AdamW
and DHO2's defaults from the same initialisation over an lr grid, to check that the absence of a step
gain is not an artefact of small batches. Results: ``benchmarks/results/subspace.json`` and ``.png``.

    python -m benchmarks subspace [--quick] [--tasks digits,charlm] [--probes 6]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, pyplot, write_results
from benchmarks.tasks import Task, epoch_order, make_tasks, setup_task

#: AdamW's best lr per task in the convergence suite (``convergence_<task>.json``, 3 seeds, W=2)
SUITE_ADAMW_LR = {"digits": 1.0125e-2, "charlm": 3e-3, "sst2": 3e-4}
RANK = 4  # DHO2's default rank
MEAN_GRADIENT_BATCHES = 8  # other batches whose mean gradient gives the persistent Newton gain
EXTRA = 4  # eigenpairs beyond the rank, for the spectral gap lambda_1 / lambda_{k+1}
BETA1 = 0.9
STABILITY_LIMIT = 2 * (1 + BETA1) / (1 - BETA1)


def top_eigenpairs(operator: Callable[[torch.Tensor], torch.Tensor], n: int, count: int,
                   which: str = "LM") -> tuple[np.ndarray, np.ndarray]:
    """``count`` eigenpairs of a symmetric operator on R^n (ARPACK, tolerance 1e-3), in descending order
    of ``|lambda|`` (``which="LM"``) or of ``lambda`` (``"LA"``): values (count,) and vectors (n, count)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    def matvec(v: np.ndarray) -> np.ndarray:
        return operator(torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(-1))).double().numpy()

    values, vectors = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=count, which=which,
                            tol=1e-3, v0=np.ones(n) / math.sqrt(n))
    order = np.argsort(-np.abs(values) if which == "LM" else -values)
    return values[order], vectors[:, order]


_flat = torch.nn.utils.parameters_to_vector  # any sequence of tensors -> one flat vector


def _unflat(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [chunk.view_as(t) for chunk, t in zip(vector.split([t.numel() for t in like]), like)]


def subspace_measures(values: np.ndarray, vectors: np.ndarray, grad: torch.Tensor, step: torch.Tensor,
                      mean_grad: torch.Tensor, rank: int) -> dict[str, Any]:
    """The shares, Newton comparison and Newton gains of one probe (``grad``, ``step`` and ``mean_grad`` in
    the same coordinates as the eigenvectors)."""
    basis = torch.from_numpy(vectors[:, :rank].T.copy()).float()
    lam = torch.from_numpy(values[:rank].copy()).float()
    c_grad, c_step = basis @ grad, basis @ step
    newton = -c_grad / lam.abs()
    return {"grad_share": float(c_grad.square().sum() / grad.square().sum()),
            "update_share": float(c_step.square().sum() / step.square().sum()),
            "adam_over_newton": [float(a / b) for a, b in zip(c_step, newton)],
            "newton_gain": float((c_grad.square() / (2 * lam.abs())).sum()),
            "newton_gain_mean_gradient": float(((basis @ mean_grad).square() / (2 * lam.abs())).sum())}


def probe_trajectory(task: Task, lr: float, probes: int, steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Train with AdamW at ``lr`` and measure the subspaces at ``probes`` evenly spaced steps."""
    data = setup_task(task, 0, 1)
    steps = steps or task.steps
    order = epoch_order(data.train_rows, steps, task.micro_batch * 2, seed)
    other_rows = epoch_order(data.train_rows, MEAN_GRADIENT_BATCHES * probes, task.micro_batch * 2, seed + 1000)
    model = data.build_model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(BETA1, 0.999), weight_decay=task.weight_decay)
    probe_steps = sorted({max(1, round(steps * (i + 1) / probes)) for i in range(probes)})

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        args, kwargs = data.train_batch(rows)
        out = model(*args, **kwargs)
        return out.loss if hasattr(out, "loss") else out

    records = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        rows = order[step - 1]
        if step not in probe_steps:
            optimizer.zero_grad()
            batch_loss(rows).backward()
            optimizer.step()
            continue
        index = len(records)
        mean_grad = sum(_flat(torch.autograd.grad(batch_loss(other_rows[index * MEAN_GRADIENT_BATCHES + j]), params))
                        for j in range(MEAN_GRADIENT_BATCHES)) / MEAN_GRADIENT_BATCHES
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # double backward
            loss = batch_loss(rows)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            grad = _flat(grads).detach()
            if optimizer.state:
                states = [optimizer.state[p] for p in params]
                count = float(states[0]["step"])
                v_hat = _flat([s["exp_avg_sq"] for s in states]) / (1 - 0.999 ** count)
                scale = (v_hat.sqrt() + 1e-8).rsqrt()  # D^-1/2
            else:
                scale = torch.ones_like(grad)

            def hvp(vector: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
                product = torch.autograd.grad(grads, params, _unflat(vector * pre, params), retain_graph=True)
                return _flat(product) * pre

            ones = torch.ones_like(grad)
            h_values, h_vectors = top_eigenpairs(lambda v: hvp(v, ones), grad.numel(), RANK + EXTRA, "LM")
            p_values, p_vectors = top_eigenpairs(lambda v: hvp(v, scale), grad.numel(), RANK + EXTRA, "LA")
            del grads
        before = _flat([p.detach() for p in params]).clone()
        for p, g in zip(params, _unflat(grad, params)):  # the step uses the gradient the probe computed
            p.grad = g.clone()
        optimizer.step()
        step_vector = _flat([p.detach() for p in params]) - before
        hessian = subspace_measures(h_values, h_vectors, grad, step_vector, mean_grad, RANK)
        preconditioned = subspace_measures(p_values, p_vectors, grad * scale, step_vector / scale, mean_grad * scale,
                                           RANK)
        preconditioned.update(lr_times_max=float(lr * p_values[0]),
                              gap=float(p_values[0] / p_values[RANK]))
        records.append({"step": step, "batch_loss": float(loss.detach()),
                        "hessian_eigenvalues": h_values.tolist(), "hessian": hessian,
                        "preconditioned_eigenvalues": p_values.tolist(), "preconditioned": preconditioned})
        print(f"[subspace] {task.name} step {step}/{steps}: gradient share {hessian['grad_share']:.3f}, "
              f"AdamW step share {hessian['update_share']:.4f}, Newton gain / loss "
              f"{hessian['newton_gain'] / max(float(loss.detach()), 1e-12):.4f} (mean gradient "
              f"{hessian['newton_gain_mean_gradient'] / max(float(loss.detach()), 1e-12):.4f}); preconditioned lr*lambda_max "
              f"{preconditioned['lr_times_max']:.1f}, gap {preconditioned['gap']:.2f}", flush=True)
    return {"task": task.name, "lr": lr, "steps": steps, "global_batch": task.micro_batch * 2, "rank": RANK,
            "seconds": time.perf_counter() - started, "probes": records, "summary": _summary(records)}


def _summary(records: list[dict[str, Any]]) -> dict[str, float]:
    def mean(path: Callable[[dict], float]) -> float:
        return float(np.mean([path(r) for r in records]))

    return {"grad_share": mean(lambda r: r["hessian"]["grad_share"]),
            "update_share": mean(lambda r: r["hessian"]["update_share"]),
            "newton_gain_over_loss": mean(lambda r: r["hessian"]["newton_gain"] / max(r["batch_loss"], 1e-12)),
            "mean_gradient_newton_gain_over_loss": mean(
                lambda r: r["hessian"]["newton_gain_mean_gradient"] / max(r["batch_loss"], 1e-12)),
            "median_abs_adam_over_newton": float(np.median(np.abs(np.concatenate(
                [r["hessian"]["adam_over_newton"] for r in records])))),
            "preconditioned_update_share": mean(lambda r: r["preconditioned"]["update_share"]),
            "preconditioned_lr_times_max": mean(lambda r: r["preconditioned"]["lr_times_max"]),
            "preconditioned_gap": mean(lambda r: r["preconditioned"]["gap"]),
            "stability_limit": STABILITY_LIMIT}


def full_batch_digits(lrs: list[float], steps: int, seed: int = 0) -> list[dict[str, Any]]:
    """AdamW and DHO2's defaults on the digits MLP with the whole training set as every batch."""
    from benchmarks.tasks import DigitsMLP
    from ds_dho2 import DHO2
    from ds_dho2.data import load_digits_split

    x_train, y_train, x_val, y_val = load_digits_split(seed=0)
    rows = []
    for lr in lrs:
        row: dict[str, Any] = {"lr": lr}
        for method in ("adamw", "dho2"):
            torch.manual_seed(seed)
            model = DigitsMLP()
            optimizer = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if method == "adamw"
                         else DHO2(model.parameters(), lr=lr).attach(model))
            val_curve = []
            for _ in range(steps):
                optimizer.zero_grad()
                model(x_train, y_train).backward()
                optimizer.step()
                with torch.no_grad():
                    val_curve.append(float(model(x_val, y_val)))
            with torch.no_grad():
                row[method] = {"final_train_loss": float(model(x_train, y_train)),
                               "final_val_loss": val_curve[-1], "best_val_loss": min(val_curve)}
            if method == "dho2":
                basis = optimizer.tracker.basis
                row[method]["curvature_installs"] = 0 if basis is None else basis.version
        row["train_loss_ratio"] = row["dho2"]["final_train_loss"] / row["adamw"]["final_train_loss"]
        rows.append(row)
        print(f"[subspace] full-batch digits lr {lr:.4g}: final train loss AdamW {row['adamw']['final_train_loss']:.5f}"
              f" DHO2 {row['dho2']['final_train_loss']:.5f}; best val AdamW {row['adamw']['best_val_loss']:.4f}"
              f" DHO2 {row['dho2']['best_val_loss']:.4f}", flush=True)
    return rows


def plot(trajectories: list[dict[str, Any]], path: Any) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, run in enumerate(trajectories):
        steps, color = [r["step"] for r in run["probes"]], f"C{index}"
        axes[0].plot(steps, [r["hessian"]["grad_share"] for r in run["probes"]], "o-", color=color,
                     label=f"{run['task']}: gradient")
        axes[0].plot(steps, [r["hessian"]["update_share"] for r in run["probes"]], "s--", color=color,
                     label=f"{run['task']}: AdamW step")
        axes[1].plot(steps, [r["preconditioned"]["lr_times_max"] for r in run["probes"]], "o-", color=color,
                     label=f"{run['task']}: lr x lambda_max")
    axes[0].set(title=f"share in the top-{RANK} Hessian subspace", xlabel="step", ylabel="||V x||^2 / ||x||^2",
                yscale="log")
    axes[1].axhline(STABILITY_LIMIT, color="k", ls=":", label="AdamW stability limit (beta1 0.9)")
    axes[1].set(title="AdamW-preconditioned Hessian", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks subspace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits only, 60 steps, 2 probes (CI smoke test)")
    parser.add_argument("--tasks", default="digits,charlm")
    parser.add_argument("--probes", type=int, default=6)
    parser.add_argument("--output-name", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tasks = make_tasks()
    names = ["digits"] if args.quick else [t.strip() for t in args.tasks.split(",") if t.strip()]
    trajectories = [probe_trajectory(tasks[name], SUITE_ADAMW_LR[name], 2 if args.quick else args.probes,
                                     steps=60 if args.quick else None) for name in names]
    grid = [1e-3 * 1.5 ** i for i in range(0, 11, 5 if args.quick else 1)]
    full_batch = full_batch_digits(grid, 80 if args.quick else 300)
    name = args.output_name or ("subspace_quick" if args.quick else "subspace")
    payload = {"settings": {"rank": RANK, "extra_eigenpairs": EXTRA, "tolerance": 1e-3, "beta1": BETA1,
                            "suite_adamw_lr": SUITE_ADAMW_LR},
               "trajectories": trajectories, "full_batch_digits": full_batch,
               "full_batch_max_train_loss_ratio_deviation": max(abs(r["train_loss_ratio"] - 1) for r in full_batch)}
    path = write_results(name, payload)
    plot(trajectories, RESULTS_DIR / f"{name}.png")
    for run in trajectories:
        s = run["summary"]
        print(f"[subspace] {run['task']}: gradient share {s['grad_share']:.3f}, AdamW step share "
              f"{s['update_share']:.4f}, Newton gain / batch loss {s['newton_gain_over_loss']:.4f} (mean gradient "
              f"{s['mean_gradient_newton_gain_over_loss']:.4f}), "
              f"|AdamW / Newton| median {s['median_abs_adam_over_newton']:.2f}; preconditioned: step share "
              f"{s['preconditioned_update_share']:.3f}, lr*lambda_max {s['preconditioned_lr_times_max']:.1f} "
              f"(limit {STABILITY_LIMIT:.0f}), gap {s['preconditioned_gap']:.2f}")
    print(f"[subspace] results: {path}")
    return payload


if __name__ == "__main__":
    main()
