"""Communicators: the only objects that perform collectives.

The math in ``ds_dho2.core`` receives a communicator and calls ``all_reduce`` / ``all_gather`` on it, so
the same code runs unsharded (``LocalCommunicator``) or over a data-parallel process group
(``TorchDistCommunicator``).
"""

from __future__ import annotations

import abc

import torch


class Communicator(abc.ABC):
    """Sum-reductions and gathers over the ranks that share one flat parameter vector."""

    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def world_size(self) -> int: ...

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place; returns it."""

    @abc.abstractmethod
    def all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate the equally sized 1-D ``local`` tensors of all ranks in rank order."""

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` over ranks, in place; returns it."""
        self.all_reduce(tensor)
        if self.world_size > 1:
            tensor.div_(self.world_size)
        return tensor

    def reduce_scatter_mean(self, full: torch.Tensor) -> torch.Tensor:
        """Average a padded full-length vector over ranks and return this rank's equal-sized partition.

        The default is an all-reduce followed by a slice (gloo has no reduce-scatter); backends that have
        one override this.
        """
        self.all_reduce_mean(full)
        size = full.numel() // self.world_size
        return full[self.rank * size:(self.rank + 1) * size]


class LocalCommunicator(Communicator):
    """The single-process communicator: every collective is the identity."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, local: torch.Tensor) -> torch.Tensor:
        return local


class TorchDistCommunicator(Communicator):
    """Collectives over a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, group: object | None = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchDistCommunicator needs an initialised torch.distributed process group.")
        self._dist = dist
        self._group = group
        self._rank = dist.get_rank(group=group)
        self._world_size = dist.get_world_size(group=group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size > 1:
            self._dist.all_reduce(tensor, group=self._group)
        return tensor

    def all_gather(self, local: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return local
        out = torch.empty(local.numel() * self._world_size, dtype=local.dtype, device=local.device)
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        gather(out, local.contiguous(), group=self._group)
        return out

    def reduce_scatter_mean(self, full: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1 or self._dist.get_backend(self._group) == "gloo":
            return super().reduce_scatter_mean(full)
        out = torch.empty(full.numel() // self._world_size, dtype=full.dtype, device=full.device)
        self._dist.reduce_scatter_tensor(out, full.contiguous(), group=self._group)
        return out.div_(self._world_size)
