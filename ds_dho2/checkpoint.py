"""DHO2's saved state: the flat form ``DHO2.state_dict()`` writes, and how a loaded one becomes live state again.

The live per-shard state (``optimizer.state[flat]``) keeps the curvature tracker's nested dict under
``state_keys.CURVATURE`` (2-D eigenvector slices, the Lanczos run, counters). The saved form is flat, so that
DeepSpeed's universal checkpoints, which know only per-element optimizer state, can carry and re-partition it:

* every tensor that is partitioned like the parameters becomes a top-level 1-D entry the size of the rank's
  flat shard, named ``dho2_<path>``: one per eigenvector (``dho2_eigenvectors_<i>``), the ADMM dual and anchor
  (``dho2_admm_dual``, ``dho2_admm_anchor``) and, while an interleaved refresh is in flight, each Lanczos
  basis vector computed so far (``dho2_lanczos_basis_<j>``, the current one included);
* everything else is the same on every rank -- eigenvalues, Newton momentum, transition matrix, counters,
  refresh schedule, the chosen HVP strategy, the layout, the top-level ``applied_steps`` -- and goes, as plain
  Python values, into ``param_groups[0]["dho2_replicated"]``, together with the list of flat entries the
  state must hold and their dtypes and shapes;
* the base optimizer's moments (``exp_avg``, ``exp_avg_sq`` or ``momentum_buffer``) and ``step`` stay as they are.

:func:`pack_entry` builds the saved form of one state entry, :func:`unpack_entry` the live form again: with
the saved layout (a regular checkpoint, loaded at the same world size) or with the current one (a universal
checkpoint, whose 1-D entries DeepSpeed has already re-partitioned for this rank). Float64 entries travel
through a universal checkpoint as two float32 halves, ``<name>`` and ``<name>__lo`` (DeepSpeed loads every
optimizer state there as float32); :func:`unpack_entry` adds them back, to within 2**-48 relative.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ds_dho2 import state_keys as K

logger = logging.getLogger(__name__)

#: version of the saved form; a newer one is refused with a message
FORMAT = 1
#: the param-group entry holding the replicated part
GROUP_KEY = "dho2_replicated"
#: prefix of every flat per-element entry DHO2 adds to the state
FLAT_PREFIX = "dho2_"
#: suffix of the low float32 half of a float64 entry in a universal checkpoint
LO_SUFFIX = "__lo"
CONVERT_COMMAND = "ds-dho2 to-universal INPUT_FOLDER OUTPUT_FOLDER"

_TENSOR_TAG = "__tensor__"
_SHARDED_TAG = "__sharded__"
#: curvature entries partitioned like the parameters (1-D: one vector; 2-D: one row per vector)
_SHARDED = {(K.EIGENVECTORS,), (K.ADMM_DUAL,), (K.ADMM_ANCHOR,), (K.LANCZOS, "basis"), (K.LANCZOS, "next_vector")}
#: curvature tensors that are the same on every rank, whatever their shape
_REPLICATED = {(K.EIGENVALUES,), (K.TRANSITION,), (K.NEWTON_MOMENTUM,)}


class CheckpointFormatError(RuntimeError):
    """A checkpoint's DHO2 state is missing, incomplete or was written for another model."""


def missing_state_message(detail: str) -> str:
    """The one-line refusal of a universal checkpoint without DHO2's state (``detail`` says what is missing)."""
    return (f"DHO2 cannot resume from this universal checkpoint: it has no DHO2 curvature state ({detail}), "
            "which DeepSpeed's ds_to_universal drops. Convert the original DeepSpeed checkpoint with "
            f"'{CONVERT_COMMAND}' instead and load that.")


def is_flat_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(FLAT_PREFIX)


# ------------------------------------------------------------------------------------------------ pack
def pack_entry(entry: dict) -> tuple[dict, dict]:
    """The saved form of one live state entry: ``(flat entry, replicated dict)``.

    The flat entry's tensors are views of the live ones (``torch.save`` writes a shared storage once);
    the replicated dict holds plain Python values only, so ``torch.load(weights_only=True)`` reads it.
    """
    curvature = entry[K.CURVATURE]
    partition = int(curvature[K.PARTITION_NUMEL])
    flat: dict = {}
    top: dict = {}
    for key, value in entry.items():
        if key == K.CURVATURE:
            continue
        if key == K.STEP or not torch.is_tensor(value) or _is_vector(value, partition):
            flat[key] = value
        else:
            top[key] = _encode(value)
    sharded: dict[str, dict] = {}
    replicated = {
        "format": FORMAT,
        "layout": {"world_size": int(curvature[K.WORLD_SIZE]), "partition_numel": partition,
                   "total_numel": int(curvature[K.TOTAL_NUMEL])},
        "top": top,
        "curvature": _pack_dict(curvature, (), partition, flat, sharded),
    }
    replicated["flat_keys"] = [name for spec in sharded.values() for name in spec["keys"]]
    return flat, replicated


def pack_state_dict(state_dict: dict) -> dict:
    """``torch.optim.Optimizer.state_dict()`` output -> DHO2's saved form (a new dict; the input is untouched)."""
    packed = dict(state_dict)
    packed["state"] = dict(state_dict["state"])
    packed["param_groups"] = [dict(group) for group in state_dict["param_groups"]]
    holders = [index for index, entry in packed["state"].items()
               if isinstance(entry, dict) and K.CURVATURE in entry]
    if len(holders) > 1:
        raise CheckpointFormatError(f"DHO2 found curvature state on {len(holders)} parameters; it keeps one.")
    for index in holders:
        flat, replicated = pack_entry(packed["state"][index])
        replicated["state_index"] = index
        packed["state"][index] = flat
        packed["param_groups"][0][GROUP_KEY] = replicated
    return packed


def _is_vector(value: torch.Tensor, partition: int) -> bool:
    return value.dim() == 1 and value.numel() == partition


def _is_sharded(path: tuple, value: torch.Tensor, partition: int) -> bool:
    if path in _SHARDED:
        return True
    if path in _REPLICATED or value.dim() not in (1, 2):
        return False
    return value.shape[-1] == partition  # an entry this module does not know: sharded if shaped like the shard


def _flat_name(path: tuple) -> str:
    return FLAT_PREFIX + "_".join(str(part) for part in path)


def _pack_dict(values: dict, path: tuple, partition: int, flat: dict, sharded: dict) -> dict:
    out = {}
    for key, value in values.items():
        here = (*path, key)
        if isinstance(value, dict):
            out[key] = _pack_dict(value, here, partition, flat, sharded)
        elif torch.is_tensor(value) and _is_sharded(here, value, partition):
            name = _flat_name(here)
            if value.dim() == 1:
                spec = {"keys": [name], "dtype": _dtype_name(value.dtype), "shape": [value.numel()]}
                flat[name] = value
            else:
                rows = _rows_in_use(here, values, value)
                spec = {"keys": [f"{name}_{i}" for i in range(rows)], "dtype": _dtype_name(value.dtype),
                        "shape": list(value.shape)}
                for i, row_name in enumerate(spec["keys"]):
                    flat[row_name] = value[i]
            sharded[name] = spec
            out[key] = {_SHARDED_TAG: spec}
        else:
            out[key] = _encode(value)
    return out


def _rows_in_use(path: tuple, parent: dict, value: torch.Tensor) -> int:
    """Rows worth saving: a Lanczos basis holds one row per completed iteration plus the current vector;
    the rows after those are still zeros."""
    if path == (K.LANCZOS, "basis") and isinstance(parent.get("alphas"), list):
        return min(len(parent["alphas"]) + 1, value.shape[0])
    return value.shape[0]


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
def unpack_entry(entry: dict, replicated: dict, *, device: torch.device,
                 current_layout: tuple[int, int, int] | None = None, copy: bool = True,
                 universal: bool = False) -> dict:
    """The live state entry rebuilt from its saved form (a new dict; ``entry`` keeps its other values).

    ``entry`` holds the flat ``dho2_*`` tensors. ``current_layout`` = ``(world_size, partition_numel,
    total_numel)`` of this run when those were re-partitioned for it (a universal checkpoint); otherwise the
    saved layout is kept, and the curvature tracker checks it against this run. ``copy`` copies tensors that
    would otherwise be the given ones. Raises :class:`CheckpointFormatError` naming what is wrong.
    """
    version = replicated.get("format")
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointFormatError(
            f"DHO2 checkpoint format {version!r} is newer than this ds_dho2 reads ({FORMAT}); upgrade ds_dho2.")
    missing = [name for name in replicated["flat_keys"] if name not in entry]
    if missing:
        detail = f"{missing[0]}" + (f" and {len(missing) - 1} more entries are missing" if len(missing) > 1
                                    else " is missing")
        if universal:
            raise CheckpointFormatError(missing_state_message(detail))
        raise CheckpointFormatError(f"DHO2 state dict is incomplete: {detail}.")
    saved = replicated["layout"]
    layout = dict(saved)
    if current_layout is not None:
        world_size, partition, total = current_layout
        if saved["total_numel"] != total:
            raise CheckpointFormatError(
                f"DHO2 state was saved for a model with {saved['total_numel']} trainable parameters, but this one "
                f"has {total}. Load it into the same model.")
        layout = {"world_size": world_size, "partition_numel": partition, "total_numel": total}
    flat = {key: entry[key] for key in entry if is_flat_key(key)}
    live = {key: value for key, value in entry.items() if not is_flat_key(key) and key != K.CURVATURE}
    for key, value in replicated.get("top", {}).items():
        live[key] = _decode(value, device)
    context = _Unpacker(flat, layout["partition_numel"], device, copy)
    curvature = context.dict(replicated["curvature"])
    curvature[K.WORLD_SIZE] = layout["world_size"]
    curvature[K.PARTITION_NUMEL] = layout["partition_numel"]
    curvature[K.TOTAL_NUMEL] = layout["total_numel"]
    live[K.CURVATURE] = curvature
    unused = sorted(set(flat) - context.used)
    if unused:
        logger.debug("DHO2 ignored checkpoint entries it does not know: %s", ", ".join(unused))
    return live


class _Unpacker:
    def __init__(self, flat: dict, partition: int, device: torch.device, copy: bool) -> None:
        self.flat, self.partition, self.device, self.copy = flat, partition, device, copy
        self.used: set[str] = set()

    def dict(self, values: dict) -> dict:
        return {key: self.value(item) for key, item in values.items()}

    def value(self, value: Any) -> Any:
        if isinstance(value, dict):
            if _SHARDED_TAG in value:
                return self.sharded(value[_SHARDED_TAG])
            if _TENSOR_TAG in value:
                return _decode(value, self.device)
            return self.dict(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self.value(item) for item in value)
        return value

    def vector(self, name: str, dtype: torch.dtype, copy: bool) -> torch.Tensor:
        self.used.add(name)
        value = self.flat[name]
        if value.dim() != 1 or value.numel() != self.partition:
            raise CheckpointFormatError(
                f"DHO2 checkpoint entry {name} has shape {tuple(value.shape)}, not this rank's shard of "
                f"{self.partition} elements.")
        low = self.flat.get(name + LO_SUFFIX)
        if low is not None:
            self.used.add(name + LO_SUFFIX)
            value = value.to(device=self.device, dtype=torch.float64) + low.to(device=self.device,
                                                                                dtype=torch.float64)
            return value.to(dtype)
        return value.to(device=self.device, dtype=dtype, copy=copy)

    def sharded(self, spec: dict) -> torch.Tensor:
        dtype = getattr(torch, spec["dtype"])
        if len(spec["shape"]) == 1:
            return self.vector(spec["keys"][0], dtype, self.copy)
        out = torch.zeros(spec["shape"][0], self.partition, dtype=dtype, device=self.device)
        for i, name in enumerate(spec["keys"]):
            out[i].copy_(self.vector(name, dtype, copy=False))
        return out


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
