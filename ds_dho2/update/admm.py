"""The ADMM-like coupling of successive windows of steps, and the dual and anchor it keeps.

Every step sees ``g + y``; at a window's end the extrapolation ``e = y/rho`` (capped, ``core/admm.py``)
moves the parameters as ``admm.extrapolation`` says: all at once (``jump``), in equal parts over the next
window (``spread``), or at once only when the loss on the curvature batch does not rise (``checked``,
falling back to ``spread`` when that loss cannot be re-evaluated). The dual ``y``, the anchor ``z`` and a
spread extrapolation in progress are sharded; the counters are replicated (docs/design.md, "ADMM").
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from ds_dho2.config import ADMMExtrapolation, DHO2Config
from ds_dho2.core.admm import window_end_extrapolation
from ds_dho2.core.state import ComponentState, replicated, sharded
from ds_dho2.dist.comm import Communicator
from ds_dho2.dist.flat import FlatParameters

logger = logging.getLogger(__name__)

#: ``evaluate(shift)``: the mean over ranks of the curvature batch's loss at the module's parameters plus
#: ``shift`` (this rank's slice, or None for no shift)
LossEvaluator = Callable[[torch.Tensor | None], float]


@dataclasses.dataclass
class ADMMState(ComponentState):
    dual: torch.Tensor | None = sharded()
    anchor: torch.Tensor | None = sharded()
    pending: torch.Tensor | None = sharded()
    pending_steps: int = replicated(0)
    windows: int = replicated(0)
    accepted: int = replicated(0)


class ADMMCoupling:
    """The coupling of one DHO2 (a no-op when ``admm.enabled`` is false)."""

    def __init__(self, config: DHO2Config) -> None:
        self.config = config
        self.enabled = config.admm.enabled
        self.state = ADMMState()
        self.stats: dict[str, Any] = {}
        self._warned: set[str] = set()

    def materialize(self, flat: FlatParameters, dtype: torch.dtype) -> None:
        if self.enabled and self.state.dual is None:
            self.state.dual = torch.zeros(flat.numel, dtype=dtype, device=flat.device)
            self.state.anchor = flat.values().clone()

    def gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient the hybrid update sees: ``g + y``."""
        return grad + self.state.dual if self.enabled else grad

    def add_pending(self, direction: torch.Tensor, keep: torch.Tensor) -> None:
        """Add this step's share of a spread extrapolation to ``direction`` (in place)."""
        state = self.state
        if not state.pending_steps:
            return
        direction.add_(state.pending * keep)
        state.pending_steps -= 1
        if state.pending_steps == 0:
            state.pending = None

    def due(self, step: int) -> bool:
        return self.enabled and step % self.config.admm_window == 0

    def window_end(self, flat: FlatParameters, comm: Communicator, evaluate: LossEvaluator | None) -> None:
        """The window end with the configured extrapolation (``evaluate``: the checked mode's loss)."""
        cfg = self.config.admm
        mode = cfg.extrapolation
        if mode is ADMMExtrapolation.CHECKED and evaluate is None:
            self._warn_once("admm_checked", "DHO2 admm.extrapolation='checked' needs a loss it can re-evaluate (a "
                            "loss in the model output or attach(model, loss_fn=...)); spreading instead.")
            mode = ADMMExtrapolation.SPREAD
        state = self.state
        x = flat.values()
        lag = before = None
        if mode is ADMMExtrapolation.CHECKED:
            lag = flat.pending_module_update(x)
            try:
                before = evaluate(lag)
            except (RuntimeError, ValueError, TypeError) as error:
                self._warn_once("admm_checked_failed", "DHO2 cannot re-evaluate the loss for admm.extrapolation="
                                "'checked' (%s); spreading the extrapolation instead.", error)
                mode = ADMMExtrapolation.SPREAD
        result = window_end_extrapolation(x, state.dual, state.anchor, rho=cfg.rho,
                                          max_extrapolation_ratio=cfg.max_extrapolation_ratio, comm=comm)
        state.windows += 1
        accepted = result.extrapolation is not None
        if accepted and mode is ADMMExtrapolation.SPREAD:
            state.anchor.copy_(x).add_(result.extrapolation)  # the next window excludes the spread part
            state.pending = result.extrapolation.div_(self.config.admm_window)
            state.pending_steps = self.config.admm_window
        elif accepted:
            if mode is ADMMExtrapolation.CHECKED:
                after = evaluate(result.extrapolation if lag is None else lag + result.extrapolation)
                accepted = bool(after <= before)
            if accepted:
                x.add_(result.extrapolation)
                flat.assign(x)
            else:
                state.dual.zero_()
            state.anchor.copy_(x)
        if accepted and cfg.dual_decay != 1.0:
            state.dual.mul_(cfg.dual_decay)
        state.accepted += int(accepted)
        self.stats.update(admm_extrapolation_norm=result.extrapolation_norm, admm_safeguard_scale=result.scale,
                          admm_accepted=float(accepted), admm_acceptance_rate=state.accepted / state.windows)

    def restart(self, flat: FlatParameters) -> None:
        """After a rollback: no dual, no spread in progress, the anchor at the restored parameters."""
        state = self.state
        if state.dual is not None:
            state.dual.zero_()
            state.anchor.copy_(flat.values())
        state.pending, state.pending_steps = None, 0

    def loaded(self) -> None:
        """After a checkpoint load: non-finite coupling state is reset (the anchor to the next step's x)."""
        state = self.state
        tensors = [t for t in (state.dual, state.anchor, state.pending) if t is not None]
        if tensors and not all(bool(torch.isfinite(t).all()) for t in tensors):
            self._warn_once("admm_loaded", "DHO2 reset its checkpointed ADMM state: it was not finite.")
            state.dual = state.anchor = state.pending = None
            state.pending_steps = 0

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)
