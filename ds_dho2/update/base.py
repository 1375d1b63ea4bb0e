"""The first-order base step on the complement of the curvature subspace, and the moments it keeps.

AdamW keeps ``exp_avg`` and ``exp_avg_sq``, heavy-ball a ``momentum_buffer``; both count the steps they
applied (a skipped step does not count, for AdamW's bias corrections). The moments are sharded and saved
under their usual names, so DeepSpeed's own tools see them as they see AdamW's. The arithmetic is in
:mod:`ds_dho2.core.first_order`.
"""

from __future__ import annotations

import abc
import dataclasses

import torch

from ds_dho2.config import BaseOptimizer, DHO2Config
from ds_dho2.core import hybrid
from ds_dho2.core.first_order import adamw_direction, fused_adamw_direction, heavyball_direction
from ds_dho2.core.state import ComponentState, replicated, sharded


@dataclasses.dataclass
class AdamWState(ComponentState):
    SAVED_PREFIX = ""

    exp_avg: torch.Tensor | None = sharded()
    exp_avg_sq: torch.Tensor | None = sharded()
    applied_steps: torch.Tensor | None = replicated(None)


@dataclasses.dataclass
class HeavyBallState(ComponentState):
    SAVED_PREFIX = ""

    momentum_buffer: torch.Tensor | None = sharded()
    applied_steps: torch.Tensor | None = replicated(None)
    boost: float = replicated(1.0)  # the share of lr_clip - 1 in use; the divergence guard halves it
    sharpest: torch.Tensor | None = replicated(None)  # the largest |lambda| any basis of this run measured


class BaseStep(abc.ABC):
    """One base optimizer: its state, its direction ``d`` (already negated) and its step scale ``s``."""

    #: whether the Newton momentum averages (Adam-type, ``(1-beta)`` weight) or sums (heavy-ball)
    adam_type: bool

    def __init__(self, config: DHO2Config) -> None:
        self.config = config
        self.state = self.new_state()

    @abc.abstractmethod
    def new_state(self) -> ComponentState: ...

    @abc.abstractmethod
    def materialize(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        """Create the moments for ``numel`` elements (once; a loaded state is kept)."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of the moments, in which the whole update is computed."""

    @abc.abstractmethod
    def direction(self, complement: torch.Tensor, keep: torch.Tensor, group: dict) -> torch.Tensor:
        """The base step for the complement gradient; nothing moves where ``keep`` is 0."""

    def scale(self, basis: hybrid.Basis, group: dict) -> torch.Tensor | float:
        """``s`` of the complement step (1 unless the base is boosted by the curvature)."""
        return 1.0

    def shrink_boost(self) -> float:
        """No boost to shrink."""
        return 0.0

    def torch_entries(self) -> dict[str, torch.Tensor]:
        """The moments under their usual names, for ``optimizer.state`` (DeepSpeed's state helpers)."""
        return {spec.name: getattr(self.state, spec.name) for spec in self.state.field_specs()
                if spec.name not in ("applied_steps", "sharpest") and getattr(self.state, spec.name) is not None}


class AdamWStep(BaseStep):
    """AdamW on the complement: one ``torch._fused_adamw_`` kernel where it runs, the plain formula
    otherwise."""

    adam_type = True

    def __init__(self, config: DHO2Config) -> None:
        super().__init__(config)
        self._fused = True
        self._out: torch.Tensor | None = None

    def new_state(self) -> AdamWState:
        return AdamWState()

    def materialize(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        state = self.state
        if state.exp_avg is None:
            state.exp_avg = torch.zeros(numel, dtype=dtype, device=device)
            state.exp_avg_sq = torch.zeros(numel, dtype=dtype, device=device)
        if state.applied_steps is None:
            state.applied_steps = torch.zeros((), dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.state.exp_avg.dtype

    def direction(self, complement: torch.Tensor, keep: torch.Tensor, group: dict) -> torch.Tensor:
        state, lr, betas, eps = self.state, group["lr"], group["betas"], group["eps"]
        if self._fused:
            if self._out is None or self._out.shape != complement.shape:
                self._out = torch.empty_like(complement)
            out = fused_adamw_direction(complement, state.exp_avg, state.exp_avg_sq, state.applied_steps, keep,
                                        self._out, lr=lr, betas=betas, eps=eps)
            if out is not None:
                return out
            self._fused = False
        masked = torch.where(keep > 0, complement, 0.0)
        return adamw_direction(masked, state.exp_avg, state.exp_avg_sq, state.applied_steps, keep, lr=lr,
                               betas=betas, eps=eps)


#: the boosted complement lr stays below this share of heavy-ball's stability limit
STABILITY_MARGIN = 0.5


class HeavyBallStep(BaseStep):
    """SGD with heavy-ball momentum on the complement, its lr boosted by ``s`` (``lr_clip``)."""

    adam_type = False

    def shrink_boost(self) -> float:
        """Halve the boost beyond 1 (the divergence guard's answer); returns the share left."""
        self.state.boost *= 0.5
        return self.state.boost

    def new_state(self) -> HeavyBallState:
        return HeavyBallState()

    def materialize(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        state = self.state
        if state.momentum_buffer is None:
            state.momentum_buffer = torch.zeros(numel, dtype=dtype, device=device)
        if state.applied_steps is None:
            state.applied_steps = torch.zeros((), dtype=dtype, device=device)
        if state.sharpest is None:
            state.sharpest = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.state.momentum_buffer.dtype

    def direction(self, complement: torch.Tensor, keep: torch.Tensor, group: dict) -> torch.Tensor:
        masked = torch.where(keep > 0, complement, 0.0)
        self.state.applied_steps.add_(keep)
        return heavyball_direction(masked, self.state.momentum_buffer, keep, lr=group["lr"],
                                   momentum=group["momentum"])

    def scale(self, basis: hybrid.Basis, group: dict) -> torch.Tensor:
        """``clip(lambda_max / lambda_min, 1, lr_clip)``, times the guard's ``boost`` (1 until a divergence),
        and never more than keeps the boosted lr stable for every curvature this run has measured:
        heavy-ball with lr is stable while ``lr * lambda < 2 (1 + momentum)``, so ``s <= STABILITY_MARGIN *
        2 (1 + momentum) / (lr * lambda_seen)`` with ``lambda_seen`` the largest ``|lambda|`` of any basis so
        far. Not the smallest kept one: a basis is an estimate (a few samples, a few steps old), and a
        sharp direction it missed, or one that sharpened since, meets the boosted lr on the complement; a
        refresh on a batch the model has memorised can measure a far flatter surface than the one the run
        trains on. A run whose lr has shown it sits near heavy-ball's limit (SGD-momentum training at the
        edge of stability) gets no boost."""
        state = self.state
        torch.maximum(state.sharpest, basis.values.abs().max().to(state.sharpest.dtype), out=state.sharpest)
        s = hybrid.newton_scale(basis.values, 1.0 + (self.config.lr_clip - 1.0) * state.boost).to(self.dtype)
        lr, momentum = group["lr"], group["momentum"]
        if lr > 0:
            limit = STABILITY_MARGIN * 2 * (1 + momentum) / (lr * state.sharpest.to(self.dtype))
            s = torch.minimum(s, limit.clamp_min(1.0))
        return s


def make_base_step(config: DHO2Config) -> BaseStep:
    """The base step the config names."""
    match config.base:
        case BaseOptimizer.ADAMW:
            return AdamWStep(config)
        case BaseOptimizer.HEAVYBALL:
            return HeavyBallStep(config)
    raise ValueError(f"unknown base optimizer {config.base!r}")
