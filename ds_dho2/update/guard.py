"""The non-finite guard: counts skipped steps and stops a run whose gradients stay inf or NaN.

A step with a non-finite gradient is skipped with masked arithmetic (no host read); the guard keeps the
current streak of skipped steps, the longest streak and the number of skips since its last report as
0-dim tensors on the device, and reads them every ``max_nonfinite_steps`` steps. Steps that DeepSpeed
skips before DHO2 sees them (ZeRO's overflow check) are counted through :meth:`NonFiniteGuard.engine_skipped`,
so the stop fires under ZeRO too.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ds_dho2.core.state import ComponentState, replicated

logger = logging.getLogger(__name__)


class NonFiniteGradientError(RuntimeError):
    """Gradients stayed inf/NaN for ``max_nonfinite_steps`` consecutive steps; training cannot go on."""


@dataclasses.dataclass
class GuardState(ComponentState):
    streak: torch.Tensor | None = replicated(None)
    longest_streak: torch.Tensor | None = replicated(None)
    skipped: torch.Tensor | None = replicated(None)


class NonFiniteGuard:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.state = GuardState()
        self._engine_streak = 0

    def materialize(self, device: torch.device) -> None:
        state = self.state
        for name in ("streak", "longest_streak", "skipped"):
            if getattr(state, name) is None:
                setattr(state, name, torch.zeros((), dtype=torch.float32, device=device))

    def record(self, keep: torch.Tensor) -> None:
        """Count this step: ``keep`` is 1 for an applied step, 0 for a skipped one (no host read)."""
        state = self.state
        state.streak.add_(1).mul_(1 - keep)
        torch.maximum(state.longest_streak, state.streak, out=state.longest_streak)
        state.skipped.add_(1 - keep)
        self._engine_streak = 0

    def check(self, step: int) -> None:
        """Every ``limit`` steps read the counters: warn about skips, stop a run that never recovers."""
        if step % self.limit != 0:
            return
        self._report(step)

    def engine_skipped(self, step: int) -> None:
        """DeepSpeed skipped a step (inf/NaN gradients) without calling DHO2 (``step``: the steps DHO2 took);
        stop after ``limit`` in a row."""
        state = self.state
        if state.streak is None:
            return
        state.streak.add_(1)
        torch.maximum(state.longest_streak, state.streak, out=state.longest_streak)
        state.skipped.add_(1)
        self._engine_streak += 1
        if self._engine_streak % self.limit == 0:
            self._report(step + self._engine_streak)

    def _report(self, step: int) -> None:
        state = self.state
        longest, skipped = float(state.longest_streak), float(state.skipped)
        state.longest_streak.zero_()
        state.skipped.zero_()
        if skipped:
            logger.warning("DHO2 skipped %d of the last %d steps: their gradients contained inf or NaN.",
                           int(skipped), self.limit)
        if longest >= self.limit:
            raise NonFiniteGradientError(
                f"DHO2 stopped at step {step}: the gradient was inf or NaN in {int(longest)} consecutive steps "
                f"(max_nonfinite_steps={self.limit}), so every step was skipped. Lower the learning rate, enable "
                "gradient clipping or fix the loss; raise max_nonfinite_steps to tolerate longer runs of bad steps.")
