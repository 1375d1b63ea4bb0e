"""``ds-dho2 to-universal``: a DeepSpeed ZeRO-1/2/3 checkpoint with DHO2 state -> a universal checkpoint.

DeepSpeed's ``ds_to_universal`` writes, for every parameter, one file per optimizer-state kind
(``zero/<param>/<kind>.pt``) and a common ``zero/optimizer_state.pt`` with rank 0's param groups; a
``"checkpoint": {"load_universal": true}`` load then gives each rank its slice of every file, at any world
size. It knows only ``exp_avg``, ``exp_avg_sq``, ``fp32`` and ``step``, so it would drop DHO2's curvature and
fail on a heavy-ball base. This converter runs DeepSpeed's own converter in-process with some of its
functions replaced for the duration of the call (the stage-3 extraction and merge likewise):

* extraction dumps every per-element state entry of DHO2's saved form (:mod:`ds_dho2.checkpoint`: the
  eigenvector, ADMM and in-flight Lanczos entries, and ``momentum_buffer`` for a heavy-ball base), a float64
  entry as two float32 halves (DeepSpeed loads universal optimizer state as float32);
* merging writes ``zero/<param>/<entry>.pt`` for those entries as it does for ``exp_avg``;
* the common optimizer state keeps DHO2's replicated part (rank 0's ``param_groups[0]["dho2_replicated"]``).

A checkpoint of another saved-form version is refused with the message of
:func:`ds_dho2.checkpoint.check_format`.

It relies on functions internal to DeepSpeed's converter, so it checks the DeepSpeed version first.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
from typing import Any, Iterator

import torch

from ds_dho2.checkpoint import GROUP_KEY, LO_SUFFIX, STEP_KEY, CheckpointFormatError, check_format, split_float64

logger = logging.getLogger(__name__)

#: DeepSpeed releases whose converter internals this module was written against: [low, high)
DEEPSPEED_SUPPORTED = ("0.19.8", "0.20")
#: the state kinds DeepSpeed's converter merges itself
_STOCK_KINDS = {"fp32", "exp_avg", "exp_avg_sq", "step"}
class UniversalConversionError(RuntimeError):
    """The checkpoint cannot be converted (reported as one line by ``ds-dho2 to-universal``)."""


def check_deepspeed() -> Any:
    """The ``deepspeed.checkpoint.ds_to_universal`` module, if this DeepSpeed is one the converter supports
    (its version, and every converter function listed in ``patch_points.UNIVERSAL_CONVERTER``)."""
    from packaging.version import Version

    from ds_dho2.integrations import patch_points

    low, high = DEEPSPEED_SUPPORTED
    need = f"deepspeed>={low},<{high}"
    try:
        import deepspeed
        import deepspeed.checkpoint.ds_to_universal as converter
    except ImportError as error:
        raise UniversalConversionError(f"DeepSpeed's checkpoint converter cannot be imported ({error}). "
                                       f"Install '{need}'.") from error
    version = Version(deepspeed.__version__)
    problem = None
    if not Version(low) <= version < Version(high):
        problem = f"found DeepSpeed {deepspeed.__version__}"
    else:
        problems = [patch_points.problem(point) for point in patch_points.UNIVERSAL_CONVERTER]
        problem = next((f"DeepSpeed {deepspeed.__version__}: {text}" for text in problems if text), None)
    if problem:
        raise UniversalConversionError(
            f"ds-dho2 to-universal extends DeepSpeed's ds_to_universal through functions internal to it, and "
            f"supports DeepSpeed {low} up to (not including) {high}; {problem}. Install '{need}' to convert.")
    return converter


def to_universal(input_folder: str | os.PathLike, output_folder: str | os.PathLike, *, extract_workers: int = 4,
                 merge_workers: int = 2, keep_temp_folder: bool = False) -> dict[str, Any]:
    """Convert the DeepSpeed checkpoint in ``input_folder`` (one tag's folder) into a universal checkpoint in
    ``output_folder``; DeepSpeed also writes ``latest_universal`` (naming it) next to ``output_folder``.

    Returns a summary: the DHO2 entries written per parameter, the number of parameters and the source
    data-parallel world size. Raises :class:`UniversalConversionError` when the input is not a ZeRO
    checkpoint with DHO2 state, or DeepSpeed is not a supported version.
    """
    converter = check_deepspeed()
    source, target = os.path.abspath(input_folder), os.path.abspath(output_folder)
    world_size = _check_folders(source, target)
    args = argparse.Namespace(input_folder=source, output_folder=target, num_extract_workers=max(1, extract_workers),
                              num_merge_workers=max(1, merge_workers), keep_temp_folder=keep_temp_folder,
                              strict=True, inject_missing_state=True)
    replaced = {"extract_zero_shards": _extract_zero_shards, "merge_tp_slices": _merge_tp_slices,
                "_save_optimizer_state": _save_optimizer_state,
                "extract_zero_shards_stage3": _extract_zero_shards_stage3, "merge_zero3_slices": _merge_zero3_slices}
    with _replaced(converter, replaced):
        converter.main(args)
    names = sorted(name for name in os.listdir(os.path.join(target, "zero"))
                   if os.path.isdir(os.path.join(target, "zero", name)))
    kinds = sorted(file[:-3] for file in os.listdir(os.path.join(target, "zero", names[0]))) if names else []
    summary = {"parameters": len(names), "source_world_size": world_size,
               "dho2_entries": [kind for kind in kinds if kind.startswith("dho2_")],
               "base_entries": [kind for kind in kinds if not kind.startswith("dho2_")]}
    logger.info("Wrote universal checkpoint %s: %d parameters, %d DHO2 entries each, from world size %d.",
                target, summary["parameters"], len(summary["dho2_entries"]), summary["source_world_size"])
    return summary


def _check_folders(source: str, target: str) -> int:
    """Refuse what cannot be converted; return the number of ZeRO optimizer files (the source world size)."""
    if not os.path.isdir(source):
        raise UniversalConversionError(f"checkpoint folder not found: {source}. Give the folder of one saved tag "
                                       "(the one holding *_optim_states.pt files).")
    optim_files = sorted(glob.glob(os.path.join(source, "*_optim_states.pt")))
    if not optim_files:
        hint = (" It holds no ZeRO optimizer files: a ZeRO stage 0 checkpoint loads at any world size as it is."
                if glob.glob(os.path.join(source, "mp_rank_*_model_states.pt")) else
                " Give the folder of one saved tag, e.g. checkpoints/global_step100, not the checkpoint root.")
        raise UniversalConversionError(f"{source} is not a DeepSpeed ZeRO checkpoint tag folder.{hint}")
    first = torch.load(optim_files[0], map_location="cpu", weights_only=False)
    optim = first.get("optimizer_state_dict", {})
    stage = int(optim.get("zero_stage", 1))
    base = optim.get("optimizer_state_dict" if stage == 3 else "base_optimizer_state")
    groups = base.get("param_groups") if isinstance(base, dict) else None
    state = base.get("state", {}).get(0, {}) if isinstance(base, dict) else {}
    if not (groups and GROUP_KEY in groups[0]):
        if "dho2" in state:  # the nested form of earlier ds_dho2 versions
            try:
                check_format(None)
            except CheckpointFormatError as error:
                raise UniversalConversionError(str(error)) from None
        raise UniversalConversionError(
            f"{source} holds no DHO2 optimizer state (was it saved with another optimizer?). Convert it with "
            "DeepSpeed's own 'python -m deepspeed.checkpoint.ds_to_universal'.")
    try:
        check_format(groups[0][GROUP_KEY])
    except CheckpointFormatError as error:
        raise UniversalConversionError(str(error)) from None
    if os.path.normpath(target) == os.path.normpath(source):
        raise UniversalConversionError("OUTPUT_FOLDER must differ from INPUT_FOLDER.")
    if os.path.isdir(target) and os.listdir(target):
        raise UniversalConversionError(f"{target} exists and is not empty; give a new folder (for example "
                                       f"{source.rstrip(os.sep)}_universal) or remove it.")
    return len(optim_files)


@contextlib.contextmanager
def _replaced(module: Any, functions: dict[str, Any]) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in functions}
    _STOCK.update(saved)
    for name, function in functions.items():
        setattr(module, name, function)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(module, name, function)
        _STOCK.clear()


def _flat_entries(optim_sd: dict, group_index: int) -> dict[str, Any]:
    """Every per-element entry of one rank's saved DHO2 state (padded to the shard), plus ``step``."""
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, GROUP_PADDINGS, SINGLE_PARTITION_OF_FP32_GROUPS

    fp32 = optim_sd[SINGLE_PARTITION_OF_FP32_GROUPS][group_index]  # saved without the shard's end padding
    padding = int((optim_sd.get(GROUP_PADDINGS) or [0] * (group_index + 1))[group_index])
    return _per_element(optim_sd[BASE_OPTIMIZER_STATE]["state"].get(group_index, {}), fp32, fp32.numel() + padding)


def _per_element(entry: dict, fp32: torch.Tensor, shard: int) -> dict[str, Any]:
    """``entry``'s per-element tensors (float64 ones as two float32 halves), ``fp32`` and ``step``."""
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        if key == STEP_KEY or not torch.is_tensor(value):
            continue
        if value.dim() != 1 or value.numel() not in (shard, fp32.numel()):
            raise UniversalConversionError(
                f"optimizer state entry {key!r} has shape {tuple(value.shape)}, not one value per element of the "
                f"rank's shard ({shard}); it cannot be re-partitioned.")
        if value.dtype == torch.float64:
            flat[key], flat[key + LO_SUFFIX] = split_float64(value)
        else:
            flat[key] = value
    flat["fp32"] = fp32
    if STEP_KEY in entry:
        flat[STEP_KEY] = entry[STEP_KEY]
    return flat


def _extract_zero_shards_stage3(optim_files_grid: Any, param_shapes_grid: Any, dp_degree: int, temp_dir: str,
                                indices: tuple[int, int], exclude_param_names: Any = None) -> None:
    """Replaces ``ds_to_universal.extract_zero_shards_stage3``: every per-element entry of a ZeRO-3 rank's
    DHO2 state, cut parameter by parameter as ZeRO-3 partitions them (not only Adam's moments)."""
    import deepspeed.checkpoint.ds_to_universal as converter
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    tp_index, dp_index = indices
    if tp_index != 0:
        raise UniversalConversionError("the checkpoint is tensor parallel; DHO2 runs data parallel only.")
    optim_sd = torch.load(optim_files_grid[tp_index][dp_index], map_location="cpu", weights_only=False)[
        OPTIMIZER_STATE_DICT]
    for index, shapes in enumerate(param_shapes_grid[tp_index]):
        fp32 = optim_sd["fp32_flat_groups"][index]
        flat = _per_element(optim_sd[OPTIMIZER_STATE_DICT]["state"].get(index, {}), fp32, fp32.numel())
        flat.pop(STEP_KEY, None)  # ZeRO-3's universal step is read from optimizer_state.pt
        offset = 0
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            partitioned, _ = converter._zero_partitioned_param_info(numel, dp_degree)
            valid = max(0, min(partitioned, numel - dp_index * partitioned))
            for key, value in flat.items():
                converter.dump_param_fragment(temp_dir, tp_index, dp_index, key, value, name, offset, valid)
            offset += partitioned


def _merge_zero3_slices(dp_degree: int, dir: str, slice_dir: str, name: str) -> None:  # noqa: A002
    """Replaces ``ds_to_universal.merge_zero3_slices``: merge every entry kind dumped for ``name``."""
    import deepspeed.checkpoint.ds_to_universal as converter

    kinds = sorted({file.rsplit(".", 1)[0] for file in os.listdir(os.path.join(slice_dir, name, "0"))})
    for kind in kinds:
        slices = converter._merge_zero_shards(os.path.join(slice_dir, name), kind, 1)
        converter._save_checkpoint(os.path.join(dir, name, f"{kind}.pt"), slices[0])


def _extract_zero_shards(dir: str, ds_checkpoint: Any, indices_3D: tuple[int, int, int]) -> None:  # noqa: A002
    """Replaces ``ds_to_universal.extract_zero_shards``: every per-element entry, not only Adam's moments."""
    import deepspeed.checkpoint.ds_to_universal as converter
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS

    pp_index, tp_index, dp_index = indices_3D
    if ds_checkpoint.tp_degree != 1 or ds_checkpoint.pp_degree != 1:
        raise UniversalConversionError(
            f"the checkpoint has tensor/pipeline parallel degrees {ds_checkpoint.tp_degree}/"
            f"{ds_checkpoint.pp_degree}; DHO2 runs data parallel only, so its checkpoints have 1/1.")
    # Unstripped: the fragments below never reach into the end padding, and stripping would fail on any
    # entry that is not 1-D.
    sd = ds_checkpoint.get_zero_checkpoint_state(pp_index=pp_index, tp_index=tp_index, dp_index=dp_index,
                                                 strip_tensor_paddings=False)
    optim_sd = sd[OPTIMIZER_STATE_DICT]
    for group_index, mappings in enumerate(optim_sd[PARAM_SLICE_MAPPINGS]):
        flat = _flat_entries(optim_sd, group_index)
        for name, fragment in mappings.items():
            for key, value in flat.items():
                converter.dump_param_fragment(dir, tp_index, dp_index, key, value, name, fragment.start,
                                              fragment.numel)


#: DeepSpeed's own functions while theirs are replaced (also seen by forked worker processes)
_STOCK: dict[str, Any] = {}


def _merge_tp_slices(uc_info: Any, dir: str, slice_dir: str, tp_degree: int, name_and_shapes: Any) -> Any:  # noqa: A002
    """Wraps ``ds_to_universal.merge_tp_slices``: after DeepSpeed's merge, merge the other entry kinds alike."""
    import deepspeed.checkpoint.ds_to_universal as converter
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    stock_merge = _STOCK.get("merge_tp_slices", converter.merge_tp_slices)
    unmatched = stock_merge(uc_info, dir, slice_dir, tp_degree, name_and_shapes)
    name, per_tp_shapes = name_and_shapes
    first_tp = os.path.join(slice_dir, name, "0")
    kinds = sorted({file.rsplit(".", 1)[0] for file in os.listdir(first_tp)} - _STOCK_KINDS)
    for kind in kinds:
        slices = converter._merge_zero_shards(os.path.join(slice_dir, name), kind, tp_degree, per_tp_shapes)
        converter._save_checkpoint(os.path.join(dir, name, f"{kind}.pt"), {PARAM: torch.cat(slices, dim=0), CAT_DIM: 0})
    return unmatched


def _save_optimizer_state(args: Any, ds_checkpoint: Any) -> None:
    """Replaces ``ds_to_universal._save_optimizer_state``: rank 0's common state and param groups, DHO2's
    replicated part included."""
    import deepspeed.checkpoint.ds_to_universal as converter
    from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, GROUP_PADDINGS, OPTIMIZER_STATE_DICT,
                                                PARAM_GROUPS, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)

    sd = ds_checkpoint.get_zero_checkpoint_state(pp_index=0, tp_index=0, dp_index=0, strip_tensor_paddings=False)
    optim_sd = sd[OPTIMIZER_STATE_DICT]
    sharded = {BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS}
    output = {key: value for key, value in optim_sd.items() if key not in sharded}
    if output.get(GROUP_PADDINGS):
        output[GROUP_PADDINGS] = [0] * len(output[GROUP_PADDINGS])  # as DeepSpeed's stripped copy says
    output[PARAM_GROUPS] = [dict(group) for group in optim_sd[BASE_OPTIMIZER_STATE][PARAM_GROUPS]]
    converter._save_checkpoint(os.path.join(args.output_folder, "zero", "optimizer_state.pt"), output)


def load_universal_stage3(zero_optimizer: Any, optimizer: Any, checkpoint_dir: str) -> bool:
    """A universal checkpoint into a ZeRO-3 engine running DHO2: DeepSpeed's own load reads only ``fp32``,
    ``exp_avg`` and ``exp_avg_sq``; this reads ``fp32`` and every per-element entry DHO2's saved form lists,
    each parameter's slice for this rank (``load_hp_checkpoint_state``), into ``optimizer.state`` and the
    param group, where :meth:`DHO2.adopt_checkpoint_state` takes them. False (nothing read) when the
    checkpoint has no DHO2 saved form; the adoption then refuses it with its message."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    from ds_dho2.checkpoint import GROUP_KEY, saved_flat_keys

    folder = os.path.join(checkpoint_dir, "zero")
    optim_sd = torch.load(os.path.join(folder, "optimizer_state.pt"), weights_only=False)
    saved_groups = optim_sd[OPTIMIZER_STATE_DICT][PARAM_GROUPS]
    replicated = saved_groups[0].get(GROUP_KEY)
    if replicated is None:
        return False
    zero_optimizer._load_global_state_stage3(optim_sd)
    params = zero_optimizer.fp16_groups[0]
    fp32 = zero_optimizer.fp32_partitioned_groups_flat[0]
    names = [zero_optimizer.param_names[p] for p in params]
    state = optimizer.state[fp32]
    keys = ["fp32"] + saved_flat_keys(optimizer.component_states(), replicated)
    for key in keys:
        for suffix in ("", LO_SUFFIX):
            if not all(os.path.isfile(os.path.join(folder, name, f"{key}{suffix}.pt")) for name in names):
                continue
            value = torch.cat([zero_optimizer.load_hp_checkpoint_state(os.path.join(folder, name), key + suffix,
                                                                        param=p).to(fp32.dtype)
                               for name, p in zip(names, params)])
            if key == "fp32":
                fp32.data.copy_(value)
            else:
                state[key + suffix] = value
    state[STEP_KEY] = optim_sd[OPTIMIZER_STATE_DICT]["state"][0][STEP_KEY]
    for key, value in saved_groups[0].items():
        if key != "params":
            optimizer.param_groups[0][key] = value
    zero_optimizer.fp16_partitioned_groups_flat[0].data.copy_(fp32.data)
    for partitioned, value in zip(zero_optimizer.fp16_partitioned_groups[0],
                                  zero_optimizer.unflatten(zero_optimizer.fp16_partitioned_groups_flat[0],
                                                           zero_optimizer.fp16_partitioned_groups[0])):
        partitioned.data = value.data
    return True
