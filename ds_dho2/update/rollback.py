"""The last good point of a boosted run, so a curvature-driven divergence is undone rather than carried on.

A heavy-ball base boosts its lr on the complement (``lr_clip > 1``) once a basis is installed; near
heavy-ball's own stability limit the complement then sharpens until the boosted lr no longer fits, and
within a few steps the loss leaves the basin (docs/design.md, "Divergence guard"). The guard sees the rise
only at its next read, when the parameters have already moved far. So at every basis install this part
keeps this rank's slice of the parameters and of the heavy-ball momentum (two vectors of ``P / W``, only
while a boost can apply); when the guard reports a divergence the optimizer puts them back before it drops
the basis and halves the boost. The copy is not saved in checkpoints: after a resume the next install
takes a new one, and until then a divergence is answered without a rollback.
"""

from __future__ import annotations

import dataclasses

import torch

from ds_dho2.config import BaseOptimizer, DHO2Config
from ds_dho2.dist.flat import FlatParameters


@dataclasses.dataclass
class GoodPoint:
    """The parameters and base momentum taken before the first step on basis ``version`` (at ``step``)."""

    version: int
    step: int
    parameters: torch.Tensor
    momentum: torch.Tensor


class Rollback:
    """Takes a :class:`GoodPoint` at each basis install of a boosted heavy-ball run and restores it."""

    def __init__(self, config: DHO2Config) -> None:
        self.active = config.base is BaseOptimizer.HEAVYBALL and config.lr_clip > 1.0 and config.divergence_rollback
        self.point: GoodPoint | None = None

    def before_step(self, basis_version: int | None, step: int, flat: FlatParameters, momentum: torch.Tensor) -> None:
        """Called before a step that uses basis ``basis_version``: keep the point if the basis is new."""
        if not self.active or basis_version is None:
            return
        if self.point is not None and self.point.version == basis_version:
            return
        parameters = flat.values()
        if self.point is not None and self.point.parameters.shape == parameters.shape:
            self.point.parameters.copy_(parameters)  # reuse the buffers: no allocation per refresh
            self.point.momentum.copy_(momentum)
            self.point.version, self.point.step = basis_version, step
        else:
            self.point = GoodPoint(basis_version, step, parameters.clone(), momentum.clone())

    def restore(self, flat: FlatParameters, momentum: torch.Tensor) -> int | None:
        """Put the kept parameters and momentum back; the step they were taken at (None: nothing kept)."""
        point, self.point = self.point, None
        if point is None or point.parameters.shape != momentum.shape:
            return None
        values = flat.values()
        values.copy_(point.parameters)
        flat.assign(values)
        momentum.copy_(point.momentum)
        return point.step


__all__ = ["GoodPoint", "Rollback"]
