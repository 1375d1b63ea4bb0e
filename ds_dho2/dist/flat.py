"""The optimizer's parameters as one flat vector ``x`` of this rank's elements.

DHO2 works on a single flat vector. Where it comes from is the one difference between its two set-ups,
and it lives here instead of in branches across the optimizer:

* :class:`PartitionParameters` -- DeepSpeed ZeRO-1/2 hands the optimizer this rank's flat fp32 partition
  (one tensor, possibly ending in padding); ``x`` *is* that tensor, and ZeRO copies it into the module's
  parameters after ``step()``; :class:`ParameterPartitions` is the same for ZeRO-3, whose module
  parameters are partitioned too (each rank holds its slices in ``param.ds_tensor``);
* :class:`SeparateParameters` -- plain PyTorch and ZeRO stage 0: the module's own parameters, read into
  one flat gradient buffer and updated through views of the flat update. A parameter whose ``.grad`` is
  None at a step (frozen, or unused by the loss) is not touched by it, weight decay included, as
  ``torch.optim.AdamW`` leaves it.
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch

from ds_dho2.dist.layout import ParameterShardLayout, ShardLayout


def views(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive slices of ``flat`` shaped like ``params``."""
    return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]


class FlatParameters(abc.ABC):
    """Access to ``x``, its gradient and its update, for one layout."""

    def __init__(self, layout: ShardLayout) -> None:
        self.layout = layout

    @property
    @abc.abstractmethod
    def numel(self) -> int:
        """Elements of this rank's ``x`` (the partition, padding included)."""

    @property
    def device(self) -> torch.device:
        return self.layout.params[0].device

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of ``x`` and of the optimizer's sharded state (at least float32)."""

    @property
    @abc.abstractmethod
    def state_key(self) -> torch.Tensor:
        """The tensor under which ``optimizer.state`` keeps this vector's state, the torch way."""

    @abc.abstractmethod
    def gradient(self) -> torch.Tensor | None:
        """This step's flat gradient, or None when no parameter has one."""

    @abc.abstractmethod
    def values(self) -> torch.Tensor:
        """``x``: the partition itself, or a new flat copy of separate parameters."""

    @abc.abstractmethod
    def apply(self, update: torch.Tensor, lr: float, weight_decay: float | torch.Tensor,
              keep: torch.Tensor) -> None:
        """``x <- x * (1 - lr * weight_decay * keep) + update``."""

    @abc.abstractmethod
    def assign(self, x: torch.Tensor) -> None:
        """Make ``x`` (changed in place or a new value of :meth:`values`) the parameters' value."""

    @abc.abstractmethod
    def pending_module_update(self, x: torch.Tensor) -> torch.Tensor | None:
        """This step's update that the module's parameters do not hold yet, or None when they hold it."""


class PartitionParameters(FlatParameters):
    """This rank's flat ZeRO-1/2 partition: ``params[0]`` of the optimizer's group."""

    def __init__(self, layout: ShardLayout, partition: torch.Tensor) -> None:
        super().__init__(layout)
        self.partition = partition

    @property
    def numel(self) -> int:
        return self.partition.numel()

    @property
    def device(self) -> torch.device:
        return self.partition.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.partition.dtype, torch.float32)

    @property
    def state_key(self) -> torch.Tensor:
        return self.partition

    def gradient(self) -> torch.Tensor | None:
        grad = self.partition.grad
        return None if grad is None else grad.data

    def values(self) -> torch.Tensor:
        return self.partition.data

    def apply(self, update: torch.Tensor, lr: float, weight_decay: float | torch.Tensor,
              keep: torch.Tensor) -> None:
        x = self.partition.data
        if isinstance(weight_decay, torch.Tensor) or weight_decay != 0:
            x.mul_(1 - lr * weight_decay * keep)
        x.add_(update.to(x.dtype))

    def assign(self, x: torch.Tensor) -> None:
        if x.data_ptr() != self.partition.data_ptr():
            self.partition.data.copy_(x)

    def pending_module_update(self, x: torch.Tensor) -> torch.Tensor | None:
        module = self.layout.flatten([p.detach() for p in self.layout.params], dtype=x.dtype)
        return x - self.layout.local_slice(module)


class ParameterPartitions(PartitionParameters):
    """ZeRO-3: the fp32 partition of this rank's parameter slices (one sub-group), laid out by a
    :class:`~ds_dho2.dist.layout.ParameterShardLayout`; the module's own values are the ``ds_tensor`` slices."""

    layout: ParameterShardLayout

    def pending_module_update(self, x: torch.Tensor) -> torch.Tensor | None:
        module = torch.cat([p.ds_tensor.detach().reshape(-1).to(x.dtype) for p in self.layout.params])
        return x - module


class SeparateParameters(FlatParameters):
    """The module's parameters themselves (plain PyTorch, ZeRO stage 0), whole on this rank."""

    def __init__(self, layout: ShardLayout) -> None:
        super().__init__(layout)
        self._grad_buffer: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []
        self._update_buffer: torch.Tensor | None = None
        self._update_views: list[torch.Tensor] = []
        self._with_grad: list[int] | None = None  # None: every parameter had a gradient at this step

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return self.layout.params

    @property
    def numel(self) -> int:
        return self.layout.total_numel

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.params[0].dtype, torch.float32)

    @property
    def state_key(self) -> torch.Tensor:
        return self.params[0]

    def gradient(self) -> torch.Tensor | None:
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            return None
        if self._grad_buffer is None or self._grad_buffer.dtype != self.dtype:
            self._grad_buffer = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            self._grad_views = views(self._grad_buffer, self.params)
        if any(g is None for g in grads):
            self._with_grad = [i for i, g in enumerate(grads) if g is not None]
            for view, g in zip(self._grad_views, grads):
                view.zero_() if g is None else view.copy_(g)
        else:
            self._with_grad = None
            torch._foreach_copy_(self._grad_views, grads)  # one call; casts where dtypes differ
        return self._grad_buffer

    def values(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).to(self.dtype)

    def apply(self, update: torch.Tensor, lr: float, weight_decay: float | torch.Tensor,
              keep: torch.Tensor) -> None:
        params = list(self.params)
        if isinstance(weight_decay, torch.Tensor):
            update = update - (lr * weight_decay * keep) * self.values()
        update_views = self._views_of(update)
        if self._with_grad is not None:
            params = [params[i] for i in self._with_grad]
            update_views = [update_views[i] for i in self._with_grad]
            if not params:
                return
        if not isinstance(weight_decay, torch.Tensor) and weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay * keep)
        if update_views[0].dtype != params[0].dtype:
            update_views = [v.to(p.dtype) for v, p in zip(update_views, params)]
        torch._foreach_add_(params, update_views)

    def _views_of(self, update: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of ``update``, cached for the buffer the optimizer reuses every step."""
        if update is not self._update_buffer:
            self._update_buffer, self._update_views = update, views(update, self.params)
        return self._update_views

    def assign(self, x: torch.Tensor) -> None:
        for p, chunk in zip(self.params, x.split([p.numel() for p in self.params])):
            p.data.copy_(chunk.view_as(p))

    def pending_module_update(self, x: torch.Tensor) -> torch.Tensor | None:
        return None


__all__ = ["FlatParameters", "ParameterPartitions", "PartitionParameters", "SeparateParameters", "views"]
