"""Declarations of where each piece of optimizer state lives (docs/design.md, "Where state lives").

Every component of DHO2 (base moments, curvature tracker, Newton momentum, ADMM coupling, non-finite
guard) keeps its state in a small dataclass derived from :class:`ComponentState`, and each field says
where it lives:

* :func:`sharded` -- one value per element of this rank's flat partition: a 1-D tensor of ``P_r``
  elements, or a 2-D tensor with one such row per vector (eigenvectors, the Lanczos basis). A sharded
  field may name a ``rows_in_use`` method, so only the rows that hold data are saved;
* :func:`replicated` -- the same on every rank: counters, flags, eigenvalues, small tensors;
* :func:`nested` -- another state object (or None), such as the Lanczos run inside the curvature state.

That is all :mod:`ds_dho2.checkpoint` needs to build DeepSpeed's flat optimizer state and the universal
form, and all :meth:`ComponentState.resize_partition` needs to re-partition a state: no component is
known to the codec by name.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar, Iterator

import torch


class Placement(str, enum.Enum):
    """Where a state field lives: on this rank's partition, on every rank alike, or in a nested state."""

    SHARDED = "sharded"
    REPLICATED = "replicated"
    NESTED = "nested"


_PLACEMENT = "placement"
_ROWS_IN_USE = "rows_in_use"
_NESTED_TYPE = "nested_type"


def sharded(*, rows_in_use: str | None = None) -> Any:
    """A field holding a partition-length tensor (1-D) or rows of them (2-D), or None.

    ``rows_in_use`` names a method of the state object returning how many leading rows hold data.
    """
    return dataclasses.field(default=None, metadata={_PLACEMENT: Placement.SHARDED, _ROWS_IN_USE: rows_in_use})


def replicated(default: Any = None, *, default_factory: Any = None) -> Any:
    """A field whose value is the same on every rank (plain Python values or small tensors)."""
    metadata = {_PLACEMENT: Placement.REPLICATED}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def nested(state_type: type["ComponentState"]) -> Any:
    """A field holding another state object of ``state_type`` (or None)."""
    return dataclasses.field(default=None, metadata={_PLACEMENT: Placement.NESTED, _NESTED_TYPE: state_type})


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One declared field: its name, placement and (for sharded rows / nested states) extra facts."""

    name: str
    placement: Placement
    rows_in_use: str | None = None
    nested_type: type | None = None


class ComponentState:
    """Base of the state dataclasses: iterates the declared fields and moves or re-partitions them.

    ``SAVED_PREFIX`` is how the checkpoint names this component's sharded entries (``None``: the default
    ``dho2_<component>_``); the base moments use ``""`` so DeepSpeed's own tools see ``exp_avg`` etc.
    """

    SAVED_PREFIX: ClassVar[str | None] = None

    @classmethod
    def field_specs(cls) -> tuple[FieldSpec, ...]:
        specs = []
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            placement = field.metadata.get(_PLACEMENT)
            if placement is None:
                raise TypeError(f"{cls.__name__}.{field.name} declares no placement: use sharded(), "
                                "replicated() or nested().")
            specs.append(FieldSpec(field.name, placement, field.metadata.get(_ROWS_IN_USE),
                                   field.metadata.get(_NESTED_TYPE)))
        return tuple(specs)

    def rows_to_save(self, spec: FieldSpec, value: torch.Tensor) -> int:
        """Rows of a 2-D sharded ``value`` that hold data (all of them unless ``rows_in_use`` says less)."""
        if spec.rows_in_use is None:
            return value.shape[0]
        return min(int(getattr(self, spec.rows_in_use)()), value.shape[0])

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor of this state and its nested states (for device moves and checks)."""
        for spec in self.field_specs():
            value = getattr(self, spec.name)
            if spec.placement is Placement.NESTED:
                if value is not None:
                    yield from value.tensors()
            elif torch.is_tensor(value):
                yield value

    def to_(self, device: torch.device) -> None:
        """Move every tensor to ``device`` in place of the old ones."""
        for spec in self.field_specs():
            value = getattr(self, spec.name)
            if spec.placement is Placement.NESTED:
                if value is not None:
                    value.to_(device)
            elif torch.is_tensor(value):
                setattr(self, spec.name, value.to(device))

    def resize_partition(self, numel: int) -> None:
        """Give every sharded tensor ``numel`` columns: new elements are zeros, dropped ones vanish.

        Used when parameters join a plain (unpartitioned) DHO2: eigenvectors padded with zeros stay
        orthonormal, and a zero moment is what the base optimizer starts a new parameter with.
        """
        for spec in self.field_specs():
            value = getattr(self, spec.name)
            if spec.placement is Placement.NESTED and value is not None:
                value.resize_partition(numel)
            elif spec.placement is Placement.SHARDED and value is not None:
                resized = value.new_zeros(*value.shape[:-1], numel)
                keep = min(numel, value.shape[-1])
                resized[..., :keep] = value[..., :keep]
                setattr(self, spec.name, resized)


__all__ = ["ComponentState", "FieldSpec", "Placement", "nested", "replicated", "sharded"]
