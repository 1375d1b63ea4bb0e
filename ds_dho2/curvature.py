"""Curvature estimation: the sharded Hessian operator and top eigenpairs from Lanczos.

``hessian_operator`` implements one distributed Lanczos product (DESIGN.md section 2): all-gather the
current vector, HVP on this rank's own batch, average across ranks and keep this rank's slice.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ds_dho2.config import HVPMethod
from ds_dho2.core.lanczos import LanczosRun, MatVec
from ds_dho2.core.spectrum import select_top_algebraic
from ds_dho2.dist.comm import Communicator, LocalCommunicator
from ds_dho2.dist.layout import ShardLayout
from ds_dho2.hvp.strategies import HessianVectorProduct, LossClosure


def hessian_operator(model: torch.nn.Module, closure: LossClosure, hvp: HessianVectorProduct,
                     layout: ShardLayout, shard_comm: Communicator, batch_comm: Communicator | None = None) -> MatVec:
    """``q_r -> (H q)_r`` on this rank's partition, ``H`` averaged over the ranks' batches.

    ``shard_comm`` joins the partitions of the vector (all-gather); ``batch_comm`` averages the products
    of the ranks' own micro-batches. Under ZeRO both are the data-parallel group and the average is a
    reduce-scatter; with replicated parameters (ZeRO stage 0) the vector is whole on every rank
    (``shard_comm`` is local) and the products are all-reduced.
    """
    params = layout.params
    batch_comm = shard_comm if batch_comm is None else batch_comm

    def matvec(local_vector: torch.Tensor) -> torch.Tensor:
        full = shard_comm.all_gather(local_vector)[: layout.total_numel]
        vectors = [v.to(p.dtype) for v, p in zip(layout.unflatten(full), params)]
        product = hvp(model, params, closure, vectors)
        flat = layout.flatten(product, dtype=local_vector.dtype)
        if batch_comm is not shard_comm:
            return layout.local_slice(batch_comm.all_reduce_mean(flat))
        padded = flat.new_zeros(layout.partition_numel * layout.world_size)
        padded[: flat.numel()] = flat
        return shard_comm.reduce_scatter_mean(padded).clone()

    return matvec


def lanczos_start_vector(layout: ShardLayout, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This rank's slice of a Gaussian vector over the full (unpadded) parameter space.

    Drawn identically on every rank from ``seed``, so a sharded run starts where the unsharded run does.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    full = torch.randn(layout.total_numel, generator=generator, dtype=dtype)
    return layout.local_slice(full).to(device)


def estimate_top_eigenpairs(model: torch.nn.Module, loss_closure: Callable[[], torch.Tensor], k: int,
                            order: int | None = None, seed: int = 0, hvp: str | HVPMethod = "auto",
                            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest Hessian eigenvalues of ``loss_closure()`` (descending) and unit eigenvectors.

    Returns ``(eigenvalues (k,), eigenvectors (k, P))`` where ``P`` indexes ``model.parameters()``
    flattened in order. ``order`` is the Lanczos order (default ``4k``, capped at ``P``). Fewer than ``k``
    pairs are returned if Lanczos breaks down earlier (an operator of rank < ``k``).
    """
    if k < 1:
        raise ValueError(f"Invalid {k=}. Must be >= 1.")
    params: Sequence[torch.nn.Parameter] = list(model.parameters())
    layout = ShardLayout.unsharded(params)
    order = min(order if order is not None else 4 * k, layout.total_numel)
    if order < k:
        raise ValueError(f"Invalid {order=}. Must be >= k ({k}).")
    comm = LocalCommunicator()
    device = params[0].device
    operator = hessian_operator(model, loss_closure, HessianVectorProduct(hvp), layout, comm)
    run = LanczosRun.start(lanczos_start_vector(layout, seed, dtype, device), order, comm).run(operator, comm)
    pairs = run.ritz_pairs()
    chosen = select_top_algebraic(pairs.values, k)
    return pairs.values[chosen].to(dtype), pairs.local_vectors[chosen]
