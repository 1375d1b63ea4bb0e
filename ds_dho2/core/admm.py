"""ADMM-like coupling of successive windows (docs/design.md, "ADMM"), on one rank's flat slice.

Every step the update sees ``g + y``. At a window end: ``y <- y + rho*(x - z)``, then the extrapolation
``e = y/rho`` moves ``x`` and ``z`` is set to the point it leads to. Safeguard: ``e`` is scaled so that
``||e|| <= ratio * ||x||`` (global norms across ranks); when it is scaled, ``y`` is scaled by the same
factor so the dual keeps describing the displacement that was actually applied. An optional
``dual_decay`` then shrinks ``y`` (with 1.0 ``y/rho`` is the sum of all past window displacements).

How ``e`` moves ``x`` (``admm.extrapolation``):

* ``jump``: all at once at the window end (the literal rule; the loss spikes after every window end,
  then recovers);
* ``spread``: ``e / window`` after each step of the next window, so no step carries a jump (a window-
  scale momentum); the anchor is ``x + e``, so the next window's displacement excludes the spread part;
* ``checked``: all at once, kept only if the loss on the curvature batch does not rise (one scalar
  all-reduce); a rejected jump is undone and the dual reset.

A non-finite extrapolation is skipped and the dual reset, so parameters never become NaN.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ds_dho2.dist.comm import Communicator

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WindowEndResult:
    """What the window end decided: ``extrapolation`` (this rank's slice of ``e``, already capped; None if
    skipped), its global norm and the safeguard's scale (1 = untouched)."""

    extrapolation: torch.Tensor | None
    extrapolation_norm: float
    scale: float

    @property
    def skipped(self) -> bool:
        return self.extrapolation is None


def window_end_extrapolation(x: torch.Tensor, dual: torch.Tensor, anchor: torch.Tensor, *, rho: float,
                             max_extrapolation_ratio: float, comm: Communicator) -> WindowEndResult:
    """Update the dual in place (``y += rho (x - z)``) and return the capped extrapolation ``e = y/rho``;
    neither ``x`` nor ``z`` is touched (``ds_dho2.update.admm`` applies it as the configured mode says)."""
    dual.add_(x - anchor, alpha=rho)
    extrapolation = dual / rho
    norms = torch.stack([(extrapolation * extrapolation).sum(), (x * x).sum()]).to(torch.float64)
    comm.all_reduce(norms)
    if not bool(torch.isfinite(norms).all()):
        logger.warning("ADMM window end skipped: non-finite extrapolation; dual variable reset.")
        dual.zero_()
        anchor.copy_(x)
        return WindowEndResult(extrapolation=None, extrapolation_norm=0.0, scale=0.0)
    extrapolation_norm, x_norm = (float(v) for v in norms.clamp_min(0).sqrt())
    limit = max_extrapolation_ratio * x_norm
    scale = 1.0
    if extrapolation_norm > limit:
        scale = limit / extrapolation_norm if extrapolation_norm > 0 else 0.0
        dual.mul_(scale)
        extrapolation.mul_(scale)
    return WindowEndResult(extrapolation=extrapolation, extrapolation_norm=extrapolation_norm * scale, scale=scale)
