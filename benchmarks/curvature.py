"""Curvature accuracy against cost: what each lever of the curvature tracker buys and what it loses.

A character-level GPT-2 is trained with AdamW; at several checkpoints along the run a reference top-k
eigenbasis is computed on a fixed batch (cold Lanczos of order 8k, float64 basis, exact reverse-mode
products on the whole batch). Against it, on the same batch and parameters:

* **basis precision**: cold Lanczos of order 2k with a float32 vs a float64 basis;
* **Lanczos order**: cold 2k vs 4k (exact products);
* **batch fraction**: finite-difference products on every 1st/2nd/4th/8th sample (the tracker's strided
  subset), cold order 4k -- eigenvalue error and cost per product in units of one full-batch gradient;
* **warm start**: from the previous checkpoint's eigenvectors, Lanczos seeded with them and stopped at a
  Ritz-residual tolerance (0.02 ... 0.2, capped at 2k), and a block Rayleigh-Ritz on [V, HV] (2k products):
  products used, eigenvalue error and mean squared principal cosine with the reference;
* **noise floor**: the reference on a *different* batch at the same parameters (what a training step's
  batch changes anyway).

Eigenvalue error = max over the top-k of |lambda - lambda_ref| / |lambda_ref| (matched by rank);
subspace agreement = ||V V_ref^T||_F^2 / k (1 = same subspace); the summary gives medians over the
checkpoints.

    python -m benchmarks curvature [--quick] [--rank 8] [--checkpoints 5] [--spacing 25]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, pyplot, write_results
from ds_dho2.config import HVPMethod
from ds_dho2.core.lanczos import LanczosRun
from ds_dho2.curvature.operator import hessian_operator, random_start_vector, warm_start_vector
from ds_dho2.data import char_lm_blocks, load_tinyshakespeare
from ds_dho2.dist.comm import LocalCommunicator
from ds_dho2.dist.layout import ShardLayout
from ds_dho2.hvp.capture import slice_batch
from ds_dho2.hvp.selection import ProductInputs, open_session
from ds_dho2.hvp.strategies import hvp_context

COMM = LocalCommunicator()


def build_model(vocab: int, block: int, layers: int, width: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=width, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


class Problem:
    """A model at fixed parameters and a batch: sessions, operators and timings on it."""

    def __init__(self, model: torch.nn.Module, batch: torch.Tensor) -> None:
        self.model, self.batch = model, batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.layout = ShardLayout.unsharded(self.params)

    def closure(self, fraction: float = 1.0):
        args, kwargs = slice_batch((), {"input_ids": self.batch, "labels": self.batch}, fraction)
        return lambda: self.model(*args, **kwargs).loss

    def session(self, method: HVPMethod, fraction: float = 1.0):
        closure = self.closure(fraction)
        return open_session(method, ProductInputs(model=self.model, params=self.params, replay=closure))

    def gradient_seconds(self, repeats: int = 3) -> float:
        closure = self.closure()

        def gradient() -> None:
            with hvp_context(self.model):
                torch.autograd.grad(closure(), self.params)

        gradient()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            gradient()
            times.append(time.perf_counter() - started)
        return min(times)

    def lanczos(self, session, order: int, dtype: torch.dtype, start: torch.Tensor | None = None,
                tolerance: float | None = None, rank: int | None = None, seed: int = 0) -> LanczosRun:
        operator = hessian_operator(session, self.layout, COMM)
        if start is None:
            start = random_start_vector(self.layout, seed, dtype, self.params[0].device)
        run = LanczosRun.start(start.to(dtype), order, COMM, rank=rank, tolerance=tolerance)
        return run.run(operator, COMM)


def top_pairs(run: LanczosRun, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    selection = run.selection(rank, 1e-4)
    return selection.values, run.lift(selection.coefficients).double()


def compare(values: torch.Tensor, vectors: torch.Tensor, ref_values: torch.Tensor, ref_vectors: torch.Tensor) -> dict:
    """Eigenvalue errors and subspace agreement of an estimate against the reference.

    ``eigenvalue_error``: max over the top-k of the relative error, pairs matched by magnitude rank (a k-th
    pair of the other sign counts as an error near 2); ``top4_error``: for each of the reference's 4
    largest-magnitude eigenvalues the relative distance to the nearest estimated one, maximised (what the
    dominant directions' Newton steps see)."""
    n = min(values.numel(), ref_values.numel())
    order, ref_order = torch.argsort(values.abs(), descending=True)[:n], torch.argsort(ref_values.abs(), descending=True)[:n]
    error = ((values[order] - ref_values[ref_order]).abs() / ref_values[ref_order].abs()).max()
    top = ref_values[ref_order[:4]]
    nearest = ((values[:, None] - top[None, :]).abs().min(dim=0).values / top.abs()).max()
    overlap = (vectors.double() @ ref_vectors.double().t()).square().sum() / ref_vectors.shape[0]
    return {"eigenvalue_error": float(error), "top4_error": float(nearest), "subspace_agreement": float(overlap),
            "pairs": int(values.numel()), "values": values.tolist()}


def block_rayleigh_ritz(problem: Problem, session, previous: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rayleigh-Ritz on span[V, H V] (orthonormalised): 2k products."""
    operator = hessian_operator(session, problem.layout, COMM)
    block = previous.double()
    products = torch.stack([operator(v.float()).double() for v in block])
    basis, _ = torch.linalg.qr(torch.cat([block, products]).t())
    basis = basis.t()
    applied = torch.stack([operator(v.float()).double() for v in basis])
    small = basis @ applied.t()
    values, coefficients = torch.linalg.eigh(0.5 * (small + small.t()))
    chosen = torch.argsort(values.abs(), descending=True)[:rank]
    return values[chosen], coefficients[:, chosen].t() @ basis, 2 * block.shape[0] + basis.shape[0] - block.shape[0]


def product_seconds(session, problem: Problem, repeats: int = 3) -> float:
    vectors = [torch.randn_like(p) for p in problem.params]
    session(vectors)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session(vectors)
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resummarise", action="store_true",
                        help="recompute the summary and plot of the last results JSON without training")
    parser.add_argument("--quick", action="store_true", help="a tiny model and two checkpoints (CI smoke test)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=150, help="AdamW steps before the first checkpoint")
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--spacing", type=int, default=25, help="training steps between checkpoints")
    args = parser.parse_args(argv)
    if args.resummarise:
        import json

        name = "curvature_quick" if args.quick else "curvature"
        payload = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        payload["summary"] = summarise(payload["checkpoints"])
        (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        plot(payload["summary"], RESULTS_DIR / f"{name}.png")
        print_summary(payload["summary"])
        return payload["summary"]
    if args.quick:
        args.layers, args.width, args.train_steps, args.checkpoints, args.spacing, args.rank = 1, 32, 10, 2, 5, 2
    torch.manual_seed(0)
    k = args.rank
    blocks, tokenizer = char_lm_blocks(load_tinyshakespeare(), args.block_size, split="train")
    model = build_model(tokenizer.vocab_size, args.block_size, args.layers, args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)

    def train(steps: int) -> None:
        for _ in range(steps):
            batch = blocks[torch.randint(0, len(blocks), (16,), generator=generator)][:, :-1]
            optimizer.zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()

    fractions = [1.0, 0.5, 0.25, 0.125]
    tolerances = [0.02, 0.05, 0.1, 0.2]
    records: list[dict[str, Any]] = []
    previous_vectors = None
    train(args.train_steps)
    for index in range(args.checkpoints):
        step = args.train_steps + index * args.spacing
        batch = blocks[torch.randint(0, len(blocks), (args.batch,), generator=generator)][:, :-1]
        other = blocks[torch.randint(0, len(blocks), (args.batch,), generator=generator)][:, :-1]
        problem = Problem(model, batch)
        record: dict[str, Any] = {"step": step, "parameters": problem.layout.total_numel}
        exact = problem.session(HVPMethod.REVERSE)
        reference = problem.lanczos(exact, 8 * k, torch.float64, seed=step)
        ref_values, ref_vectors = top_pairs(reference, k)
        record["reference_eigenvalues"] = ref_values.tolist()
        record["order_2k_float64"] = compare(*top_pairs(problem.lanczos(exact, 2 * k, torch.float64, seed=step + 1), k),
                                             ref_values, ref_vectors)
        record["order_2k_float32"] = compare(*top_pairs(problem.lanczos(exact, 2 * k, torch.float32, seed=step + 1), k),
                                             ref_values, ref_vectors)
        record["order_4k_float32"] = compare(*top_pairs(problem.lanczos(exact, 4 * k, torch.float32, seed=step + 1), k),
                                             ref_values, ref_vectors)
        exact.close()
        other_problem = Problem(model, other)
        other_session = other_problem.session(HVPMethod.REVERSE)
        record["noise_floor_other_batch"] = compare(*top_pairs(other_problem.lanczos(other_session, 8 * k, torch.float64,
                                                                                      seed=step), k),
                                                    ref_values, ref_vectors)
        other_session.close()
        gradient = problem.gradient_seconds()
        record["gradient_seconds"] = gradient
        record["batch_fraction"] = {}
        for fraction in fractions:
            session = problem.session(HVPMethod.FINITE_DIFFERENCE, fraction)
            seconds = product_seconds(session, problem)
            run = problem.lanczos(session, 4 * k, torch.float32, seed=step + 2)
            record["batch_fraction"][str(fraction)] = {**compare(*top_pairs(run, k), ref_values, ref_vectors),
                                                       "gradients_per_product": seconds / gradient}
            session.close()
        record["strategies"] = {}
        for method in (HVPMethod.FINITE_DIFFERENCE, HVPMethod.REVERSE, HVPMethod.FORWARD):
            for fraction in (1.0, 0.25):
                try:
                    session = problem.session(method, fraction)
                except Exception as error:  # noqa: BLE001
                    record["strategies"][f"{method.value}@{fraction}"] = {"error": str(error)}
                    continue
                started = time.perf_counter()
                opened = problem.session(method, fraction)
                open_seconds = time.perf_counter() - started
                opened.close()
                record["strategies"][f"{method.value}@{fraction}"] = {
                    "gradients_per_product": product_seconds(session, problem) / gradient,
                    "session_open_gradients": open_seconds / gradient}
                session.close()
        if previous_vectors is not None:
            record["warm_start"] = {}
            session = problem.session(HVPMethod.FINITE_DIFFERENCE, 0.25)
            for tolerance in tolerances:
                for noise in (0.0, 0.1, 0.3):
                    random = random_start_vector(problem.layout, step + 3, torch.float32, batch.device)
                    start = warm_start_vector(previous_vectors.float(), random, noise, COMM)
                    run = problem.lanczos(session, 2 * k, torch.float32, start=start, tolerance=tolerance, rank=k)
                    record["warm_start"][f"lanczos tol={tolerance} noise={noise}"] = {
                        **compare(*top_pairs(run, k), ref_values, ref_vectors), "products": run.iterations}
            cold = problem.lanczos(session, 2 * k, torch.float32, seed=step + 4)
            record["warm_start"]["cold 2k (same products)"] = {**compare(*top_pairs(cold, k), ref_values, ref_vectors),
                                                               "products": cold.iterations}
            cold_tol = problem.lanczos(session, 2 * k, torch.float32, seed=step + 4, tolerance=0.05, rank=k)
            record["warm_start"]["cold 2k tol=0.05"] = {**compare(*top_pairs(cold_tol, k), ref_values, ref_vectors),
                                                        "products": cold_tol.iterations}
            values, vectors, products = block_rayleigh_ritz(problem, session, previous_vectors, k)
            record["warm_start"]["block Rayleigh-Ritz [V, HV]"] = {**compare(values, vectors, ref_values, ref_vectors),
                                                                   "products": products}
            record["warm_start"]["previous eigenvectors as they are"] = {
                "subspace_agreement": float((previous_vectors @ ref_vectors.t()).square().sum() / k)}
            session.close()
        previous_vectors = ref_vectors.clone()
        records.append(record)
        print(f"checkpoint {index + 1}/{args.checkpoints} (step {step}) done", flush=True)
        if index + 1 < args.checkpoints:
            train(args.spacing)
    summary = summarise(records)
    name = "curvature_quick" if args.quick else "curvature"
    path = write_results(name, {"settings": vars(args), "summary": summary, "checkpoints": records})
    plot(summary, RESULTS_DIR / f"{name}.png")
    print_summary(summary)
    print("results:", path)
    return summary


def _median(records: list[dict], *keys: str) -> float | None:
    """The median over checkpoints (one checkpoint whose k-th pair flips sign does not dominate it)."""
    values = []
    for record in records:
        value: Any = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    return statistics.median(values) if values else None


def summarise(records: list[dict]) -> dict:
    summary: dict[str, Any] = {}
    for key in ("order_2k_float64", "order_2k_float32", "order_4k_float32", "noise_floor_other_batch"):
        summary[key] = {m: _median(records, key, m) for m in ("eigenvalue_error", "top4_error", "subspace_agreement")}
    summary["batch_fraction"] = {f: {m: _median(records, "batch_fraction", f, m)
                                     for m in ("eigenvalue_error", "top4_error", "subspace_agreement",
                                               "gradients_per_product")}
                                 for f in records[0]["batch_fraction"]}
    summary["strategies"] = {s: {m: _median(records, "strategies", s, m)
                                 for m in ("gradients_per_product", "session_open_gradients")}
                             for s in records[0]["strategies"]}
    warm = [r for r in records if "warm_start" in r]
    if warm:
        summary["warm_start"] = {v: {m: _median(warm, "warm_start", v, m)
                                     for m in ("eigenvalue_error", "top4_error", "subspace_agreement", "products")}
                                 for v in warm[0]["warm_start"]}
    return summary


def print_summary(summary: dict) -> None:
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    print(f"{'variant':<44}{'eig err':>9}{'top-4':>7}{'subspace':>10}{'products':>10}{'grad/prod':>10}")
    for key in ("order_2k_float64", "order_2k_float32", "order_4k_float32", "noise_floor_other_batch"):
        s = summary[key]
        print(f"{key:<44}{fmt(s['eigenvalue_error']):>9}{fmt(s.get('top4_error')):>7}{fmt(s['subspace_agreement']):>10}")
    for fraction, s in summary["batch_fraction"].items():
        print(f"{'FD, batch fraction ' + fraction:<44}{fmt(s['eigenvalue_error']):>9}{fmt(s.get('top4_error')):>7}"
              f"{fmt(s['subspace_agreement']):>10}{'':>10}{fmt(s['gradients_per_product']):>10}")
    for name, s in summary["strategies"].items():
        print(f"{name:<44}{'':>9}{'':>10}{'':>10}{fmt(s['gradients_per_product']):>10}  open {fmt(s['session_open_gradients'])}")
    for name, s in summary.get("warm_start", {}).items():
        print(f"{name:<44}{fmt(s.get('eigenvalue_error')):>9}{fmt(s.get('top4_error')):>7}"
              f"{fmt(s['subspace_agreement']):>10}{fmt(s.get('products')):>10}")


def plot(summary: dict, path: Any) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fractions = summary["batch_fraction"]
    xs = [float(f) for f in fractions]
    axes[0].plot(xs, [fractions[f]["eigenvalue_error"] for f in fractions], "o-", label="eigenvalue error")
    axes[0].plot(xs, [1 - fractions[f]["subspace_agreement"] for f in fractions], "s-", label="1 - subspace agreement")
    axes[0].plot(xs, [fractions[f]["gradients_per_product"] for f in fractions], "^-", label="cost (gradients/product)")
    floor = summary["noise_floor_other_batch"]["eigenvalue_error"]
    if floor is not None:
        axes[0].axhline(floor, color="grey", ls="--", label="eigenvalue noise floor (other batch)")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("batch fraction of the products")
    axes[0].set_title("Batch fraction: accuracy vs cost")
    axes[0].legend(fontsize=8)
    warm = summary.get("warm_start", {})
    for name, s in warm.items():
        if s["products"] is not None and s["eigenvalue_error"] is not None:
            axes[1].scatter(s["products"], s["eigenvalue_error"], label=name)
    axes[1].set_xlabel("products per refresh")
    axes[1].set_ylabel("eigenvalue error vs reference")
    axes[1].set_title("Warm start: products vs accuracy")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
