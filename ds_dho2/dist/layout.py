"""ShardLayout: the exact map between a rank's flat partition and the model's parameters.

The global vector is the concatenation of ``params`` (flattened, in order), padded with zeros to
``partition_numel * world_size`` and split into ``world_size`` equal contiguous partitions; rank ``r``
owns partition ``r``. This is DeepSpeed ZeRO-1/2's layout (padding only at the end), and with one rank
and no padding it is the plain single-process case.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


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
