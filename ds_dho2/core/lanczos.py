"""Lanczos with full reorthogonalisation on a (possibly sharded) vector space.

The operator is an abstract ``matvec(local_vector) -> local_vector``; inner products are local partial
sums completed by ``comm.all_reduce``. The iteration is resumable (``LanczosRun.iterate`` does one step
and its whole state is in ``state_dict``) so a refresh can be spread over training steps and survive a
checkpoint. It stops early, keeping what it has, on a non-finite product or on breakdown (beta ~ 0).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

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


class LanczosRun:
    """One Lanczos iteration of order ``order``, resumable.

    All of its state lives in the plain dict ``self.state`` (tensors are this rank's slices), so an
    optimizer can keep that dict in its checkpointed state and wrap it again with ``LanczosRun(state)``.
    """

    def __init__(self, state: dict) -> None:
        self.state = state

    @classmethod
    def start(cls, start: torch.Tensor, order: int, comm: Communicator) -> "LanczosRun":
        """Begin a run from ``start`` (this rank's slice; normalised here)."""
        if order < 1:
            raise ValueError(f"Invalid {order=}. Must be >= 1.")
        run = cls({
            "order": order, "basis": torch.zeros(order, start.numel(), dtype=start.dtype, device=start.device),
            "alphas": [], "betas": [], "next_vector": torch.zeros_like(start), "finished": False,
            "stop_reason": "",
        })
        norm = run._norm(start, comm)
        if not torch.isfinite(norm) or norm == 0:
            run._stop("start vector has zero or non-finite norm")
        else:
            run.state["next_vector"] = start / norm
        return run

    @property
    def finished(self) -> bool:
        return self.state["finished"]

    @property
    def stop_reason(self) -> str:
        return self.state["stop_reason"]

    @property
    def iterations(self) -> int:
        """Number of completed iterations (the size of the tridiagonal matrix)."""
        return len(self.state["alphas"])

    def _stop(self, reason: str) -> None:
        self.state["finished"], self.state["stop_reason"] = True, reason

    @staticmethod
    def _dot(a: torch.Tensor, b: torch.Tensor, comm: Communicator) -> torch.Tensor:
        return comm.all_reduce(torch.dot(a, b).reshape(1))[0]

    def _norm(self, a: torch.Tensor, comm: Communicator) -> torch.Tensor:
        return self._dot(a, a, comm).clamp_min(0).sqrt()

    def _reorthogonalise(self, w: torch.Tensor, upto: int, comm: Communicator) -> None:
        """Remove the components of ``w`` along the first ``upto`` basis vectors, twice."""
        basis = self.state["basis"][:upto]
        for _ in range(2):
            coeffs = comm.all_reduce(basis @ w)
            w.sub_(basis.t() @ coeffs)

    def iterate(self, matvec: MatVec, comm: Communicator) -> None:
        """Run one iteration; finishes after ``order`` iterations, on breakdown or on a bad product."""
        if self.finished:
            return
        state, j = self.state, self.iterations
        basis, q = state["basis"], state["next_vector"]
        product = matvec(q).to(basis.dtype)
        finite = comm.all_reduce(torch.isfinite(product).all().to(torch.float64).reshape(1))
        if finite.item() < comm.world_size:
            self._stop(f"non-finite Hessian-vector product at iteration {j}")
            logger.warning("Lanczos stopped early: %s; keeping %d iterations.", self.stop_reason, j)
            return
        basis[j].copy_(q)
        alpha = self._dot(product, q, comm)
        w = product - alpha * q
        if j > 0:
            w.sub_(state["betas"][-1] * basis[j - 1])
        self._reorthogonalise(w, j + 1, comm)
        beta = self._norm(w, comm)
        state["alphas"].append(float(alpha))
        if j + 1 >= state["order"]:
            self._stop("reached order")
            return
        scale = max(abs(a) for a in state["alphas"]) + max(state["betas"], default=0.0)
        if not torch.isfinite(beta) or float(beta) <= _BREAKDOWN_RTOL * max(scale, 1e-300):
            self._stop(f"breakdown (invariant subspace) after {j + 1} iterations")
            logger.info("Lanczos %s.", self.stop_reason)
            return
        state["betas"].append(float(beta))
        state["next_vector"] = w / beta

    def run(self, matvec: MatVec, comm: Communicator) -> "LanczosRun":
        """Iterate until finished (blocking mode)."""
        while not self.finished:
            self.iterate(matvec, comm)
        return self

    def ritz_pairs(self) -> RitzPairs:
        """Eigenpairs of the tridiagonal matrix, with eigenvector slices ``S^T Q_r`` (no gather needed)."""
        n, basis = self.iterations, self.state["basis"]
        if n == 0:
            return RitzPairs(values=basis.new_zeros(0, dtype=torch.float64), local_vectors=basis.new_zeros(0, basis.shape[1]))
        tridiagonal = torch.diag(torch.tensor(self.state["alphas"], dtype=torch.float64))
        if n > 1:
            off = torch.tensor(self.state["betas"][: n - 1], dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        local = vectors.t().to(device=basis.device, dtype=basis.dtype) @ basis[:n]
        return RitzPairs(values=values, local_vectors=local)
