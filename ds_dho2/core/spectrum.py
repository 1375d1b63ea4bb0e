"""Choosing which Ritz pairs become the curvature subspace."""

from __future__ import annotations

from typing import Sequence

import torch


def select_top_magnitude(values: torch.Tensor, k: int, floor_ratio: float) -> torch.Tensor:
    """Indices of the ``k`` largest-|lambda| values, dropping |lambda| < floor_ratio * max|lambda|.

    Returned in descending order of magnitude; empty if every value is zero or non-finite.
    """
    finite = torch.isfinite(values)
    magnitude = torch.where(finite, values.abs(), torch.zeros_like(values))
    if magnitude.numel() == 0 or magnitude.max() <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(magnitude, descending=True)[:k]
    keep = magnitude[order] >= floor_ratio * magnitude.max()
    keep &= magnitude[order] > 0
    return order[keep]


def select_top_algebraic(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` algebraically largest finite values, in descending order."""
    finite_idx = torch.nonzero(torch.isfinite(values)).flatten()
    order = torch.argsort(values[finite_idx], descending=True)[:k]
    return finite_idx[order]


#: a neighbour ratio ``|lambda_i| / |lambda_{i+1}|`` at least this large separates outliers from the bulk: a
#: smooth bulk (Marchenko-Pastur edge, or ``lambda_i ~ i^-a`` with ``a < 1.58``) has none that large
OUTLIER_GAP = 3.0


def outlier_count(values: torch.Tensor | Sequence[float], max_rank: int, min_gap: float,
                  floor: float = 0.0) -> int:
    """How many eigenvalues stand above the bulk: the last position ``i <= max_rank`` whose magnitude is at
    least ``min_gap`` times the next one's, ``|lambda_i| >= min_gap |lambda_{i+1}|`` (0 if there is none).
    Magnitudes below ``floor * max |lambda|`` count as zero, so the rounding noise of an exactly low-rank
    Hessian (a batch smaller than the parameter count) creates no gaps of its own.

    ``values`` are in decreasing order of magnitude. The rule looks at neighbour ratios because they do not
    depend on the loss's scale, and a smooth bulk has neighbour ratios close to 1 everywhere (a
    Marchenko-Pastur edge, or a power law ``lambda_i ~ i^-a``, whose largest ratio is ``2^a`` at ``i = 1``).
    It takes the *last* such gap, not the largest, because the outliers of a classifier are not a tight
    cluster: with outliers ``1000, 50, 40, 30`` over a bulk near 5 the largest ratio is the one between
    ``1000`` and ``50``, yet all four stand above the bulk; with the last gap the count is 4. Gaps past
    ``max_rank`` are not looked at: an outlier group larger than ``max_rank`` shows as a smooth top, so
    ``max_rank`` should exceed the number of classes. When the operator has fewer eigenvalues than
    ``max_rank + 1`` (a tiny model, or an exactly low-rank Hessian) only the computed ones are compared.
    """
    magnitudes = [abs(float(v)) for v in values]
    top = max(magnitudes, default=0.0)
    magnitudes = [m if m >= floor * top else 0.0 for m in magnitudes]
    best = 0
    for i in range(1, min(int(max_rank), len(magnitudes) - 1) + 1):
        above, below = magnitudes[i - 1], magnitudes[i]
        if above > 0 and (below == 0 or above >= min_gap * below):
            best = i
    return best
