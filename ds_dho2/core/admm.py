"""ADMM-like coupling of successive windows (DESIGN.md section 4), on one rank's flat slice.

Every step the update sees ``g + y``. At a window end: ``y <- y + rho*(x - z)``, ``x <- x + y/rho``,
``z <- x``. Safeguard: the extrapolation ``e = y/rho`` is scaled so that ``||e|| <= ratio * ||x||``
(global norms across ranks); when it is scaled, ``y`` is scaled by the same factor so the dual keeps
describing the displacement that was actually applied. An optional ``dual_decay`` then shrinks ``y``
(a second safeguard: with 1.0 ``y/rho`` is the sum of all past window displacements). A non-finite extrapolation is skipped and the dual
reset, so parameters never become NaN.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ds_dho2.dist.comm import Communicator

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WindowEndResult:
    """What the window end did: the applied extrapolation norm and the safeguard's scale (1 = untouched)."""

    extrapolation_norm: float
    scale: float
    skipped: bool


def admm_window_end(x: torch.Tensor, dual: torch.Tensor, anchor: torch.Tensor, *, rho: float,
                    max_extrapolation_ratio: float, comm: Communicator, dual_decay: float = 1.0) -> WindowEndResult:
    """Apply the window-end rule in place on ``x`` (parameters), ``dual`` (y) and ``anchor`` (z)."""
    dual.add_(x - anchor, alpha=rho)
    extrapolation = dual / rho
    norms = torch.stack([(extrapolation * extrapolation).sum(), (x * x).sum()]).to(torch.float64)
    comm.all_reduce(norms)
    extrapolation_norm, x_norm = (float(v) for v in norms.clamp_min(0).sqrt())
    if not (torch.isfinite(norms).all() and torch.isfinite(torch.tensor(extrapolation_norm))):
        logger.warning("ADMM window end skipped: non-finite extrapolation; dual variable reset.")
        dual.zero_()
        anchor.copy_(x)
        return WindowEndResult(extrapolation_norm=0.0, scale=0.0, skipped=True)
    limit = max_extrapolation_ratio * x_norm
    scale = 1.0
    if extrapolation_norm > limit:
        scale = limit / extrapolation_norm if extrapolation_norm > 0 else 0.0
        dual.mul_(scale)
        extrapolation.mul_(scale)
    x.add_(extrapolation)
    anchor.copy_(x)
    if dual_decay != 1.0:
        dual.mul_(dual_decay)
    return WindowEndResult(extrapolation_norm=extrapolation_norm * scale, scale=scale, skipped=False)
