"""``estimate_top_eigenpairs``: the top Hessian eigenpairs of any loss closure, outside training."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ds_dho2.config import HVPMethod
from ds_dho2.core.lanczos import LanczosRun
from ds_dho2.core.spectrum import select_top_algebraic
from ds_dho2.curvature.operator import hessian_operator, random_start_vector
from ds_dho2.dist.comm import LocalCommunicator
from ds_dho2.dist.layout import ShardLayout
from ds_dho2.hvp.selection import ProductInputs, StrategyChooser


def estimate_top_eigenpairs(model: torch.nn.Module, loss_closure: Callable[[], torch.Tensor], k: int,
                            order: int | None = None, seed: int = 0, hvp: str | HVPMethod = "auto",
                            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest Hessian eigenvalues of ``loss_closure()`` (descending) and unit eigenvectors.

    Returns ``(eigenvalues (k,), eigenvectors (k, P))`` where ``P`` indexes ``model.parameters()``
    flattened in order. ``order`` is the Lanczos order (default ``4k``, capped at ``P``); the run is cold
    and complete (no convergence stop). Fewer than ``k`` pairs are returned if Lanczos breaks down earlier
    (an operator of rank < ``k``).
    """
    if k < 1:
        raise ValueError(f"Invalid {k=}. Must be >= 1.")
    params: Sequence[torch.nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
    layout = ShardLayout.unsharded(params)
    order = min(order if order is not None else 4 * k, layout.total_numel)
    if order < k:
        raise ValueError(f"Invalid {order=}. Must be >= k ({k}).")
    comm = LocalCommunicator()
    method = hvp if isinstance(hvp, HVPMethod) else HVPMethod(str(hvp).lower())
    inputs = ProductInputs(model=model, params=list(params), replay=loss_closure, full_replay=loss_closure)
    session = StrategyChooser(method, seed=seed).open(inputs, expected_products=order)
    try:
        operator = hessian_operator(session, layout, comm)
        start = random_start_vector(layout, seed, dtype, params[0].device)
        run = LanczosRun.start(start, order, comm).run(operator, comm)
    finally:
        session.close()
    pairs = run.ritz_pairs()
    chosen = select_top_algebraic(pairs.values, k)
    return pairs.values[chosen].to(dtype), pairs.local_vectors[chosen]
