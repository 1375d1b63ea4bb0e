"""The exact maps between a rank's flat partition and the model's parameters.

:class:`ShardLayout`: the global vector is the concatenation of ``params`` (flattened, in order), padded
with zeros to ``partition_numel * world_size`` and split into ``world_size`` equal contiguous partitions;
rank ``r`` owns partition ``r``. This is DeepSpeed ZeRO-1/2's layout (padding only at the end), and with
one rank and no padding it is the plain single-process case. :class:`ParameterShardLayout` is ZeRO-3's,
where every parameter is split on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


def parameter_gaussian(seed: int, index: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Parameter ``index``'s part of a Gaussian vector, drawn on the CPU from its own seed: the same on every
    rank, device and world size, and never needing the whole vector at once."""
    generator = torch.Generator(device="cpu").manual_seed(seed * 7919 + index)
    return torch.randn(numel, generator=generator, dtype=torch.float32).to(dtype)


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Geometry of one flat, partitioned parameter vector.

    ``params`` are the module parameters in flat-buffer order; ``partition_numel`` includes padding.
    """

    params: tuple[torch.nn.Parameter, ...]
    rank: int
    world_size: int
    partition_numel: int

    def __post_init__(self) -> None:
        if self.partition_numel * self.world_size < self.total_numel:
            raise ValueError(
                f"Invalid ShardLayout: {self.world_size} partitions of {self.partition_numel} elements cannot "
                f"hold {self.total_numel} parameters."
            )

    @classmethod
    def unsharded(cls, params: Sequence[torch.nn.Parameter]) -> "ShardLayout":
        """The single-process layout: one partition holding every parameter, no padding."""
        params = tuple(params)
        return cls(params=params, rank=0, world_size=1, partition_numel=sum(p.numel() for p in params))

    @property
    def total_numel(self) -> int:
        """P: the number of real (unpadded) parameters."""
        return sum(p.numel() for p in self.params)

    def record(self) -> dict[str, int]:
        """The facts a checkpoint keeps to recognise this layout: world size, partition and total sizes."""
        return {"world_size": self.world_size, "partition_numel": self.partition_numel,
                "total_numel": self.total_numel}

    @property
    def local_start(self) -> int:
        """Offset of this rank's partition in the global padded vector."""
        return self.rank * self.partition_numel

    @property
    def local_valid_numel(self) -> int:
        """Elements of this rank's partition that are real parameters (the rest is padding)."""
        return max(0, min(self.partition_numel, self.total_numel - self.local_start))

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's partition of an unpadded full-length vector (padded with zeros if needed)."""
        part = full[self.local_start:self.local_start + self.local_valid_numel]
        if part.numel() == self.partition_numel:
            return part
        out = full.new_zeros(self.partition_numel)
        out[:part.numel()] = part
        return out

    def flatten(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Concatenate per-parameter tensors into one unpadded full-length vector."""
        return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in tensors])

    def unflatten(self, full: torch.Tensor) -> list[torch.Tensor]:
        """Split an unpadded (or padded) full-length vector into views shaped like ``params``."""
        out, offset = [], 0
        for p in self.params:
            out.append(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def per_element(self, values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This rank's partition of a vector holding ``values[i]`` on every element of ``params[i]``."""
        counts = torch.tensor([p.numel() for p in self.params], device=device)
        full = torch.repeat_interleave(torch.tensor(list(values), dtype=dtype, device=device), counts)
        return self.local_slice(full)

    def start_vector(self, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This rank's slice of :func:`parameter_gaussian` over the full (unpadded) parameter space: a
        sharded run starts where the unsharded run does, and where a ZeRO-3 run does."""
        full = torch.cat([parameter_gaussian(seed, index, p.numel(), dtype) for index, p in enumerate(self.params)])
        return self.local_slice(full).to(device)


@dataclasses.dataclass(frozen=True)
class ParameterShardLayout:
    """Geometry of DeepSpeed ZeRO-3's partitions: every parameter is split on its own.

    Parameter ``p`` (``numels[i]`` elements, flattened) is padded to ``partition_sizes[i] * world_size`` and
    split into equal contiguous slices; rank ``r`` owns slice ``r`` of every parameter, and its flat vector
    is the concatenation of its slices in ``params`` order (ZeRO-3's fp32 partition of one sub-group). So
    a rank never needs a full-length vector: everything here works slice by slice.
    """

    params: tuple[torch.nn.Parameter, ...]
    rank: int
    world_size: int
    partition_sizes: tuple[int, ...]
    numels: tuple[int, ...]

    @property
    def total_numel(self) -> int:
        return sum(self.numels)

    @property
    def partition_numel(self) -> int:
        return sum(self.partition_sizes)

    def record(self) -> dict[str, int]:
        return {"world_size": self.world_size, "partition_numel": self.partition_numel,
                "total_numel": self.total_numel}

    def slices(self) -> list[tuple[int, int, int]]:
        """Per parameter: ``(offset in this rank's vector, first element of the parameter it holds, valid
        elements)``; the slice's remaining ``partition_sizes[i] - valid`` elements are padding."""
        out, offset = [], 0
        for size, numel in zip(self.partition_sizes, self.numels):
            first = self.rank * size
            out.append((offset, first, max(0, min(size, numel - first))))
            offset += size
        return out

    def local_of(self, index: int, full_parameter: torch.Tensor) -> torch.Tensor:
        """This rank's slice (padded) of one whole parameter-shaped tensor."""
        size = self.partition_sizes[index]
        flat = full_parameter.reshape(-1)
        out = flat.new_zeros(size)
        _, first, valid = self.slices()[index]
        out[:valid] = flat[first:first + valid]
        return out

    def per_element(self, values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This rank's vector holding ``values[i]`` on the real elements of parameter ``i`` (0 on padding)."""
        out = torch.zeros(self.partition_numel, dtype=dtype, device=device)
        for (offset, _, valid), value in zip(self.slices(), values):
            out[offset:offset + valid] = value
        return out

    def start_vector(self, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This rank's slice of :func:`parameter_gaussian`, so every world size (and ZeRO stage) draws the
        same vector without holding it whole."""
        parts = [self.local_of(index, parameter_gaussian(seed, index, numel, dtype))
                 for index, numel in enumerate(self.numels)]
        return torch.cat(parts).to(device)
