"""Hessian-vector products on ZeRO-3 partitions, where no rank holds the whole parameter vector.

Finite differences of gradients need neither second-order autograd nor a full-length vector: each rank
adds ``h * v_r`` to its own slices of the partitioned parameters (``param.ds_tensor``), the model runs
forward and backward with ZeRO-3 gathering and releasing each layer's parameters as in training, and each
parameter's gradient, as soon as autograd has it, is averaged over the ranks and cut to this rank's slice
(a hook that returns a zero-stride zero, so no whole gradient outlives its layer). The product is
``(g_r(x + h v) - g_r(x)) / h``, ``g_r(x)`` computed once per session. ``torch.autograd.grad`` accumulates
nothing into ``.grad``, so ZeRO's gradient hooks, buckets and partitions are not touched, and the
parameters' slices are restored exactly afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch

from ds_dho2.dist.comm import Communicator
from ds_dho2.dist.layout import ParameterShardLayout
from ds_dho2.hvp.strategies import hvp_context

LossClosure = Callable[[], torch.Tensor]


class LocalProducts:
    """Marker base of sessions whose products take and return this rank's slice (``local_product``)."""

    def local_product(self, local_vector: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release."""


def _held_whole(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 keeps this parameter whole on every rank between forwards (a persistent one, below
    ``stage3_param_persistence_threshold``), so its module value is ``param.data``, not its slice."""
    return (param.ds_numel > 0 and param.data.numel() == param.ds_numel
            and param.data.data_ptr() != param.ds_tensor.data_ptr())  # one rank: the slice is the value


@contextlib.contextmanager
def shifted_partitions(layout: ParameterShardLayout, shift: torch.Tensor | None,
                       comm: Communicator | None = None) -> Iterator[None]:
    """Add ``shift`` (this rank's slice) to the parameters for the duration, then restore them bit for bit:
    to each slice (``ds_tensor``) and, for the small parameters ZeRO-3 keeps whole, to the whole value too
    (their shift is gathered over ``comm``; they are below the persistence threshold)."""
    if shift is None:
        yield
        return
    whole = [i for i, p in enumerate(layout.params) if _held_whole(p)]
    saved = [p.ds_tensor.detach().clone() for p in layout.params]
    saved_whole = {i: layout.params[i].data.clone() for i in whole}
    try:
        for index, ((offset, _, _), size, p) in enumerate(zip(layout.slices(), layout.partition_sizes,
                                                               layout.params)):
            piece = shift[offset:offset + size]
            p.ds_tensor.data.add_(piece.to(p.ds_tensor.dtype))
            if index in saved_whole:
                gathered = piece if comm is None else comm.all_gather(piece.contiguous())
                p.data.add_(gathered[:p.ds_numel].view_as(p.data).to(p.dtype))
        yield
    finally:
        for p, original in zip(layout.params, saved):
            p.ds_tensor.data.copy_(original)
        for index, original in saved_whole.items():
            layout.params[index].data.copy_(original)


@dataclasses.dataclass(frozen=True)
class Partitions:
    """What a ZeRO-3 product needs besides the model and the loss: the partition layout, the data-parallel
    group, ZeRO-3's release of the layers whose post-backward hook did not fire (a layer fed inputs that
    need no gradient keeps its gathered parameters until it is told), and a context that stops ZeRO-3 from
    prefetching parameters during a product (its prefetch follows the training pass's recorded order and
    could gather slices before they are shifted or after they are restored)."""

    layout: ParameterShardLayout
    comm: Communicator
    release_after_backward: Callable[[], None] = lambda: None
    #: a context for each products forward/backward (ZeRO-3: no parameter prefetching)
    quiet: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def local_gradient(model: torch.nn.Module, partitions: Partitions, closure: LossClosure) -> torch.Tensor:
    """This rank's slice of the gradient of ``closure()``, averaged over the ranks, in float32 or better."""
    layout, comm = partitions.layout, partitions.comm
    params, slices = list(layout.params), {}
    dtype = torch.promote_types(params[0].dtype, torch.float32)

    def slicer(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def keep_slice(grad: torch.Tensor) -> torch.Tensor:
            size = layout.partition_sizes[index]
            padded = torch.zeros(size * layout.world_size, dtype=dtype, device=grad.device)
            padded[:grad.numel()] = grad.reshape(-1)
            slices[index] = comm.reduce_scatter_mean(padded).clone()
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand_as(grad)

        return keep_slice

    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    handles = [params[i].register_hook(slicer(i)) for i in trainable]
    try:
        with partitions.quiet(), hvp_context(model):
            loss = closure()
            torch.autograd.grad(loss, [params[i] for i in trainable], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        partitions.release_after_backward()
    device = layout.params[0].ds_tensor.device
    return torch.cat([slices.get(i, torch.zeros(size, dtype=dtype, device=device))
                      for i, size in enumerate(layout.partition_sizes)])


class PartitionedFiniteDifference(LocalProducts):
    """Forward differences of gradients on ZeRO-3 partitions (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, partitions: Partitions, closure: LossClosure) -> None:
        self.model, self.partitions, self.closure = model, partitions, closure
        self.layout, self.comm = partitions.layout, partitions.comm
        layout, comm = self.layout, self.comm
        self._base = local_gradient(model, partitions, closure)
        coarsest = max(torch.finfo(p.ds_tensor.dtype).eps for p in layout.params)
        self._relative_step = coarsest ** 0.5
        x_sq = sum((p.ds_tensor.detach().double() ** 2).sum() for p in layout.params)  # padding is zero
        self._x_norm = float(comm.all_reduce(torch.as_tensor(x_sq, dtype=torch.float64).reshape(1)).sqrt())

    def local_product(self, local_vector: torch.Tensor) -> torch.Tensor:
        v_norm = float(self.comm.all_reduce(torch.dot(local_vector.double(), local_vector.double()).reshape(1)).sqrt())
        if v_norm == 0:
            return torch.zeros_like(self._base)
        step = self._relative_step * (1.0 + self._x_norm) / v_norm
        with torch.no_grad(), shifted_partitions(self.layout, step * local_vector, self.comm):
            with torch.enable_grad():
                plus = local_gradient(self.model, self.partitions, self.closure)
        return (plus - self._base).div_(step)

    def close(self) -> None:
        self._base = torch.zeros(0)
