"""Lanczos with full reorthogonalisation on a (possibly sharded) vector space.

The operator is an abstract ``matvec(local_vector) -> local_vector``; inner products are local partial
sums completed by ``comm.all_reduce``. The iteration is resumable (``LanczosRun.iterate`` does one step
and its whole state is the :class:`LanczosState` it wraps, whose basis is declared sharded) so a refresh
can be spread over training steps and survive a checkpoint. It stops early, keeping what it has, on a non-finite product, on breakdown (beta ~ 0), or --
when a ``tolerance`` is set -- once the top-``rank`` Ritz pairs have converged: every kept pair
``(theta, y)`` has the residual ``||H y - theta y|| = beta_n |s_n|`` at most ``tolerance * |theta|``
(the classic a-posteriori bound, free from the tridiagonal matrix). A warm start from the previous
eigenvectors then needs about ``rank`` products instead of ``order``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from ds_dho2.core.spectrum import select_top_magnitude
from ds_dho2.core.state import ComponentState, replicated, sharded
from ds_dho2.dist.comm import Communicator

logger = logging.getLogger(__name__)

MatVec = Callable[[torch.Tensor], torch.Tensor]

_BREAKDOWN_RTOL = 1e-10


@dataclasses.dataclass
class RitzPairs:
    """Eigenpairs of the Lanczos tridiagonal matrix, lifted to this rank's slice of the vector space.

    ``values`` has shape (n,) ascending; ``local_vectors`` has shape (n, local_numel).
    """

    values: torch.Tensor
    local_vectors: torch.Tensor


@dataclasses.dataclass
class RitzSelection:
    """The kept Ritz pairs as coefficients in the Lanczos basis: ``y_i = Q^T coefficients[:, i]``.

    ``values`` (k,) float64, ordered by decreasing magnitude; ``coefficients`` (n, k) float64 on the CPU;
    ``residuals`` (k,) the residual norms ``beta_n |s_n,i|``.
    """

    values: torch.Tensor
    coefficients: torch.Tensor
    residuals: torch.Tensor


def _tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    n = len(alphas)
    matrix = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        matrix += torch.diag(off, 1) + torch.diag(off, -1)
    return matrix


@dataclasses.dataclass
class LanczosState(ComponentState):
    """A Lanczos run in flight: the basis rows computed so far (this rank's slices; the last one is the
    current vector), the tridiagonal coefficients, and the stopping rule."""

    basis: torch.Tensor | None = sharded(rows_in_use="rows_in_use")
    order: int = replicated(0)
    alphas: list = replicated(default_factory=list)
    betas: list = replicated(default_factory=list)
    finished: bool = replicated(False)
    stop_reason: str = replicated("")
    rank: int | None = replicated(None)
    tolerance: float | None = replicated(None)
    eig_floor: float = replicated(0.0)
    last_beta: float = replicated(0.0)  # the norm of the residual vector of the last iteration

    def rows_in_use(self) -> int:
        """Completed iterations plus the current vector; the rows after those are still zeros."""
        return len(self.alphas) + 1


class LanczosRun:
    """One Lanczos iteration of order ``order``, resumable: all of its state is ``self.state``."""

    def __init__(self, state: LanczosState) -> None:
        self.state = state

    @classmethod
    def start(cls, start: torch.Tensor, order: int, comm: Communicator, *, rank: int | None = None,
              tolerance: float | None = None, eig_floor: float = 0.0) -> "LanczosRun":
        """Begin a run from ``start`` (this rank's slice; normalised here).

        With ``tolerance`` the run stops as soon as the ``rank`` largest-magnitude Ritz pairs (those above
        ``eig_floor * max|theta|``) have relative residuals at most ``tolerance``.
        """
        if order < 1:
            raise ValueError(f"Invalid {order=}. Must be >= 1.")
        run = cls(LanczosState(basis=torch.zeros(order, start.numel(), dtype=start.dtype, device=start.device),
                               order=order, rank=rank, tolerance=tolerance, eig_floor=eig_floor))
        norm = run._norm(start, comm)
        if not torch.isfinite(norm) or norm == 0:
            run._stop("start vector has zero or non-finite norm")
        else:
            torch.div(start, norm, out=run.state.basis[0])
        return run

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def stop_reason(self) -> str:
        return self.state.stop_reason

    @property
    def iterations(self) -> int:
        """Number of completed iterations (the size of the tridiagonal matrix)."""
        return len(self.state.alphas)

    def _stop(self, reason: str) -> None:
        self.state.finished, self.state.stop_reason = True, reason

    @staticmethod
    def _dot(a: torch.Tensor, b: torch.Tensor, comm: Communicator) -> torch.Tensor:
        return comm.all_reduce(torch.dot(a, b).reshape(1))[0]

    def _norm(self, a: torch.Tensor, comm: Communicator) -> torch.Tensor:
        return self._dot(a, a, comm).clamp_min(0).sqrt()

    def _reorthogonalise(self, w: torch.Tensor, upto: int, comm: Communicator) -> None:
        """Remove the components of ``w`` along the first ``upto`` basis vectors, twice."""
        basis = self.state.basis[:upto]
        for _ in range(2):
            coeffs = comm.all_reduce(basis @ w)
            w.sub_(basis.t() @ coeffs)

    def iterate(self, matvec: MatVec, comm: Communicator) -> None:
        """Run one iteration; finishes after ``order`` iterations, on breakdown, on a bad product or on
        convergence."""
        if self.finished:
            return
        state, j = self.state, self.iterations
        basis = state.basis
        q = basis[j]  # the current Lanczos vector lives in its basis row: no separate vector is held
        product = matvec(q).to(basis.dtype)
        finite = comm.all_reduce(torch.isfinite(product).all().to(torch.float64).reshape(1))
        if finite.item() < comm.world_size:
            self._stop(f"non-finite Hessian-vector product at iteration {j}")
            logger.warning("Lanczos stopped early: %s; keeping %d iterations.", self.stop_reason, j)
            return
        alpha = self._dot(product, q, comm)
        w = product.sub_(q, alpha=float(alpha))
        if j > 0:
            w.sub_(basis[j - 1], alpha=state.betas[-1])
        self._reorthogonalise(w, j + 1, comm)
        beta = float(self._norm(w, comm))
        state.alphas.append(float(alpha))
        state.last_beta = beta
        if j + 1 >= state.order:
            self._stop("reached order")
            return
        scale = max(abs(a) for a in state.alphas) + max(state.betas, default=0.0)
        if not beta == beta or beta <= _BREAKDOWN_RTOL * max(scale, 1e-300):  # NaN or invariant subspace
            self._stop(f"breakdown (invariant subspace) after {j + 1} iterations")
            logger.info("Lanczos %s.", self.stop_reason)
            return
        if self._converged(beta):
            self._stop(f"converged after {j + 1} iterations")
            return
        state.betas.append(beta)
        torch.div(w, beta, out=basis[j + 1])

    def _converged(self, next_beta: float) -> bool:
        tolerance, rank = self.state.tolerance, self.state.rank
        if tolerance is None or rank is None or self.iterations < rank:
            return False
        selection = self._select(next_beta)
        return selection.values.numel() > 0 and bool((selection.residuals <= tolerance * selection.values.abs()).all())

    def _select(self, next_beta: float) -> RitzSelection:
        values, vectors = torch.linalg.eigh(_tridiagonal(self.state.alphas, self.state.betas))
        rank = self.state.rank or values.numel()
        chosen = select_top_magnitude(values, rank, self.state.eig_floor or 0.0)
        residuals = next_beta * vectors[-1, chosen].abs()
        return RitzSelection(values=values[chosen], coefficients=vectors[:, chosen], residuals=residuals)

    def run(self, matvec: MatVec, comm: Communicator) -> "LanczosRun":
        """Iterate until finished (blocking mode)."""
        while not self.finished:
            self.iterate(matvec, comm)
        return self

    def selection(self, rank: int, eig_floor: float) -> RitzSelection:
        """The ``rank`` largest-magnitude Ritz pairs above ``eig_floor * max|theta|`` of a finished run."""
        if self.iterations == 0:
            empty = torch.zeros(0, dtype=torch.float64)
            return RitzSelection(values=empty, coefficients=torch.zeros(0, 0, dtype=torch.float64), residuals=empty)
        values, vectors = torch.linalg.eigh(_tridiagonal(self.state.alphas, self.state.betas))
        chosen = select_top_magnitude(values, rank, eig_floor)
        return RitzSelection(values=values[chosen], coefficients=vectors[:, chosen],
                             residuals=torch.full((chosen.numel(),), float("nan"), dtype=torch.float64))

    def converged_values(self, tolerance: float, eig_floor: float) -> list[float]:
        """The Ritz values in decreasing magnitude, up to and including the first one whose residual
        ``beta_n |s_n|`` exceeds ``tolerance * |theta|``: those that can be trusted, plus the next one (the
        first value of the unresolved rest, against which the last trusted one is compared)."""
        if self.iterations == 0:
            return []
        values, vectors = torch.linalg.eigh(_tridiagonal(self.state.alphas, self.state.betas))
        chosen = select_top_magnitude(values, values.numel(), eig_floor)
        residuals = self.state.last_beta * vectors[-1, chosen].abs()
        out = []
        for value, residual in zip(values[chosen].tolist(), residuals.tolist()):
            out.append(value)
            if residual > tolerance * abs(value):
                break
        return out

    def project(self, local_vectors: torch.Tensor, comm: Communicator) -> torch.Tensor:
        """``Q X^T`` (n x rows of X, float64, all-reduced): the basis against other sharded vectors."""
        n = self.iterations
        partial = (self.state.basis[:n] @ local_vectors.to(self.state.basis.dtype).t()).double()
        return comm.all_reduce(partial)

    def lift(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``coefficients^T Q``: this rank's slice of the Ritz vectors (k x local_numel), no communication."""
        basis = self.state.basis
        return coefficients.t().to(device=basis.device, dtype=basis.dtype) @ basis[: coefficients.shape[0]]

    def ritz_pairs(self) -> RitzPairs:
        """All eigenpairs of the tridiagonal matrix, with eigenvector slices ``S^T Q_r`` (no gather needed)."""
        n, basis = self.iterations, self.state.basis
        if n == 0:
            return RitzPairs(values=basis.new_zeros(0, dtype=torch.float64), local_vectors=basis.new_zeros(0, basis.shape[1]))
        values, vectors = torch.linalg.eigh(_tridiagonal(self.state.alphas, self.state.betas))
        return RitzPairs(values=values, local_vectors=self.lift(vectors))
