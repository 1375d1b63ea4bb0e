"""The curvature tracker: when and how the top-k Hessian eigenbasis is refreshed (docs/design.md, "Curvature")."""

from ds_dho2.curvature.estimate import estimate_top_eigenpairs
from ds_dho2.curvature.tracker import CurvatureTracker

__all__ = ["CurvatureTracker", "estimate_top_eigenpairs"]
