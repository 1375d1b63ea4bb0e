"""The hybrid-order step (docs/design.md, "The step"), on one rank's flat slice.

:class:`Basis` holds the rank's eigenvector slices ``V_r`` (k x P_r) and the replicated eigenvalues.
Every reduction of k numbers goes through the communicator, so the sharded step equals the unsharded one.
The functions here never read a value on the host: flags, norms and statistics stay 0-dim tensors on the
parameters' device, and each step needs two all-reduces, of k + 1 and k + 2 numbers.

The step passes over ``V`` four times: ``V g``, ``g - V^T c``, ``V d`` and ``V^T (V d + n)``, which removes
the base step's subspace component and adds the Newton step.

Coordinates whose gradient is exactly zero (an unused parameter, the embedding row of a token absent from
the batch, a frozen parameter, ZeRO's padding) are left out of the subspace parts: their complement is
zero and the update there is the base step alone. The loss of this step does not depend on them, so the
exact eigenvectors of its Hessian have no component there; what ``V`` holds on them is Lanczos residue
(the random start vector) or curvature of another batch, and would move them by about the learning rate
every step (the Adam normalisation of a tiny complement) where the base optimizer leaves them alone.
"""

from __future__ import annotations

import dataclasses

import torch

from ds_dho2.dist.comm import Communicator


@dataclasses.dataclass(frozen=True)
class Basis:
    """An installed curvature estimate: ``vectors`` (k x P_r slice, orthonormal over all ranks) and
    ``values`` (k, float64, replicated), on the parameters' device. ``version`` counts installs."""

    values: torch.Tensor
    vectors: torch.Tensor
    version: int

    @property
    def rank(self) -> int:
        return int(self.values.numel())

    def inverse_magnitude(self, dtype: torch.dtype) -> torch.Tensor:
        """``1 / |lambda|`` in ``dtype`` (the Newton step's scale per direction)."""
        return self.values.abs().reciprocal().to(dtype)


@dataclasses.dataclass
class Split:
    """A gradient split by the basis: coefficients ``c = V g``, complement ``g - V^T c``, the all-reduced
    ``||g||^2``, a 0/1 flag (some rank's gradient or coefficient is non-finite) and, with a basis, the
    coordinates with a non-zero gradient (``active``)."""

    coefficients: torch.Tensor
    complement: torch.Tensor
    grad_sq: torch.Tensor
    nonfinite: torch.Tensor
    active: torch.Tensor | None = None


def split_gradient(grad: torch.Tensor, basis: Basis | None, comm: Communicator) -> Split:
    """Steps 1-2: ``c = sum_r V_r g_r`` and ``g2 = g - V^T c`` (zero where ``g`` is) with one all-reduce of
    k + 1 numbers, which also carries ``||g||^2``: it is non-finite exactly when some rank's gradient has an
    inf or NaN (or overflows when squared), and a coefficient is non-finite when the basis is, so no
    separate pass looks for them (``nonfinite`` is then 1)."""
    grad_sq = torch.dot(grad, grad).reshape(1)
    if basis is None:
        grad_sq = comm.all_reduce(grad_sq)[0]
        return Split(coefficients=grad.new_zeros(0), complement=grad, grad_sq=grad_sq,
                     nonfinite=(~torch.isfinite(grad_sq)).to(grad.dtype))
    vectors = basis.vectors.to(grad.dtype) if basis.vectors.dtype != grad.dtype else basis.vectors
    partial = comm.all_reduce(torch.cat([vectors @ grad, grad_sq]))
    coefficients, grad_sq = partial[:-1], partial[-1]
    active = grad != 0
    complement = torch.addmv(grad, vectors.t(), coefficients, alpha=-1).mul_(active)
    return Split(coefficients=coefficients, complement=complement, grad_sq=grad_sq,
                 nonfinite=(~torch.isfinite(partial).all()).to(grad.dtype), active=active)


def update_newton_momentum(momentum: torch.Tensor, coefficients: torch.Tensor, beta: float, adam_type: bool,
                           keep: torch.Tensor) -> None:
    """Step 3: ``u <- beta*u + (1-beta)*c`` (Adam-type) or ``u <- beta*u + c`` (heavy-ball), in place;
    unchanged where ``keep`` is 0 (``coefficients`` must then be zero)."""
    momentum.mul_(1 - (1 - beta) * keep).add_(coefficients, alpha=(1 - beta) if adam_type else 1.0)


def newton_scale(values: torch.Tensor, lr_clip: float) -> torch.Tensor:
    """``s = clip(lambda_max / lambda_min_of_k, 1, lr_clip)`` on magnitudes (step 7), a 0-dim tensor."""
    magnitude = values.abs()
    return (magnitude.max() / magnitude.min()).clamp(1.0, lr_clip)


@dataclasses.dataclass
class Finish:
    """What :func:`finish_update` did: the Newton coefficients asked for and those the trust region let
    through (read lazily: :func:`trust_scale`)."""

    requested: torch.Tensor
    applied: torch.Tensor
    newton_gain: torch.Tensor  # the quadratic model's loss decrease of the Newton step, c.n - |lambda| n^2 / 2
    base_gain: torch.Tensor  # the first-order loss decrease of the base step outside V, -s g2.d
    base_scale: torch.Tensor | float  # s, the boost of the base step (1 for an Adam-type base)

    def newton_share(self) -> torch.Tensor:
        """The curvature's share of this step's predicted loss decrease (a 0-dim tensor in [0, 1]): the
        Newton step's, plus the part of the base step that only the boost ``s`` adds (``1 - 1/s`` of it)."""
        newton, base = self.newton_gain.clamp_min(0), self.base_gain.clamp_min(0)
        curvature = newton + base * (1 - 1 / torch.as_tensor(self.base_scale, dtype=base.dtype))
        return curvature / (newton + base).clamp_min(1e-300)


def trust_scale(finish: Finish) -> float:
    """The share of the Newton step the trust region kept (1 = untouched): the ratio of the applied to the
    requested coefficients' absolute sums."""
    requested = float(finish.requested.abs().sum())
    return 1.0 if requested == 0 else min(1.0, float(finish.applied.abs().sum()) / requested)


def finish_update(direction: torch.Tensor, basis: Basis, newton_coefficients: torch.Tensor, comm: Communicator, *,
                  base_scale: torch.Tensor | float, newton_max_ratio: float, total_numel: int,
                  split: Split) -> Finish:
    """Steps 4-7 in place: ``d <- s * (d - V^T V d) - V^T n``, the whole update of this step, where ``d``
    is the base step and ``n`` (k coefficients) the Newton step ``alpha * u / |lambda|``.

    Trust region, per direction: ``|n_i|`` may not exceed ``newton_max_ratio`` times the root-mean-square
    per-parameter move of the base step, ``||s (d - V^T V d)|| / sqrt(P)`` -- for an AdamW base about the
    learning rate. So no subspace direction moves much further than the base optimizer moves any
    parameter: an eigenvalue underestimated on a small or already memorised batch (``|lambda| -> 0``) cannot
    turn ``u / |lambda|`` into a jump, while the sharp directions keep their short Newton steps. A
    non-finite Newton step is replaced by zero (the base step still applies). Where ``split.active`` is
    False (a zero gradient) the subspace parts are left out: the update there is the base step alone.

    The same all-reduce carries ``g2 . d``, so :class:`Finish` can say how much of the step's predicted loss
    decrease the Newton step carried (the curvature's payoff, read once per refresh).
    """
    vectors = basis.vectors.to(direction.dtype) if basis.vectors.dtype != direction.dtype else basis.vectors
    partial = comm.all_reduce(torch.cat([vectors @ direction, torch.dot(direction, direction).reshape(1),
                                         torch.dot(split.complement, direction).reshape(1)]))
    in_subspace, direction_sq, complement_dot = partial[:-2], partial[-2], partial[-1]
    complement_sq = (direction_sq - in_subspace.square().sum()).clamp_min(0) * base_scale ** 2
    base_rms = complement_sq.sqrt() / total_numel ** 0.5
    limit = newton_max_ratio * base_rms
    newton = torch.nan_to_num(newton_coefficients, nan=0.0, posinf=0.0, neginf=0.0)
    clipped = torch.minimum(torch.maximum(newton, -limit), limit)
    if not isinstance(base_scale, float) or base_scale != 1.0:
        direction.mul_(base_scale)
        in_subspace = in_subspace * base_scale
    correction = vectors.t() @ (in_subspace + clipped)
    if split.active is not None:
        correction.mul_(split.active)
    direction.sub_(correction)
    coefficients = torch.nan_to_num(split.coefficients.to(clipped.dtype), nan=0.0, posinf=0.0, neginf=0.0)
    newton_gain = (coefficients * clipped).sum() - 0.5 * (basis.values.abs().to(clipped.dtype) * clipped.square()).sum()
    return Finish(requested=newton, applied=clipped, newton_gain=newton_gain, base_gain=-base_scale * complement_dot,
                  base_scale=base_scale)
