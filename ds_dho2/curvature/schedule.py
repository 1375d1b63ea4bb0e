"""When the curvature tracker refreshes, and how many Lanczos iterations each step of a refresh runs.

Blocking and interleaved refreshes are two schedules of the same tracker: a blocking refresh runs every
iteration at its start step; an interleaved one spreads them over the steps of its window while the
previous basis stays in use. The interval adapts to how far the subspace rotated between the last two
refreshes (``1 - ||V_new V_old^T||_F^2 / k``, one minus the mean squared principal cosine): it doubles
while the rotation stays below :data:`STEADY_ROTATION` (up to ``curvature.max_interval``) and halves when
it exceeds :data:`MOVING_ROTATION` (down to ``refresh_interval``), so curvature work goes where the
curvature changes.
"""

from __future__ import annotations


from ds_dho2.config import CurvatureMode, DHO2Config

#: rotation below which the subspace counts as steady (the interval doubles)
STEADY_ROTATION = 0.25
#: rotation above which the subspace counts as moving (the interval halves)
MOVING_ROTATION = 0.6


class RefreshSchedule:
    """Refresh steps and per-step iteration counts of one :class:`~ds_dho2.config.DHO2Config`."""

    def __init__(self, config: DHO2Config) -> None:
        self.config = config
        self.interleaved = config.curvature.mode is CurvatureMode.INTERLEAVED

    @property
    def first_refresh(self) -> int:
        return self.config.warmup_steps

    def adapt(self, interval: int, rotation: float | None) -> int:
        """The next interval after a refresh whose subspace rotated by ``rotation`` (None: first refresh)."""
        low, high = self.config.refresh_interval, self.config.max_refresh_interval
        if rotation is None:
            return interval
        if rotation < STEADY_ROTATION:
            return min(high, interval * 2)
        if rotation > MOVING_ROTATION:
            return max(low, interval // 2)
        return interval

    def iterations_at(self, offset: int, order: int, interval: int) -> int:
        """Lanczos iterations to run at the ``offset``-th step (0-based) of a refresh of ``order``."""
        if not self.interleaved:
            return order
        fixed = self.config.curvature.iterations_per_step
        if fixed is not None:
            return fixed
        if offset >= interval - 1:
            return order  # the last step of the window completes the run (iterate stops at the order)
        return (offset + 1) * order // interval - offset * order // interval
