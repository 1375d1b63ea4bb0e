"""The Newton step inside the curvature subspace, and the coefficient-space momentum it keeps.

``u <- beta*u + (1-beta)*c`` (Adam-type base) or ``u <- beta*u + c`` (heavy-ball), with ``c = V g``; the
step's coefficients are ``alpha * u / |lambda|``, ``alpha`` scaled by the lr schedule. ``u`` has k numbers
(replicated) and belongs to one basis: when the tracker installs a new one, ``u`` is carried into it with
the transition matrix ``V_new V_old^T`` (or restarted from zero when there is none).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ds_dho2.core import hybrid
from ds_dho2.core.state import ComponentState, replicated


@dataclasses.dataclass
class NewtonState(ComponentState):
    momentum: torch.Tensor | None = replicated(None)
    basis_version: int = replicated(0)
    share_sum: torch.Tensor | None = replicated(None)  # the Newton step's share of each update, summed
    share_steps: int = replicated(0)  # the steps summed, since the basis was installed


class NewtonStep:
    """The Newton coefficients of each step, for the installed basis."""

    def __init__(self, adam_type: bool) -> None:
        self.adam_type = adam_type
        self.state = NewtonState()
        self._inverse: tuple | None = None

    def coefficients(self, basis: hybrid.Basis, split: hybrid.Split, keep: torch.Tensor, group: dict,
                     transition: Callable[[int], torch.Tensor | None]) -> torch.Tensor:
        """Update ``u`` with this step's coefficients and return ``alpha * u / |lambda|`` (zero where
        ``keep`` is 0). ``transition(version)`` gives ``V_new V_old^T`` from basis ``version``."""
        dtype = keep.dtype
        momentum = self._momentum(basis, dtype, transition)
        coefficients = torch.where(keep > 0, split.coefficients, 0.0)
        hybrid.update_newton_momentum(momentum, coefficients, group["newton_momentum"], self.adam_type, keep)
        reference_lr = group["reference_lr"]
        alpha = group["alpha"] * (group["lr"] / reference_lr if reference_lr > 0 else 1.0)
        return momentum * self._inverse_magnitude(basis, dtype) * (keep * alpha)

    def _momentum(self, basis: hybrid.Basis, dtype: torch.dtype,
                  transition: Callable[[int], torch.Tensor | None]) -> torch.Tensor:
        state = self.state
        momentum = state.momentum
        if state.basis_version != basis.version or momentum is None:
            carry = transition(state.basis_version)
            if momentum is not None and carry is not None and carry.shape[1] == momentum.numel():
                momentum = (carry @ momentum.double()).to(dtype)
            else:
                momentum = torch.zeros(basis.rank, dtype=dtype, device=basis.vectors.device)
            state.momentum, state.basis_version = momentum, basis.version
            state.share_sum, state.share_steps = None, 0
        return momentum

    def _inverse_magnitude(self, basis: hybrid.Basis, dtype: torch.dtype) -> torch.Tensor:
        """``1 / |lambda|`` of the installed basis, computed once per install."""
        if self._inverse is None or self._inverse[0] is not basis or self._inverse[1] != dtype:
            self._inverse = (basis, dtype, basis.inverse_magnitude(dtype))
        return self._inverse[2]

    def observe(self, finish: hybrid.Finish) -> None:
        """Add this step's Newton share of the update to the running sum (on the device, no host read)."""
        share = torch.nan_to_num(finish.newton_share(), nan=0.0)
        if self.state.share_sum is None or self.state.share_steps == 0:
            self.state.share_sum = torch.zeros_like(share)
        self.state.share_sum.add_(share)
        self.state.share_steps += 1

    def mean_share(self) -> float | None:
        """The Newton step's mean share of the squared update norm since the basis was installed (one host
        read), or None before any step with it; the sum restarts."""
        state = self.state
        if not state.share_steps or state.share_sum is None:
            return None
        mean = float(state.share_sum) / state.share_steps
        state.share_sum, state.share_steps = None, 0
        return mean

    def loaded(self) -> None:
        """After a checkpoint load: a non-finite momentum restarts from zero at the next step."""
        if self.state.momentum is not None and not bool(torch.isfinite(self.state.momentum).all()):
            self.state.momentum = None
        self._inverse = None
