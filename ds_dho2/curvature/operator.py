"""The sharded Hessian operator and Lanczos start vectors (docs/design.md, "Curvature").

One product: all-gather this rank's slice of the vector, take ``H v`` on this rank's own batch with a
products session (``ds_dho2.hvp``), average the products across ranks and keep this rank's slice.
"""

from __future__ import annotations

import torch

from ds_dho2.core.lanczos import MatVec
from ds_dho2.dist.comm import Communicator
from ds_dho2.dist.layout import ShardLayout
from ds_dho2.hvp.partitioned import LocalProducts
from ds_dho2.hvp.strategies import ProductSession


def hessian_operator(session: ProductSession, layout: ShardLayout, shard_comm: Communicator,
                     batch_comm: Communicator | None = None) -> MatVec:
    """``q_r -> (H q)_r`` on this rank's partition, ``H`` averaged over the ranks' batches.

    ``shard_comm`` joins the partitions of the vector (all-gather); ``batch_comm`` averages the products
    of the ranks' own micro-batches. Under ZeRO both are the data-parallel group and the average is a
    reduce-scatter; with replicated parameters (ZeRO stage 0) the vector is whole on every rank
    (``shard_comm`` is local) and the products are all-reduced. A ZeRO-3 session
    (:class:`~ds_dho2.hvp.partitioned.LocalProducts`) maps slices to slices itself.
    """
    if isinstance(session, LocalProducts):  # ZeRO-3: the session itself works on this rank's slices
        return session.local_product
    params = layout.params
    batch_comm = shard_comm if batch_comm is None else batch_comm

    def matvec(local_vector: torch.Tensor) -> torch.Tensor:
        full = shard_comm.all_gather(local_vector)[: layout.total_numel]
        vectors = [v.to(p.dtype) for v, p in zip(layout.unflatten(full), params)]
        product = session(vectors)
        flat = layout.flatten(product, dtype=local_vector.dtype)
        if batch_comm is not shard_comm:
            return layout.local_slice(batch_comm.all_reduce_mean(flat)).clone()
        padded = flat.new_zeros(layout.partition_numel * layout.world_size)
        padded[: flat.numel()] = flat
        return shard_comm.reduce_scatter_mean(padded).clone()

    return matvec


def random_start_vector(layout: ShardLayout, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This rank's slice of a Gaussian start vector, the same at every world size (``layout.start_vector``)."""
    return layout.start_vector(seed, dtype, device)


def warm_start_vector(eigenvectors: torch.Tensor, random: torch.Tensor, noise: float,
                      comm: Communicator) -> torch.Tensor:
    """``sum_i v_i / sqrt(k) + noise * r / ||r||``: a Lanczos start with equal weight on every previous
    eigenvector (so a slowly moving subspace is recovered in about k products) plus a random part that
    lets new directions enter."""
    seeded = eigenvectors.sum(dim=0, dtype=random.dtype) / eigenvectors.shape[0] ** 0.5
    if noise > 0:
        norm = comm.all_reduce(torch.dot(random, random).reshape(1)).sqrt().clamp_min(1e-30)
        seeded.add_(random / norm, alpha=noise)
    return seeded
