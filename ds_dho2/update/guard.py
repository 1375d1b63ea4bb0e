"""The non-finite guard: counts skipped steps and stops a run whose gradients stay inf or NaN; and watches
the gradient norm for the fast rise of a divergence.

A step with a non-finite gradient is skipped with masked arithmetic (no host read); the guard keeps the
current streak of skipped steps, the longest streak and the number of skips since its last report as
0-dim tensors on the device, and reads them every ``max_nonfinite_steps`` steps. Steps that DeepSpeed
skips before DHO2 sees them (ZeRO's overflow check) are counted through :meth:`NonFiniteGuard.engine_skipped`,
so the stop fires under ZeRO too.

Divergence: the guard keeps a running mean of ``||g||^2``, the mean as it was at the last read, and the
largest ratio of a step's ``||g||^2`` to the lower of the two; at the same reads it reports a rise of more
than :data:`DIVERGENCE_GROWTH` (a tenfold gradient norm within a read interval), to which the optimizer
answers when a curvature basis is in use.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ds_dho2.core.state import ComponentState, replicated

logger = logging.getLogger(__name__)


#: a step's ||g||^2 above this multiple of its running mean counts as a divergence (ten times the norm);
#: the default of ``DHO2Config.divergence_growth``
DIVERGENCE_GROWTH = 100.0
#: weight of the newest step in the running mean of ||g||^2
MEAN_WEIGHT = 0.1


class NonFiniteGradientError(RuntimeError):
    """Gradients stayed inf/NaN for ``max_nonfinite_steps`` consecutive steps; training cannot go on."""


@dataclasses.dataclass
class GuardState(ComponentState):
    streak: torch.Tensor | None = replicated(None)
    longest_streak: torch.Tensor | None = replicated(None)
    skipped: torch.Tensor | None = replicated(None)
    grad_sq_mean: torch.Tensor | None = replicated(None)  # running mean of ||g||^2 over applied steps
    grad_sq_reference: torch.Tensor | None = replicated(None)  # the running mean at the last read (-1: none)
    growth: torch.Tensor | None = replicated(None)  # largest ||g||^2 / running mean since the last read


class NonFiniteGuard:
    def __init__(self, limit: int, divergence_growth: float = DIVERGENCE_GROWTH) -> None:
        self.limit = limit
        self.divergence_growth = divergence_growth
        self.state = GuardState()
        self._engine_streak = 0

    def materialize(self, device: torch.device) -> None:
        state = self.state
        for name in ("streak", "longest_streak", "skipped", "growth"):
            if getattr(state, name) is None:
                setattr(state, name, torch.zeros((), dtype=torch.float32, device=device))
        if state.grad_sq_mean is None:
            state.grad_sq_mean = torch.full((), -1.0, dtype=torch.float64, device=device)  # -1: no step yet
        if state.grad_sq_reference is None:
            state.grad_sq_reference = torch.full((), -1.0, dtype=torch.float64, device=device)

    def record(self, keep: torch.Tensor, grad_sq: torch.Tensor, watch: bool) -> None:
        """Count this step: ``keep`` is 1 for an applied step, 0 for a skipped one; ``grad_sq`` its
        all-reduced ``||g||^2``, watched for a divergence while ``watch`` (a basis is in use). No host read."""
        state = self.state
        state.streak.add_(1).mul_(1 - keep)
        torch.maximum(state.longest_streak, state.streak, out=state.longest_streak)
        state.skipped.add_(1 - keep)
        self._engine_streak = 0
        if watch:
            self._watch(keep, grad_sq)

    def _watch(self, keep: torch.Tensor, grad_sq: torch.Tensor) -> None:
        state = self.state
        grad_sq = torch.where(keep > 0, grad_sq.to(torch.float64), state.grad_sq_mean.clamp_min(0))
        first = state.grad_sq_mean < 0
        mean = torch.where(first, grad_sq, state.grad_sq_mean)
        # against the lower of the running mean and the mean at the last read: a sudden spike stands out
        # against the first, a steady climb of a few times per step (which the running mean follows) against
        # the second
        reference = torch.where(state.grad_sq_reference > 0, torch.minimum(mean, state.grad_sq_reference), mean)
        torch.maximum(state.growth, (grad_sq / reference.clamp_min(1e-300)).to(state.growth.dtype), out=state.growth)
        state.grad_sq_mean.copy_(mean.mul(1 - MEAN_WEIGHT).add_(grad_sq, alpha=MEAN_WEIGHT))

    def forget_mean(self) -> None:
        """Start the running mean of ``||g||^2`` afresh (after a rollback its history belongs to steps undone)."""
        if self.state.grad_sq_mean is not None:
            self.state.grad_sq_mean.fill_(-1.0)
            self.state.grad_sq_reference.fill_(-1.0)
            self.state.growth.zero_()

    def check(self, step: int) -> bool:
        """Every ``limit`` steps read the counters: warn about skips, stop a run that never recovers.
        True when the gradient norm rose like a divergence since the last read."""
        if step % self.limit != 0:
            return False
        growth = float(self.state.growth)
        self.state.growth.zero_()
        self.state.grad_sq_reference.copy_(self.state.grad_sq_mean)
        self._report(step)
        return growth > self.divergence_growth

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
