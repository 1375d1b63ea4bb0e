"""The hybrid-order step of DESIGN.md section 1, on one rank's flat slice.

``Subspace`` holds the rank's eigenvector slices ``V_r`` (k x P_r) and the replicated eigenvalues.
Every reduction of k numbers goes through the communicator, so the sharded step equals the unsharded one.
"""

from __future__ import annotations

import dataclasses

import torch

from ds_dho2.dist.comm import Communicator


@dataclasses.dataclass
class Subspace:
    """The current curvature estimate: ``vectors`` (k x P_r slice) and ``values`` (k, replicated)."""

    values: torch.Tensor
    vectors: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.values.numel())


@dataclasses.dataclass
class Projection:
    """Result of splitting a gradient: coefficients ``c = V g``, complement ``g2`` and ``||g1||/||g||``."""

    coefficients: torch.Tensor
    complement: torch.Tensor
    subspace_fraction: float


def project_gradient(grad: torch.Tensor, subspace: Subspace, comm: Communicator) -> Projection:
    """Steps 1-2: ``c = sum_r V_r g_r`` (one all-reduce of k+1 numbers) and ``g2 = g - V^T c``."""
    vectors = subspace.vectors
    partial = torch.cat([vectors @ grad, (grad * grad).sum().reshape(1).to(vectors.dtype)])
    comm.all_reduce(partial)
    coefficients, grad_sq = partial[:-1], partial[-1]
    complement = grad - vectors.t() @ coefficients
    fraction = float(coefficients.norm() / grad_sq.clamp_min(1e-300).sqrt())
    return Projection(coefficients=coefficients, complement=complement, subspace_fraction=fraction)


def update_newton_momentum(momentum: torch.Tensor, coefficients: torch.Tensor, beta: float, adam_type: bool) -> None:
    """Step 3: ``u <- beta*u + (1-beta)*c`` (Adam-type) or ``u <- beta*u + c`` (heavy-ball), in place."""
    momentum.mul_(beta).add_(coefficients, alpha=(1 - beta) if adam_type else 1.0)


def newton_direction(momentum: torch.Tensor, subspace: Subspace) -> torch.Tensor:
    """Step 4: ``n = V^T (u / |lambda|)`` (local, no communication)."""
    scaled = momentum / subspace.values.abs().to(momentum.dtype)
    return subspace.vectors.t() @ scaled


def remove_subspace_component(direction: torch.Tensor, subspace: Subspace, comm: Communicator) -> torch.Tensor:
    """Step 6: ``d <- d - V^T (V d)`` (one all-reduce of k numbers), in place."""
    coefficients = comm.all_reduce(subspace.vectors @ direction)
    return direction.sub_(subspace.vectors.t() @ coefficients)


def carry_momentum(momentum: torch.Tensor, old: Subspace | None, new: Subspace, comm: Communicator) -> torch.Tensor:
    """Move the coefficient-space momentum into a new basis: ``u_new = V_new V_old^T u_old``."""
    if old is None or old.rank == 0:
        return torch.zeros(new.rank, dtype=new.vectors.dtype, device=new.vectors.device)
    in_parameter_space = old.vectors.t() @ momentum
    return comm.all_reduce(new.vectors @ in_parameter_space)
