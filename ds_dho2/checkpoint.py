"""DHO2's saved state, built from the components' declarations alone (docs/design.md, "Checkpoints").

The live state belongs to the components, each a :class:`~ds_dho2.core.state.ComponentState` whose fields
say whether they are sharded (one value per element of the rank's partition) or replicated. The saved
form is the one DeepSpeed's regular and universal checkpoints can carry and re-partition:

* ``state[0]`` holds ``step`` and one 1-D tensor the size of the rank's partition per sharded vector:
  ``<prefix><field>`` for a 1-D field, ``<prefix><field>_<i>`` for each row in use of a 2-D field, where the
  prefix is ``dho2_<component>_`` (``""`` for the base moments, so DeepSpeed sees ``exp_avg`` etc.);
* ``param_groups[0]["dho2_replicated"]`` holds, as plain Python values, every replicated field, the dtype
  and row count of every sharded one, and the layout (world size, partition and total sizes) it was
  saved with.

:func:`pack` writes that form; :func:`unpack` fills the live components from it, with the saved layout (a
regular checkpoint, which must match this run) or the current one (a universal checkpoint, whose 1-D
entries DeepSpeed has already re-partitioned for this rank). Float64 entries travel through a universal
checkpoint as two float32 halves, ``<name>`` and ``<name>__lo`` (DeepSpeed loads every optimizer state
there as float32); :func:`unpack` adds them back, to within 2**-48 relative.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from ds_dho2.core.state import ComponentState, FieldSpec, Placement

logger = logging.getLogger(__name__)

#: version of the saved form; other versions are refused with a message
FORMAT = 2
#: the param-group entry holding the replicated part
GROUP_KEY = "dho2_replicated"
#: prefix of every flat per-element entry DHO2 adds beside the base moments
FLAT_PREFIX = "dho2_"
#: suffix of the low float32 half of a float64 entry in a universal checkpoint
LO_SUFFIX = "__lo"
STEP_KEY = "step"
CONVERT_COMMAND = "ds-dho2 to-universal INPUT_FOLDER OUTPUT_FOLDER"

_TENSOR_TAG = "__tensor__"


class CheckpointFormatError(RuntimeError):
    """A checkpoint's DHO2 state is missing, incomplete, of another format or written for another layout."""


def missing_state_message(detail: str) -> str:
    """The one-line refusal of a universal checkpoint without DHO2's state (``detail`` says what is missing)."""
    return (f"DHO2 cannot resume from this universal checkpoint: it has no DHO2 curvature state ({detail}), "
            "which DeepSpeed's ds_to_universal drops. Convert the original DeepSpeed checkpoint with "
            f"'{CONVERT_COMMAND}' instead and load that.")


def world_size_message(saved: int, current: int) -> str:
    """The refusal of a regular ZeRO checkpoint loaded at another data-parallel world size."""
    return (f"DHO2 cannot load this checkpoint at world size {current}: it was saved at world size {saved}, and "
            "its optimizer state (base moments and curvature) is partitioned per rank. Convert it with "
            f"'{CONVERT_COMMAND}' and load the result with \"checkpoint\": {{\"load_universal\": true}}, or resume "
            f"at world size {saved}.")


def is_flat_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(FLAT_PREFIX)


def component_prefix(name: str, state: ComponentState) -> str:
    return state.SAVED_PREFIX if state.SAVED_PREFIX is not None else f"{FLAT_PREFIX}{name}_"


# ------------------------------------------------------------------------------------------------ pack
def pack(components: Mapping[str, ComponentState], layout: Mapping[str, int], step: int) -> tuple[dict, dict]:
    """The saved form of ``components``: ``(flat entry, replicated dict)``.

    The flat entry's tensors are views of the live ones (``torch.save`` writes a shared storage once); the
    replicated dict holds plain Python values only, so ``torch.load(weights_only=True)`` reads it.
    """
    flat: dict[str, Any] = {STEP_KEY: step}
    saved = {name: _pack_state(state, component_prefix(name, state), flat) for name, state in components.items()}
    return flat, {"format": FORMAT, "layout": dict(layout), "components": saved}


def _pack_state(state: ComponentState, prefix: str, flat: dict) -> dict:
    out: dict[str, dict] = {"replicated": {}, "sharded": {}, "nested": {}}
    for spec in state.field_specs():
        value = getattr(state, spec.name)
        if spec.placement is Placement.NESTED:
            out["nested"][spec.name] = None if value is None else _pack_state(value, f"{prefix}{spec.name}_", flat)
        elif spec.placement is Placement.SHARDED:
            out["sharded"][spec.name] = None if value is None else _pack_sharded(state, spec, value, prefix, flat)
        else:
            out["replicated"][spec.name] = _encode(value)
    return out


def _pack_sharded(state: ComponentState, spec: FieldSpec, value: torch.Tensor, prefix: str, flat: dict) -> dict:
    name = prefix + spec.name
    if value.dim() == 1:
        flat[name] = value
        return {"dtype": _dtype_name(value.dtype), "rows": None}
    rows = state.rows_to_save(spec, value)
    for i in range(rows):
        flat[f"{name}_{i}"] = value[i]
    return {"dtype": _dtype_name(value.dtype), "rows": rows, "allocated": value.shape[0]}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encode(value: Any) -> Any:
    if torch.is_tensor(value):
        return {_TENSOR_TAG: _dtype_name(value.dtype), "shape": list(value.shape),
                "data": value.detach().cpu().reshape(-1).tolist()}
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(item) for item in value)
    return value


# ---------------------------------------------------------------------------------------------- unpack
def check_format(replicated: Any) -> dict:
    """``replicated`` if it is DHO2's saved form in this version; raises a message naming the fix otherwise."""
    version = replicated.get("format") if isinstance(replicated, dict) else None
    if version == FORMAT:
        return replicated
    if isinstance(version, int) and version > FORMAT:
        raise CheckpointFormatError(
            f"DHO2 checkpoint format {version} is newer than this ds_dho2 reads ({FORMAT}); upgrade ds_dho2.")
    raise CheckpointFormatError(
        f"DHO2 checkpoint format {version!r} was written by an earlier ds_dho2 and is no longer read (this "
        f"version reads format {FORMAT}). Resume it with the release that wrote it, or keep only the weights: "
        "engine.load_checkpoint(..., load_optimizer_states=False) starts DHO2's state afresh.")


def unpack(components: Mapping[str, ComponentState], flat: Mapping[str, Any], replicated: dict, *,
           device: torch.device, current_layout: Mapping[str, int], universal: bool = False,
           copy: bool = True) -> dict[str, int]:
    """Fill the live ``components`` from their saved form; return the layout the state now has.

    ``flat`` holds the saved 1-D entries (``state[0]``); with ``universal`` they were re-partitioned for
    ``current_layout`` by DeepSpeed, otherwise the saved layout must equal it. ``copy`` copies tensors that
    would otherwise be the given ones. Raises :class:`CheckpointFormatError` naming what is wrong; a
    component the checkpoint lacks keeps its fresh state, one the run lacks is ignored (both logged).
    """
    replicated = check_format(replicated)
    saved_layout = replicated["layout"]
    if saved_layout["total_numel"] != current_layout["total_numel"]:
        raise CheckpointFormatError(
            f"DHO2 state was saved for a model with {saved_layout['total_numel']} trainable parameters, but this "
            f"one has {current_layout['total_numel']}. Load it into the same model.")
    if not universal and dict(saved_layout) != dict(current_layout):
        raise CheckpointFormatError(world_size_message(saved_layout["world_size"], current_layout["world_size"]))
    saved = replicated["components"]
    _check_complete(components, saved, flat, universal)
    reader = _Reader(flat, int(current_layout["partition_numel"]), device, copy)
    for name, state in components.items():
        if name in saved:
            reader.state(state, saved[name], component_prefix(name, state))
        else:
            logger.info("DHO2 checkpoint has no '%s' state; it starts afresh.", name)
    ignored = sorted(set(saved) - set(components))
    if ignored:
        logger.warning("DHO2 ignored checkpointed state of components this run does not use: %s.", ", ".join(ignored))
    return dict(current_layout)


def _check_complete(components: Mapping[str, ComponentState], saved: dict, flat: Mapping[str, Any],
                    universal: bool) -> None:
    """Refuse a saved form whose flat entries are not all there, naming the first and counting the rest."""
    expected = [key for name, state in components.items() if name in saved
                for key in _saved_keys(saved[name], component_prefix(name, state))]
    missing = [key for key in expected if key not in flat]
    if not missing:
        return
    detail = missing[0] + (f" and {len(missing) - 1} more entries are missing" if len(missing) > 1 else " is missing")
    raise CheckpointFormatError(missing_state_message(detail) if universal
                                else f"DHO2 state dict is incomplete: {detail}.")


def saved_flat_keys(components: Mapping[str, ComponentState], replicated: dict) -> list[str]:
    """Every flat entry name a saved form refers to, for the components this run has."""
    saved = check_format(replicated)["components"]
    return [key for name, state in components.items() if name in saved
            for key in _saved_keys(saved[name], component_prefix(name, state))]


def _saved_keys(packed: dict, prefix: str) -> list[str]:
    """The flat entry names a packed state refers to, in the order :func:`pack` wrote them."""
    keys = []
    for name, spec in packed["sharded"].items():
        if spec is not None:
            keys += [prefix + name] if spec["rows"] is None else [f"{prefix}{name}_{i}" for i in range(spec["rows"])]
    for name, child in packed["nested"].items():
        if child is not None:
            keys += _saved_keys(child, f"{prefix}{name}_")
    return keys


class _Reader:
    def __init__(self, flat: Mapping[str, Any], partition: int, device: torch.device, copy: bool) -> None:
        self.flat, self.partition, self.device, self.copy = flat, partition, device, copy

    def state(self, state: ComponentState, saved: dict, prefix: str) -> None:
        for spec in state.field_specs():
            if spec.placement is Placement.NESTED:
                packed = saved["nested"].get(spec.name)
                if packed is None:
                    setattr(state, spec.name, None)
                    continue
                child = getattr(state, spec.name) or spec.nested_type()
                self.state(child, packed, f"{prefix}{spec.name}_")
                setattr(state, spec.name, child)
            elif spec.placement is Placement.SHARDED:
                setattr(state, spec.name, self.sharded(saved["sharded"].get(spec.name), prefix + spec.name))
            elif spec.name in saved["replicated"]:
                setattr(state, spec.name, _decode(saved["replicated"][spec.name], self.device))

    def sharded(self, spec: dict | None, name: str) -> torch.Tensor | None:
        if spec is None:
            return None
        dtype = getattr(torch, spec["dtype"])
        if spec["rows"] is None:
            return self.vector(name, dtype, self.copy)
        out = torch.zeros(spec["allocated"], self.partition, dtype=dtype, device=self.device)
        for i in range(spec["rows"]):
            out[i].copy_(self.vector(f"{name}_{i}", dtype, copy=False))
        return out

    def vector(self, name: str, dtype: torch.dtype, copy: bool) -> torch.Tensor:
        value = self.flat[name]
        if value.dim() != 1 or value.numel() != self.partition:
            raise CheckpointFormatError(
                f"DHO2 checkpoint entry {name} has shape {tuple(value.shape)}, not this rank's shard of "
                f"{self.partition} elements.")
        low = self.flat.get(name + LO_SUFFIX)
        if low is not None:
            value = value.to(device=self.device, dtype=torch.float64) + low.to(device=self.device,
                                                                                dtype=torch.float64)
            return value.to(dtype)
        return value.to(device=self.device, dtype=dtype, copy=copy)


def _decode(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict) and _TENSOR_TAG in value:
        dtype = getattr(torch, value[_TENSOR_TAG])
        return torch.tensor(value["data"], dtype=dtype).reshape(value["shape"]).to(device)
    if isinstance(value, dict):
        return {key: _decode(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(item, device) for item in value)
    return value


def split_float64(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 tensor as two float32 tensors whose float64 sum is within 2**-48 of it (relative)."""
    high = value.to(torch.float32)
    return high, (value - high.to(torch.float64)).to(torch.float32)
