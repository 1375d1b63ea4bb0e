"""Does DHO2 help this training run? A probe of the quantities that decide it (docs/design.md, "Where hybrid
order pays").

From Python, at the current parameters and on the current batch::

    from ds_dho2.probe import probe_training
    report = probe_training(model, lambda: model(x, y), optimizer,
                            batches=[lambda i=i: model(x[i::8], y[i::8]) for i in range(8)], batch_size=len(x))
    print(report)            # a few lines and the verdict
    report.as_dict()         # the numbers, JSON-serialisable

From the command line, on an unmodified script: ``ds-dho2 probe [--steps N] [--max-rank K] [--output
report.json] SCRIPT [ARGS...]`` (:mod:`ds_dho2.probe.hooks` finds the model, loss and optimizer).

The report holds the top of the Hessian spectrum and how many outliers stand above its bulk (the rank DHO2
should use), the share of the base optimizer's last step inside that subspace, ``lr x lambda_max`` in the
base optimizer's own metric against its stability limit, the gradient noise scale against the batch size,
an estimate of DHO2's cost per step, and a verdict (:mod:`ds_dho2.probe.report`). The math is in
:mod:`ds_dho2.probe.measures`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Sequence

import torch

from ds_dho2.config import HVPMethod
from ds_dho2.hvp import LossNotFoundError, ProductInputs, StrategyChooser, open_session
from ds_dho2.hvp.strategies import ProductSession, hvp_context
from ds_dho2.probe import measures
from ds_dho2.probe.hooks import (BaseOptimizer, ProbeError, StepRecorder, TrainingCapture, last_step_from_state,
                                 read_base_optimizer)
from ds_dho2.probe.report import (DEFAULT_RANK, EIGENVALUE_FLOOR, OUTLIER_GAP, REFRESH_INTERVAL, ProbeReport,
                                  batch_noise_scale, judge)

logger = logging.getLogger(__name__)

LossClosure = Callable[[], torch.Tensor]
#: exact product strategies tried in turn when the requested one fails on a model, then finite differences
_FALLBACKS = (HVPMethod.REVERSE, HVPMethod.FORWARD, HVPMethod.FINITE_DIFFERENCE)


def probe_training(model: torch.nn.Module, loss_closure: LossClosure, optimizer: Any, *,
                   batches: Sequence[LossClosure] | None = None, batch_size: float | None = None,
                   chunk_size: float | None = None, dataset_size: float | None = None, max_rank: int = 32,
                   lanczos_order: int | None = None,
                   metric_order: int | None = None, last_step: torch.Tensor | None = None,
                   step_seconds: float | None = None, step: int | None = None, hvp: str = "reverse",
                   lanczos_dtype: torch.dtype = torch.float32, seed: int = 0) -> ProbeReport:
    """Probe a run at the model's current parameters on the current batch; returns a :class:`ProbeReport`.

    * ``model``: the module whose trainable parameters the optimizer updates (for a DeepSpeed engine,
      ``engine.module``; ZeRO stages 0-2).
    * ``loss_closure()``: the mean loss of the current batch, differentiable in the parameters (every
      curvature product and gradient runs with dropout off and math attention, ``hvp_context``).
    * ``optimizer``: the run's optimizer (torch AdamW/Adam/SGD, DeepSpeed's Adam kernels, DHO2, a
      DeepSpeed engine or ZeRO optimizer, accelerate's wrapper): its learning rate, momentum and (AdamW)
      second moments give the stability test.
    * ``batches``: closures of the mean loss on equal, disjoint chunks of a batch (for the noise scale:
      the chunks are the small batches, their union the big one); ``chunk_size``: examples per chunk
      (default ``batch_size / len(batches)``); ``batch_size``: the examples one optimizer step averages
      over, the ``B`` compared with ``B_noise``. Without ``batches`` the noise scale is not measured.
      ``dataset_size``: the number of training examples batches are drawn from, if known; the noise a
      batch meets is then ``B_noise (1 - B/N)`` (none at full batch).
    * ``max_rank``: the largest subspace considered; the outlier rule looks at the top ``max_rank``
      eigenvalues (choose it above the number of classes). ``lanczos_order``: products for the Hessian
      (default ``2 max_rank + 16``, capped at the parameter count); ``metric_order``: products for the
      top of AdamW's preconditioned Hessian (default 32). The Lanczos basis holds ``order x P`` numbers
      in ``lanczos_dtype``.
    * ``last_step``: the parameter change of the last optimizer step (flat, in ``model.parameters()``
      order over the trainable ones), e.g. from :class:`~ds_dho2.probe.hooks.StepRecorder`; default:
      rebuilt from the optimizer's state where that is exact (:func:`~ds_dho2.probe.hooks.last_step_from_state`).
    * ``step_seconds``: the wall time of one training step, for the cost estimate (default: one timed
      gradient of ``loss_closure``, a lower bound); ``step``: the step number, for the report.
    * ``hvp``: the product strategy (``reverse``, ``forward``, ``finite_difference`` or ``auto``);
      when an exact one fails on the model the next is tried.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ProbeError("the model has no trainable parameters; probe the model the optimizer trains.")
    if max_rank < 1:
        raise ValueError(f"Invalid {max_rank=}. Must be >= 1.")
    n = sum(p.numel() for p in params)
    device = params[0].device
    notes: list[str] = []
    base = read_base_optimizer(optimizer, params)
    if last_step is None:
        last_step = last_step_from_state(optimizer, params)
        if last_step is None:
            notes.append("the last step was not recorded and cannot be rebuilt from this optimizer's state; "
                         "pass last_step (ds_dho2.probe.hooks.StepRecorder records it)")
    loss = _loss_value(model, loss_closure)
    order = min(n, lanczos_order if lanczos_order is not None else 2 * max_rank + 16)
    session = _open_session(model, params, loss_closure, hvp, order, seed)
    try:
        matvec = measures.operator_from_products(session, params)
        spectrum = measures.lanczos_spectrum(matvec, n, order, seed=seed, dtype=lanczos_dtype, device=device)
        values = spectrum.values
        outliers = measures.outlier_count(values, max_rank, OUTLIER_GAP, EIGENVALUE_FLOOR)
        rank = outliers or min(DEFAULT_RANK, max(1, values.numel()))
        gaps = [measures.gap(values, i) for i in range(1, min(max_rank, values.numel() - 1) + 1)]
        outlier_gap = measures.gap(values, outliers) if outliers else max(gaps, default=float("nan"))
        lift = _lift(values, rank)
        vectors = spectrum.vectors(rank)
        share = measures.subspace_share(vectors, last_step.to(vectors.device)) if last_step is not None else None
        projection = measures.projection_seconds(vectors)
        product_seconds = spectrum.seconds / max(spectrum.iterations, 1)
        del vectors
        spectrum.release()
        metric_lambda = _metric_lambda_max(base, matvec, spectrum, n, metric_order, seed, lanczos_dtype, device,
                                           notes)
    finally:
        session.close()
    noise = _noise(model, params, batches, batch_size, chunk_size, notes)
    gradient_seconds = _gradient_seconds(model, params, loss_closure)
    if step_seconds is None:
        step_seconds = gradient_seconds
        notes.append("step time taken as one gradient of the batch (a lower bound of a training step), so the "
                     "cost is an upper bound")
    step_cost = measures.dho2_step_overhead(rank, product_seconds, projection, step_seconds, REFRESH_INTERVAL)
    lr_lambda = base.lr * metric_lambda if metric_lambda is not None else None
    ratio = (lr_lambda / base.stability_limit if lr_lambda is not None and base.stability_limit else None)
    if base.family is None:
        notes.append(f"{base.name} is neither AdamW-like nor SGD / heavy-ball: no stability limit is known for it")
    if spectrum.iterations < order:
        notes.append(f"Lanczos stopped after {spectrum.iterations} of {order} products ({spectrum.stop_reason})")
    regime, verdict = judge(batch_size=batch_size, noise_scale=None if noise is None else noise.b_noise,
                            noise_big_batch=None if noise is None else noise.big, stability_ratio=ratio,
                            outliers=outliers, subspace_rank=rank, lift=lift, step_cost=step_cost, max_rank=max_rank,
                            dataset_size=dataset_size)
    report = ProbeReport(
        step=step, parameters=n, loss=loss, optimizer=base.name, base=base.family, lr=base.lr,
        batch_size=None if batch_size is None else float(batch_size),
        dataset_size=None if not dataset_size else float(dataset_size), max_rank=max_rank,
        eigenvalues=[float(v) for v in values[: max_rank + 1]], lanczos_products=spectrum.iterations,
        outliers=outliers, outlier_gap=outlier_gap, subspace_rank=rank, subspace_share=share, metric=base.metric,
        metric_lambda_max=metric_lambda, lr_lambda_max=lr_lambda, stability_limit=base.stability_limit,
        stability_ratio=ratio, noise_scale=None if noise is None else noise.b_noise,
        batch_noise_scale=None if noise is None else batch_noise_scale(noise.b_noise, batch_size, dataset_size),
        trace_sigma=None if noise is None else noise.trace_sigma, grad_sq=None if noise is None else noise.grad_sq,
        noise_chunks=None if noise is None else noise.chunks, chunk_size=None if noise is None else noise.small,
        gradient_seconds=gradient_seconds, product_seconds=product_seconds, projection_seconds=projection,
        step_seconds=step_seconds, step_cost=step_cost, regime=regime, verdict=verdict, notes=notes)
    logger.debug("DHO2 probe: %s", verdict)
    return report


def _loss_value(model: torch.nn.Module, loss_closure: LossClosure) -> float:
    try:
        with hvp_context(model), torch.no_grad():
            loss = loss_closure()
    except LossNotFoundError as error:
        raise ProbeError(" ".join(str(error).split())) from error
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise ProbeError(f"the loss closure returned {type(loss).__name__}, not a scalar tensor; return the batch's "
                         "mean loss.")
    value = float(loss)
    if not math.isfinite(value):
        raise ProbeError(f"the loss is {value} on the captured batch; probe at a step where training is finite.")
    return value


def _open_session(model: torch.nn.Module, params: list[torch.Tensor], loss_closure: LossClosure, hvp: str,
                  order: int, seed: int) -> ProductSession:
    """A product session on the batch: ``hvp`` itself, or (when it fails on this model) the next exact
    strategy, then finite differences. ``auto`` measures them (``StrategyChooser``)."""
    method = HVPMethod(str(hvp).lower())
    inputs = ProductInputs(model=model, params=params, replay=loss_closure, full_replay=loss_closure)
    if method is HVPMethod.AUTO:
        return StrategyChooser(method, seed=seed).open(inputs, expected_products=order)
    candidates = [method] + [m for m in _FALLBACKS if m is not method]
    probe = [torch.ones_like(p) for p in params]
    errors = []
    for candidate in candidates:
        try:
            session = open_session(candidate, inputs)
            product = session(probe)
        except ProbeError:
            raise
        except Exception as error:  # noqa: BLE001 - a strategy that fails on this model: try the next one
            errors.append(f"{candidate.value}: {type(error).__name__}: {error}")
            continue
        if all(bool(torch.isfinite(t).all()) for t in product):
            if candidate is not method:
                logger.warning("DHO2 probe: hvp %s failed on this model (%s); using %s.", method.value, errors[0],
                               candidate.value)
            return session
        session.close()
        errors.append(f"{candidate.value}: non-finite products")
    raise ProbeError("no Hessian-vector product works on this model (" + "; ".join(errors)[:400] + ").")


def _lift(values: torch.Tensor, rank: int) -> float | None:
    """``|lambda_1| / |lambda_{rank+1}|``: how far removing the top ``rank`` directions raises the top."""
    if values.numel() <= rank:
        return None
    below = abs(float(values[rank]))
    return abs(float(values[0])) / below if below > 0 else math.inf


def _metric_lambda_max(base: BaseOptimizer, matvec: Callable[[torch.Tensor], torch.Tensor],
                       spectrum: measures.Spectrum, n: int, metric_order: int | None, seed: int,
                       dtype: torch.dtype, device: torch.device, notes: list[str]) -> float | None:
    """The top eigenvalue in the base optimizer's metric: of ``D^-1/2 H D^-1/2`` for AdamW (its own Lanczos
    run), of ``H`` for heavy-ball (the largest Ritz value of the Hessian run)."""
    if base.family == "heavyball":
        return spectrum.largest
    if base.family != "adamw":
        return None
    if base.denominator is None:
        notes.append(f"{base.name} has taken no step yet, so its second moments (and its metric) are unknown")
        return None
    scale = base.denominator.to(device=device, dtype=torch.float64).rsqrt().to(dtype)
    order = min(n, metric_order if metric_order is not None else 32)
    metric = measures.lanczos_spectrum(measures.preconditioned(matvec, scale), n, order, seed=seed + 1, dtype=dtype,
                                       device=device)
    metric.release()
    return metric.largest


def _gradient(model: torch.nn.Module, params: list[torch.Tensor], closure: LossClosure) -> torch.Tensor:
    with hvp_context(model):
        grads = torch.autograd.grad(closure(), params, allow_unused=True)
    return measures.flat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)],
                         dtype=torch.float32)


def _gradient_seconds(model: torch.nn.Module, params: list[torch.Tensor], closure: LossClosure) -> float:
    """The faster of two timed gradients of the whole batch."""
    best = math.inf
    for _ in range(2):
        started = time.perf_counter()
        _gradient(model, params, closure).sum().item()
        best = min(best, time.perf_counter() - started)
    return best


def _noise(model: torch.nn.Module, params: list[torch.Tensor], batches: Sequence[LossClosure] | None,
           batch_size: float | None, chunk_size: float | None, notes: list[str]) -> measures.NoiseScale | None:
    if not batches or len(batches) < 2:
        notes.append("noise scale not measured: it needs the loss of at least two chunks of the batch (batches=)")
        return None
    if chunk_size is None:
        if batch_size is None:
            notes.append("noise scale not measured: give chunk_size or batch_size")
            return None
        chunk_size = batch_size / len(batches)
    gradients = (_gradient(model, params, closure) for closure in batches)  # one at a time
    return measures.chunk_noise_scale(gradients, float(chunk_size))


__all__ = ["ProbeError", "ProbeReport", "StepRecorder", "TrainingCapture", "probe_training"]
