"""The probe's quantities as pure math on operators and flat vectors (docs/design.md, "Where hybrid order pays").

Nothing here knows a model, an optimizer or a training loop: a symmetric operator is a ``matvec`` on flat
1-D tensors, gradients and steps are flat tensors. :func:`ds_dho2.probe.probe_training` feeds these
functions from a model and an optimizer; the unit tests feed them known matrices and vectors.

* :func:`lanczos_spectrum`: the top of a symmetric operator's spectrum with the project's own Lanczos
  (:class:`ds_dho2.core.lanczos.LanczosRun`, full reorthogonalisation), ordered by magnitude as DHO2
  selects its subspace.
* :func:`outlier_count`: how many eigenvalues stand above the bulk (the rank DHO2 should use).
* :func:`subspace_share`: ``||V V^T d|| / ||d||``, how much of a step lies in a subspace.
* :func:`preconditioned`, :func:`adam_stability_limit`, :func:`heavy_ball_stability_limit`: the
  curvature a base optimizer feels and the ``lr x lambda_max`` at which it turns unstable.
* :func:`noise_scale`: the "simple" gradient noise scale ``B_noise = tr(Sigma) / |G|^2`` of McCandlish et
  al. (2018) from gradients at two batch sizes.
* :func:`dho2_step_overhead`: what DHO2 adds to a step, from measured times.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Iterable, Sequence

import torch

from ds_dho2.core.spectrum import outlier_count  # noqa: F401 - the probe's rule is DHO2's own
from ds_dho2.core.lanczos import LanczosRun, MatVec
from ds_dho2.dist.comm import LocalCommunicator

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ spectrum
@dataclasses.dataclass
class Spectrum:
    """The Ritz values of one Lanczos run and the means to lift their vectors.

    ``values``: every Ritz value (float64, CPU), in decreasing order of ``|lambda|``; the leading ones are
    the converged top of the spectrum. ``iterations``: the products taken; ``seconds``: the run's wall
    time (products plus reorthogonalisation); ``stop_reason``: why it stopped (``"reached order"``,
    a breakdown on an operator of low rank, ...).
    """

    values: torch.Tensor
    iterations: int
    seconds: float
    stop_reason: str
    _run: LanczosRun | None = dataclasses.field(default=None, repr=False)
    _coefficients: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def vectors(self, k: int) -> torch.Tensor:
        """The unit Ritz vectors of the first ``k`` values, as rows (k x n), in the run's dtype."""
        if self._run is None or self._coefficients is None:
            raise ValueError("this spectrum has no Lanczos basis to lift vectors from")
        k = min(k, self._coefficients.shape[1])
        return self._run.lift(self._coefficients[:, :k])

    @property
    def largest(self) -> float:
        """The algebraically largest Ritz value (the top of the spectrum for stability questions)."""
        return float(self.values.max()) if self.values.numel() else float("nan")

    def release(self) -> None:
        """Drop the Lanczos basis (order x n numbers) once no more vectors are needed."""
        self._run = self._coefficients = None


def lanczos_spectrum(matvec: MatVec, n: int, order: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> Spectrum:
    """A cold, complete Lanczos run of ``order`` products (capped at ``n``) on the symmetric ``matvec``.

    The start vector is a Gaussian drawn on the CPU from ``seed``, so a probe repeats exactly. With full
    reorthogonalisation the extreme Ritz values converge first: at an order of two to three times the number
    of eigenvalues wanted, the top ones agree with the operator's to a few digits (the unit tests check this
    against ``torch.linalg.eigvalsh``). A breakdown (an operator of rank below ``order``) ends the run
    early with exact values.
    """
    order = max(1, min(int(order), int(n)))
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    start = torch.randn(n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    comm = LocalCommunicator()
    started = time.perf_counter()
    run = LanczosRun.start(start, order, comm).run(matvec, comm)
    seconds = time.perf_counter() - started
    selection = run.selection(run.iterations, 0.0)
    return Spectrum(values=selection.values.detach().cpu().double(), iterations=run.iterations, seconds=seconds,
                    stop_reason=run.stop_reason, _run=run, _coefficients=selection.coefficients)


def preconditioned(matvec: MatVec, scale: torch.Tensor) -> MatVec:
    """``v -> S H S v`` with ``S = diag(scale)``: for ``scale = D^-1/2`` the Hessian in the metric of a
    diagonal preconditioner ``D`` (AdamW's ``sqrt(v_hat) + eps``), the curvature its step actually feels."""
    def product(vector: torch.Tensor) -> torch.Tensor:
        s = scale.to(vector.dtype)
        return matvec(vector * s) * s

    return product


def gap(values: torch.Tensor | Sequence[float], i: int) -> float:
    """``|lambda_i| / |lambda_{i+1}|`` (1-based ``i``); ``inf`` past a zero, ``nan`` where undefined."""
    magnitudes = [abs(float(v)) for v in values]
    if i < 1 or i >= len(magnitudes):
        return float("nan")
    return magnitudes[i - 1] / magnitudes[i] if magnitudes[i] > 0 else float("inf")


def subspace_share(vectors: torch.Tensor, step: torch.Tensor) -> float:
    """``||V V^T d|| / ||d||`` for orthonormal rows ``vectors`` (k x n) and a step ``d`` (n,): 0 when the step
    avoids the subspace, 1 when it lies inside it (``nan`` for a zero step)."""
    d = step.reshape(-1).to(torch.float64)
    norm = float(d.norm())
    if norm == 0 or vectors.numel() == 0:
        return float("nan") if norm == 0 else 0.0
    coefficients = vectors.to(torch.float64) @ d
    return float(coefficients.norm()) / norm


# -------------------------------------------------------------------------------------------- stability
def adam_stability_limit(beta1: float) -> float:
    """``2 (1 + beta1) / (1 - beta1)``: the largest ``lr x lambda`` of ``D^-1/2 H D^-1/2`` at which Adam(W)
    with a frozen denominator ``D`` is stable on a quadratic. In the coordinates ``z = D^1/2 x`` its step
    is heavy-ball with momentum ``beta1`` and learning rate ``lr (1 - beta1)`` (bias corrections near 1
    after the first steps), and heavy-ball is stable for ``lr lambda < 2 (1 + momentum)``. 38 at 0.9."""
    return 2.0 * (1.0 + beta1) / (1.0 - beta1)


def heavy_ball_stability_limit(momentum: float, nesterov: bool = False, dampening: float = 0.0) -> float:
    """The largest ``lr x lambda`` at which SGD with momentum is stable on a quadratic.

    Heavy-ball (``b <- mu b + (1 - dampening) g``, ``x <- x - lr b``): ``2 (1 + mu) / (1 - dampening)``,
    from the characteristic polynomial of the two-step recursion (its trace must stay below ``1 + det``).
    Nesterov (``x <- x - lr (g + mu b)``, no dampening): ``2 (1 + mu) / (1 + 2 mu)``. Plain SGD: 2.
    """
    if nesterov:
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 2.0 * (1.0 + momentum) / max(1.0 - dampening, 1e-12)


# ------------------------------------------------------------------------------------------ noise scale
@dataclasses.dataclass
class NoiseScale:
    """The gradient noise scale from gradients at two batch sizes (McCandlish et al. 2018, appendix A).

    ``trace_sigma``: the unbiased estimate of ``tr(Sigma)``, the per-example gradient covariance's trace;
    ``grad_sq``: of ``|G|^2``, the true gradient's squared norm (either can come out negative when the
    batch resolves neither; then ``b_noise`` is ``inf``: no signal was resolved at this batch);
    ``b_noise = trace_sigma / grad_sq``, in examples; ``small`` and ``big``: the two batch sizes;
    ``chunks``: how many small-batch gradients were averaged.
    """

    trace_sigma: float
    grad_sq: float
    b_noise: float
    small: float
    big: float
    chunks: int


def noise_scale(small_sq_norms: Sequence[float], small: float, big_sq_norm: float, big: float) -> NoiseScale:
    """``B_noise = tr(Sigma) / |G|^2`` from ``|G_small|^2`` of several batches of ``small`` examples and
    ``|G_big|^2`` of one batch of ``big`` examples.

    With ``E |G_B|^2 = |G|^2 + tr(Sigma) / B`` for a mean gradient over ``B`` independent examples, the two
    unbiased estimators are

    ``|G|^2 ~ (big |G_big|^2 - small |G_small|^2) / (big - small)`` and
    ``tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / small - 1 / big)``,

    with ``|G_small|^2`` the mean over the small batches. Their ratio is the "simple" noise scale; it is
    biased (a ratio of estimates), so on one batch it is good to a factor, which is what a verdict needs.
    In the probe the small batches are equal chunks of the captured batch and the big one is their union,
    whose gradient is the mean of the chunks' gradients.
    """
    if not small_sq_norms or big <= small:
        raise ValueError(f"need at least one small batch and big > small (got {len(small_sq_norms)} batches, "
                         f"small={small}, big={big})")
    mean_small = float(sum(small_sq_norms)) / len(small_sq_norms)
    grad_sq = (big * big_sq_norm - small * mean_small) / (big - small)
    trace_sigma = (mean_small - big_sq_norm) / (1.0 / small - 1.0 / big)
    if grad_sq <= 0:
        b_noise = math.inf  # the mean gradient was not resolved from the noise at this batch
    else:
        b_noise = max(trace_sigma, 0.0) / grad_sq
    return NoiseScale(trace_sigma=trace_sigma, grad_sq=grad_sq, b_noise=b_noise, small=float(small),
                      big=float(big), chunks=len(small_sq_norms))


def chunk_noise_scale(chunk_gradients: Iterable[torch.Tensor], chunk_size: float) -> NoiseScale:
    """:func:`noise_scale` from the flat gradients of equal, disjoint chunks of one batch: the small batches
    are the chunks, the big one their union (its gradient the mean of theirs, as for a mean loss).

    The gradients may come one at a time (a generator): only their running sum is kept, one vector.
    """
    squares: list[float] = []
    total: torch.Tensor | None = None
    for gradient in chunk_gradients:
        squares.append(float(gradient.double().square().sum()))
        total = gradient.detach().clone() if total is None else total.add_(gradient)
    if total is None or len(squares) < 2:
        raise ValueError("the noise scale needs at least two chunks of the batch")
    mean_sq = float((total.double() / len(squares)).square().sum())
    return noise_scale(squares, chunk_size, mean_sq, chunk_size * len(squares))


# ------------------------------------------------------------------------------------------------- cost
def projection_seconds(vectors: torch.Tensor, repeats: int = 3) -> float:
    """The wall time of DHO2's four passes over a k x n basis (``V g``, ``V^T c``, ``V d``, the finish),
    timed as two products with ``V`` and two with ``V^T`` (the fastest of ``repeats``)."""
    x = torch.ones(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    c = torch.ones(vectors.shape[0], dtype=vectors.dtype, device=vectors.device)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(2):
            (vectors @ x).sum().item()
            (vectors.t() @ c).sum().item()
        best = min(best, time.perf_counter() - started)
    return best


def dho2_step_overhead(rank: int, product_seconds: float, projection: float, step_seconds: float,
                       refresh_interval: int, order: int | None = None) -> float:
    """DHO2's extra time per step as a fraction of a base-optimizer step (docs/design.md, "The cost model").

    ``projection`` (the four passes over the basis, every step) plus one refresh of ``order`` products
    (DHO2's default ``2 * rank``) at ``product_seconds`` each, spread over ``refresh_interval`` steps,
    divided by ``step_seconds``. Measured products on the whole micro-batch make this an upper bound of the
    default configuration, whose products see a quarter of it (``curvature.batch_fraction``).
    """
    order = 2 * rank if order is None else order
    extra = projection + order * product_seconds / max(refresh_interval, 1)
    return extra / step_seconds if step_seconds > 0 else math.inf


def flat(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """One flat vector of ``tensors`` (detached), optionally cast."""
    if not tensors:
        return torch.zeros(0, dtype=dtype or torch.float32)
    return torch.cat([t.detach().reshape(-1).to(dtype or t.dtype) for t in tensors])


def unflat(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``vector`` shaped (and cast) like ``like``."""
    chunks = vector.split([t.numel() for t in like])
    return [c.view(t.shape).to(t.dtype) for c, t in zip(chunks, like)]


def operator_from_products(product: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
                           like: Sequence[torch.Tensor]) -> MatVec:
    """A flat ``matvec`` from a per-parameter product (``ds_dho2.hvp`` sessions take and give per-parameter
    lists); the result is in the input vector's dtype."""
    def matvec(vector: torch.Tensor) -> torch.Tensor:
        return flat(list(product(unflat(vector, like))), dtype=vector.dtype)

    return matvec
