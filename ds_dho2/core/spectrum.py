"""Choosing which Ritz pairs become the curvature subspace."""

from __future__ import annotations

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
