"""Everything DHO2 patches or reads inside DeepSpeed and Transformers, in one list, checked against the
installed versions.

DHO2 works with unmodified DeepSpeed and Hugging Face code by wrapping a few of their functions and reading
a few of their private attributes. A release that renames one of them must fail loudly, naming the point
and the version, never turn a patch into a silent no-op (for example products scaled by
``1/gradient_accumulation_steps`` because a backward hook was not bypassed). So every point is listed here
with why DHO2 needs it, :func:`check` verifies the class- and module-level ones when the integration is
installed (``import ds_dho2`` for DeepSpeed, the first import of ``transformers.trainer`` for the Trainer,
a conversion for the checkpoint converter), and :func:`check_instance` verifies the attributes that only
exist on a built object (a ZeRO optimizer, an engine) where DHO2 first meets it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Iterable


class IncompatibleVersionError(RuntimeError):
    """An installed library lacks a point DHO2 patches or reads; the message names it and the version."""


@dataclasses.dataclass(frozen=True)
class PatchPoint:
    """One place DHO2 touches: ``module``'s attribute ``path`` (dotted), what DHO2 does with it, the leading
    parameter names it must have when it is a function, and why DHO2 needs it."""

    module: str
    path: str
    action: str
    why: str
    parameters: tuple[str, ...] | None = None


#: DeepSpeed, checked by ``ds_dho2.integrations.deepspeed.register``
DEEPSPEED = (
    PatchPoint("torch.optim", "Optimizer", "sets torch.optim.DHO2",
               "DeepSpeed 0.19 validates and builds a config's optimizer as getattr(torch.optim, name)"),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine._configure_basic_optimizer", "relies on",
               "builds getattr(torch.optim, optimizer_name)(model_parameters, **params)", ("self", "model_parameters")),
    PatchPoint("deepspeed.runtime.zero.utils", "ZERO_SUPPORTED_OPTIMIZERS", "extends",
               "ZeRO then accepts DHO2 without zero_allow_untested_optimizer"),
    PatchPoint("deepspeed.runtime.config", "get_optimizer_name", "wraps",
               "maps any casing of \"DHO2\" to the registered name", ("param_dict",)),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine._configure_optimizer", "wraps",
               "refuses unsupported set-ups, then binds DHO2 to ZeRO's partition",
               ("self", "client_optimizer", "model_parameters")),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine.load_checkpoint", "wraps",
               "adopts a universal checkpoint's DHO2 state; names the converter on a world-size mismatch",
               ("self", "load_dir")),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine.backward", "wraps (per engine)",
               "hands DHO2 the loss of engine.backward; keeps its graph on product steps",
               ("self", "loss", "retain_graph", "scale_wrt_gas")),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine._backward_prologue", "bypasses (per engine)",
               "DHO2's own differentiation of the step's graph must not open DeepSpeed's backward", ("self",)),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine._backward_prologue_per_tensor", "bypasses (per engine)",
               "otherwise DHO2's products would be divided by gradient_accumulation_steps", ("self", "grad")),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine.is_gradient_accumulation_boundary", "calls",
               "products are taken on the last micro-batch of an accumulation window", ("self",)),
    PatchPoint("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.step", "wraps (per engine)",
               "counts the steps ZeRO skips on inf/NaN gradients for DHO2's max_nonfinite_steps stop",
               ("self", "closure")),
    PatchPoint("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3.step", "wraps (per engine)",
               "counts the steps ZeRO-3 skips on inf/NaN gradients", ("self", "closure")),
    PatchPoint("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3._optimizer_step", "relies on",
               "ZeRO-3 hands DHO2 its fp32 partition only while calling step()", ("self", "sub_group_id")),
    PatchPoint("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload.release_backward_leftovers",
               "calls", "a products backward leaves the first layers gathered (their inputs need no gradient)",
               ("self",)),
    PatchPoint("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload.partition_all_parameters",
               "calls", "products run inside ZeRO-3's step, which expects every parameter partitioned",
               ("self",)),
    PatchPoint("deepspeed.runtime.zero.parameter_offload", "DeepSpeedZeRoOffload.partition_all_parameters",
               "calls", "products run inside ZeRO-3's step, which expects every parameter partitioned",
               ("self",)),
    PatchPoint("deepspeed.runtime.zero.stage3",
               "DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",
               "wraps (per engine)", "a universal load of ZeRO-3 reads only Adam's entries; DHO2 reads all of its own",
               ("self", "checkpoint_dir")),
    PatchPoint("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state",
               "calls", "this rank's slice of one parameter's universal entry", ("self", "folder", "key", "param")),
    PatchPoint("deepspeed.runtime.zero.partition_parameters", "Init", "relies on",
               "partitioned parameters carry ds_tensor (this rank's slice), ds_numel and ds_shape"),
)

#: attributes of a built ZeRO-1/2 optimizer, checked by :func:`check_instance` at ``deepspeed.initialize``
ZERO_INSTANCE = (
    "round_robin_bit16_groups", "round_robin_bit16_padding", "partition_size", "single_partition_of_fp32_groups",
    "real_dp_process_group", "overflow",
)

#: attributes of a built ZeRO-3 optimizer (and of its partitioned parameters), checked at ``deepspeed.initialize``
ZERO3_INSTANCE = ("fp16_groups", "fp32_partitioned_groups_flat", "dp_process_group", "overflow", "parameter_offload")

#: Transformers, checked when ``transformers.trainer`` is first imported
TRANSFORMERS = (
    PatchPoint("transformers.trainer", "Trainer.__init__", "wraps",
               "gives every Trainer DHO2's curvature callback, first in its list", ("self",)),
    PatchPoint("transformers.trainer_callback", "TrainerCallback.on_log", "overrides",
               "adds the dho2/* statistics to the Trainer's logs", ("self", "args", "state", "control")),
)

#: DeepSpeed's checkpoint converter, checked by ``ds-dho2 to-universal``
UNIVERSAL_CONVERTER = (
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "main", "calls", "runs DeepSpeed's converter", ("args",)),
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "extract_zero_shards", "replaces",
               "dumps every per-element entry, not only Adam's", ("dir", "ds_checkpoint", "indices_3D")),
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "merge_tp_slices", "wraps",
               "merges DHO2's entries as it merges exp_avg",
               ("uc_info", "dir", "slice_dir", "tp_degree", "name_and_shapes")),
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "_save_optimizer_state", "replaces",
               "keeps DHO2's replicated part in the common optimizer state", ("args", "ds_checkpoint")),
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "dump_param_fragment", "calls",
               "writes one entry's fragment", ("dir", "tp_index", "dp_index", "state_name", "state_flat_tensor",
                                              "param_name", "offset", "numel")),
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "_merge_zero_shards", "calls",
               "merges one entry's fragments", ("param_base_path", "state", "tp_degree", "slice_shapes")),
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "_save_checkpoint", "calls",
               "writes a merged entry", ("file_path", "chkpt_sd")),
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "extract_zero_shards_stage3", "replaces",
               "dumps every per-element entry of a ZeRO-3 rank", ("optim_files_grid", "param_shapes_grid",
                                                                  "dp_degree", "temp_dir", "indices")),
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "merge_zero3_slices", "replaces",
               "merges every entry kind of a ZeRO-3 parameter", ("dp_degree", "dir", "slice_dir", "name")),
    PatchPoint("deepspeed.checkpoint.ds_to_universal", "_zero_partitioned_param_info", "calls",
               "ZeRO-3's slice size of a parameter", ("unpartitioned_numel", "world_size")),
)


def _version(module: str) -> str:
    top = module.split(".")[0]
    try:
        return f"{top} {importlib.import_module(top).__version__}"
    except (ImportError, AttributeError):
        return top


def problem(point: PatchPoint) -> str | None:
    """What is wrong with ``point`` in the installed version, or None."""
    try:
        target: Any = importlib.import_module(point.module)
    except ImportError as error:
        return f"cannot import {point.module} ({error})"
    for part in point.path.split("."):
        target = getattr(target, part, None)
        if target is None:
            return f"{point.module}.{point.path} does not exist"
    if point.parameters is not None:
        try:
            names = tuple(inspect.signature(_undecorated(target)).parameters)
        except (TypeError, ValueError):
            return f"{point.module}.{point.path} is not a function"
        if names[:len(point.parameters)] != point.parameters:
            return (f"{point.module}.{point.path} takes {names[:len(point.parameters)]}, DHO2 expects "
                    f"{point.parameters}")
    return None


def _undecorated(function: Any) -> Any:
    """The function a decorator wraps: through ``__wrapped__``, or, for a bare ``(*args, **kwargs)`` wrapper
    (DeepSpeed's ``instrument_w_nvtx`` sets no ``__wrapped__``), the one function its closure holds."""
    function = inspect.unwrap(function)
    kinds = [p.kind for p in inspect.signature(function).parameters.values()]
    if kinds != [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
        return function
    inner = [c.cell_contents for c in getattr(function, "__closure__", None) or () if inspect.isfunction(c.cell_contents)]
    return inner[0] if len(inner) == 1 else function


def check(points: Iterable[PatchPoint], supported: str) -> None:
    """Raise :class:`IncompatibleVersionError` naming every missing or changed point and the version."""
    points = tuple(points)
    problems = [(point, problem(point)) for point in points]
    problems = [(point, text) for point, text in problems if text is not None]
    if problems:
        details = "; ".join(f"{text} (DHO2 {point.action} it: {point.why})" for point, text in problems)
        raise IncompatibleVersionError(
            f"DHO2 does not work with the installed {_version(problems[0][0].module)}: {details}. DHO2 supports "
            f"{supported}; install a supported version.")


def check_instance(obj: Any, attributes: Iterable[str], supported: str) -> None:
    """Raise :class:`IncompatibleVersionError` when the built ``obj`` lacks an attribute DHO2 reads."""
    missing = [name for name in attributes if not hasattr(obj, name)]
    if missing:
        raise IncompatibleVersionError(
            f"DHO2 cannot read {type(obj).__name__}.{', '.join(missing)} in the installed "
            f"{_version(type(obj).__module__)}. DHO2 supports {supported}; install a supported version.")
