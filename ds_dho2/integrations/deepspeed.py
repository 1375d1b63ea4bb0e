"""DeepSpeed integration: ``"optimizer": {"type": "DHO2"}`` in a DeepSpeed JSON config.

Registration (idempotent, done by ``import ds_dho2``):

* ``torch.optim.DHO2`` is set, which is how DeepSpeed 0.19 both validates an optimizer name and builds
  it (``getattr(torch.optim, name)(model_parameters, **params)``), so the ``"params"`` block reaches the
  DHO2 constructor and its validation;
* DHO2 joins ``deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS``, so ZeRO needs no
  ``zero_allow_untested_optimizer``;
* ``DeepSpeedEngine._configure_optimizer`` is wrapped so that, once ZeRO has partitioned the parameters,
  DHO2 is bound to the rank's flat partition (an exact :class:`ShardLayout`) and attached to the module.
  Under ZeRO-3 it binds to the rank's slices of every parameter instead. Unsupported set-ups (optimizer or
  parameter offload, elastic checkpoints, stage 0 with fp16/bf16 or with universal checkpoints) fail here,
  inside ``deepspeed.initialize``, with a message saying what is supported;
* ``DeepSpeedEngine.load_checkpoint`` is wrapped so that DHO2 adopts the state of a universal checkpoint
  (re-partitioned for this run) as soon as it is loaded (:func:`adopt_loaded_checkpoint`), and a regular
  checkpoint saved at another world size is refused with a message naming ``ds-dho2 to-universal``;
* each bound engine's ``backward`` and ZeRO optimizer's ``step`` are wrapped (that engine only): the first
  hands DHO2 the loss (:func:`route_backward_loss`), the second tells DHO2 about steps ZeRO skipped.

Every point patched or read is listed, and checked against the installed DeepSpeed by :func:`register`, in
:mod:`ds_dho2.integrations.patch_points`.

:func:`load_config` reads one of the ``ds_configs/*.json`` files (written for the Hugging Face Trainer,
which fills their ``"auto"`` values) and resolves every ``"auto"`` for plain ``deepspeed.initialize``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
from typing import Any, Callable, Mapping

import torch

from ds_dho2.checkpoint import CheckpointFormatError, is_flat_key, world_size_message
from ds_dho2.dist.comm import TorchDistCommunicator
from ds_dho2.config import HVPMethod
from ds_dho2.dist.layout import ParameterShardLayout, ShardLayout
from ds_dho2.integrations import patch_points
from ds_dho2.optimizer import DHO2

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "DHO2"
SUPPORTED = "DHO2 supports ZeRO stages 0 (fp32), 1, 2 and 3 (fp32 and bf16) without offload."
SUPPORTED_VERSIONS = "DeepSpeed >=0.19,<0.20"
_WRAPPED_MARKER = "_ds_dho2_wrapped"


class UnsupportedDeepSpeedSetup(RuntimeError):
    """A DeepSpeed configuration DHO2 cannot run under; raised inside ``deepspeed.initialize``."""


def register() -> None:
    """Make ``"type": "DHO2"`` work in DeepSpeed configs (safe to call many times).

    The name is matched in any case (``"DHO2"``, ``"dho2"``, ``"Dho2"``), as DeepSpeed does for its own
    optimizers: ``deepspeed.runtime.config.get_optimizer_name``, which ``DeepSpeedConfig`` calls to read
    ``optimizer.type``, is wrapped so that every casing reaches the engine as ``"DHO2"``. Without that,
    ``"dho2"`` would end in DeepSpeed's ``dho2 is not a supported DeepSpeed Optimizer`` assertion.
    """
    import deepspeed.runtime.config as ds_config
    import deepspeed.runtime.zero.utils as zero_utils
    from deepspeed.runtime.engine import DeepSpeedEngine

    patch_points.check(patch_points.DEEPSPEED, SUPPORTED_VERSIONS)
    torch.optim.DHO2 = DHO2  # type: ignore[attr-defined]
    if DHO2 not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(DHO2)
    _wrap_once(ds_config, "get_optimizer_name", _name_in_any_case)
    _wrap_once(DeepSpeedEngine, "_configure_optimizer", _checked_and_bound)
    _wrap_once(DeepSpeedEngine, "load_checkpoint", _adopting_load)


def _wrap_once(owner: Any, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` by ``wrap(original)``, unless it is already DHO2's wrapper."""
    original = getattr(owner, name)
    if getattr(original, _WRAPPED_MARKER, False):
        return
    wrapped = functools.wraps(original)(wrap(original))
    setattr(wrapped, _WRAPPED_MARKER, True)
    setattr(owner, name, wrapped)


def _name_in_any_case(read_name: Callable) -> Callable:
    def get_optimizer_name(param_dict: Any) -> Any:
        name = read_name(param_dict)
        return OPTIMIZER_NAME if isinstance(name, str) and name.upper() == OPTIMIZER_NAME else name

    return get_optimizer_name


def _checked_and_bound(configure: Callable) -> Callable:
    """``_configure_optimizer`` that refuses unsupported set-ups first and binds DHO2 after."""
    def configure_optimizer(engine: Any, client_optimizer: Any, model_parameters: Any) -> None:
        uses_dho2 = isinstance(client_optimizer, DHO2) or (
            client_optimizer is None and engine.optimizer_name() == OPTIMIZER_NAME)
        if uses_dho2:
            check_engine_config(engine)
        configure(engine, client_optimizer, model_parameters)
        if isinstance(engine.basic_optimizer, DHO2):
            bind_engine(engine)

    return configure_optimizer


def _adopting_load(load: Callable) -> Callable:
    """``load_checkpoint`` that adopts DHO2's universal state and names the converter on a W mismatch."""
    def load_checkpoint(engine: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = load(engine, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised, with the way out when it is a W mismatch
            mismatch = _world_size_mismatch(engine, error)
            if mismatch is None:
                raise
            raise CheckpointFormatError(world_size_message(*mismatch)) from error
        if isinstance(getattr(engine, "basic_optimizer", None), DHO2) and result and result[0] is not None:
            adopt_loaded_checkpoint(engine)
        return result

    return load_checkpoint


def _world_size_mismatch(engine: Any, error: Exception) -> tuple[int, int] | None:
    """``(saved, current)`` world sizes when ``error`` is DeepSpeed refusing a ZeRO checkpoint of another
    data-parallel world size for an engine that runs DHO2, else None."""
    import re

    if not isinstance(getattr(engine, "basic_optimizer", None), DHO2):
        return None
    found = re.search(r"DP world size of (\d+) but the current world size is (\d+)", str(error))
    return None if found is None else (int(found.group(1)), int(found.group(2)))


def adopt_loaded_checkpoint(engine: Any) -> None:
    """After ``engine.load_checkpoint``: a universal checkpoint load writes DHO2's saved form straight into its
    state, so DHO2 turns it into live state for this run's partition now (a checkpoint without DHO2's state
    fails here, at load, with a message naming ``ds-dho2 to-universal``). DeepSpeed's views of the adopted
    flat entries are dropped so their buffers are freed."""
    optimizer: DHO2 = engine.basic_optimizer
    universal = bool(engine.load_universal_checkpoint())
    if not optimizer.adopt_checkpoint_state(universal=universal):
        return
    for group in getattr(engine.optimizer, "bit16_groups", None) or []:
        for param in group:
            fragments = getattr(getattr(param, "_hp_mapping", None), "optim_fragment", None)
            if isinstance(fragments, dict):
                for key in [key for key in fragments if is_flat_key(key)]:
                    del fragments[key]


def check_engine_config(engine: Any) -> None:
    """Reject, before any state is built, the DeepSpeed settings DHO2 does not support."""
    stage = engine.zero_optimization_stage()
    if stage > 0 and (engine.zero_offload_optimizer() is not None or engine.zero_cpu_offload()):
        raise UnsupportedDeepSpeedSetup(
            f"DHO2 does not support ZeRO optimizer offload. {SUPPORTED} Remove zero_optimization.offload_optimizer.")
    if stage == 3 and engine.zero_offload_param() is not None:
        raise UnsupportedDeepSpeedSetup(
            f"DHO2 does not support ZeRO-3 parameter offload. {SUPPORTED} Remove zero_optimization.offload_param.")
    if stage > 0 and engine.zero_elastic_checkpoint():
        raise UnsupportedDeepSpeedSetup(
            "DHO2 does not support zero_optimization.elastic_checkpoint: its curvature state is not a 1-D "
            "partition DeepSpeed can re-split. Set elastic_checkpoint to false.")
    if stage == 0 and engine.load_universal_checkpoint():
        raise UnsupportedDeepSpeedSetup(
            "DHO2 under ZeRO stage 0 keeps its whole state on every rank, so its regular checkpoints load at any "
            "world size; universal checkpoints are for ZeRO stages 1, 2 and 3. Remove checkpoint.load_universal.")
    if stage == 0 and (engine.fp16_enabled() or engine.bfloat16_enabled()):
        raise UnsupportedDeepSpeedSetup(
            f"DHO2 under ZeRO stage 0 supports fp32 only. {SUPPORTED} Use zero_optimization.stage 1 or 2 for "
            "bf16/fp16.")


def bind_engine(engine: Any) -> None:
    """Bind the engine's DHO2 to its ZeRO partition (or replicated parameters), attach the module and
    hand DHO2 the loss of every ``engine.backward`` (see :func:`route_backward_loss`)."""
    optimizer: DHO2 = engine.basic_optimizer
    stage = engine.zero_optimization_stage()
    if stage == 0:
        optimizer.bind_replicated(TorchDistCommunicator(engine.data_parallel_group))
    elif stage == 3:
        optimizer.bind_partition(*zero3_partition_layout(engine.optimizer, optimizer))
        read_universal_state(engine.optimizer, optimizer)
    else:
        optimizer.bind_partition(*zero_partition_layout(engine.optimizer, optimizer))
    optimizer.attach(engine.module)
    route_backward_loss(engine, optimizer)
    if stage > 0:
        count_skipped_steps(engine.optimizer, optimizer)
    logger.info("DHO2 bound to DeepSpeed engine (ZeRO stage %d).", stage)


def route_backward_loss(engine: Any, optimizer: DHO2) -> None:
    """Wrap this engine's ``backward`` so DHO2 sees each loss DeepSpeed differentiates.

    Every DeepSpeed loop -- plain ``engine.backward(criterion(engine(x), y))``, the Hugging Face Trainer,
    accelerate -- hands its loss to ``engine.backward``, whether or not the model returns one; on the
    steps due for curvature products DHO2 takes them on that loss's graph (``hvp="graph"``, or what
    ``"auto"`` measures cheapest). Only this engine instance is wrapped.

    Products on the loss's graph run *after* DeepSpeed's own backward, which then keeps the graph
    (``retain_graph=True``): ``engine.forward`` hooks its outputs so that the first backward through them
    opens DeepSpeed's backward (ZeRO's prologue, and an epilogue that reduces the gradients) and divides
    their gradient by the accumulation steps. Taken first, DHO2's products would consume that once-per-forward
    prologue, run the reduction on empty buckets and be scaled by ``1 / gradient_accumulation_steps``; taken
    after it, with those two hooks bypassed while DHO2 differentiates (:func:`_bypass_output_hooks`), they
    leave DeepSpeed's state alone. Products on a replay of the batch never pass through those hooks.
    """
    from ds_dho2.curvature.loss_scale import backward_loss_scale

    original = engine.backward
    if getattr(original, _WRAPPED_MARKER, False):
        return
    products = _bypass_output_hooks(engine)

    @functools.wraps(original)
    def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        scale_wrt_gas = kwargs.get("scale_wrt_gas", args[1] if len(args) > 1 else True)
        scale = backward_loss_scale(engine.gradient_accumulation_steps(), bool(scale_wrt_gas))
        if not (loss.requires_grad and optimizer.graph_products_due()):
            optimizer.on_backward(loss, scale)
            return original(loss, *args, **kwargs)
        if args:
            args = (True, *args[1:])
        else:
            kwargs["retain_graph"] = True
        result = original(loss, *args, **kwargs)
        products["running"] = True
        try:
            optimizer.on_backward(loss, scale)
        finally:
            products["running"] = False
        return result

    setattr(backward, _WRAPPED_MARKER, True)
    engine.backward = backward
    optimizer.bind_engine_backward(engine.is_gradient_accumulation_boundary)


def read_universal_state(zero_optimizer: Any, optimizer: DHO2) -> None:
    """Wrap this ZeRO-3 optimizer's universal load so it reads DHO2's entries too
    (:func:`ds_dho2.integrations.universal.load_universal_stage3`)."""
    from ds_dho2.integrations.universal import load_universal_stage3

    def reading(load: Callable) -> Callable:
        def load_all(checkpoint_dir: str) -> None:
            if not load_universal_stage3(zero_optimizer, optimizer, checkpoint_dir):
                load(checkpoint_dir)

        return load_all

    _wrap_once(zero_optimizer, "load_hp_checkpoint_state_from_checkpoint_dir_stage3", reading)


def count_skipped_steps(zero_optimizer: Any, optimizer: DHO2) -> None:
    """Wrap this ZeRO optimizer's ``step`` so DHO2 counts the steps ZeRO skips on inf/NaN gradients (it
    never calls DHO2 then), and ``max_nonfinite_steps`` stops a run whose gradients never recover."""
    def counting(step: Callable) -> Callable:
        def counted_step(*args: Any, **kwargs: Any) -> Any:
            result = step(*args, **kwargs)
            if zero_optimizer.overflow:
                optimizer.engine_skipped_step()
            return result

        return counted_step

    _wrap_once(zero_optimizer, "step", counting)


def _bypass_output_hooks(engine: Any) -> dict[str, bool]:
    """Make this engine's output backward hooks (DeepSpeed 0.19: ``_backward_prologue`` and
    ``_backward_prologue_per_tensor``, looked up on the engine at every forward / backward) do nothing while
    the returned flag ``["running"]`` is set (their presence is checked by :func:`register`)."""
    flag = {"running": False}
    prologue, per_tensor = engine._backward_prologue, engine._backward_prologue_per_tensor
    engine._backward_prologue = functools.wraps(prologue)(
        lambda *args, **kwargs: None if flag["running"] else prologue(*args, **kwargs))
    engine._backward_prologue_per_tensor = functools.wraps(per_tensor)(
        lambda grad: grad if flag["running"] else per_tensor(grad))
    return flag


def zero_partition_layout(zero_optimizer: Any, optimizer: DHO2) -> tuple[ShardLayout, TorchDistCommunicator]:
    """The exact map between a DeepSpeed ZeRO-1/2 optimizer's flat fp32 partition and module parameters."""
    missing = [name for name in patch_points.ZERO_INSTANCE if not hasattr(zero_optimizer, name)]
    if missing:
        raise UnsupportedDeepSpeedSetup(
            f"DHO2 cannot read the partition layout of {type(zero_optimizer).__name__} (missing {missing}). "
            f"{SUPPORTED} With ZeRO-1 + bf16, do not set data_types.grad_accum_dtype to fp32.")
    if len(zero_optimizer.round_robin_bit16_groups) != 1:
        raise UnsupportedDeepSpeedSetup(
            f"DHO2 expects one ZeRO parameter group, found {len(zero_optimizer.round_robin_bit16_groups)}.")
    if any(int(pad) != 0 for pad in zero_optimizer.round_robin_bit16_padding[0]):
        raise UnsupportedDeepSpeedSetup(
            "DHO2 does not support zero_optimization.parameter_alignment (padding between parameters). "
            "Set it to false.")
    partition = zero_optimizer.single_partition_of_fp32_groups[0]
    if optimizer.param_groups[0]["params"][0] is not partition:
        raise UnsupportedDeepSpeedSetup("DHO2's parameter group is not ZeRO's fp32 partition; unexpected wrapper.")
    group = zero_optimizer.real_dp_process_group[0]
    comm = TorchDistCommunicator(group)
    layout = ShardLayout(params=tuple(zero_optimizer.round_robin_bit16_groups[0]), rank=comm.rank,
                         world_size=comm.world_size, partition_numel=int(zero_optimizer.partition_size[0]))
    if partition.numel() != layout.partition_numel:
        raise UnsupportedDeepSpeedSetup(
            f"ZeRO partition has {partition.numel()} elements but the layout expects {layout.partition_numel}.")
    return layout, comm


def zero3_partition_layout(zero_optimizer: Any, optimizer: DHO2) -> tuple[
        ParameterShardLayout, TorchDistCommunicator, torch.Tensor, Callable[[], None]]:
    """The map between a DeepSpeed ZeRO-3 optimizer's fp32 partition (its one sub-group) and the module's
    partitioned parameters; products are finite differences on the partitions (said once)."""
    patch_points.check_instance(zero_optimizer, patch_points.ZERO3_INSTANCE, SUPPORTED_VERSIONS)
    if len(zero_optimizer.fp16_groups) != 1:
        total = sum(p.ds_numel for group in zero_optimizer.fp16_groups for p in group)
        raise UnsupportedDeepSpeedSetup(
            f"DHO2 under ZeRO-3 needs its parameters in one optimizer sub-group (found "
            f"{len(zero_optimizer.fp16_groups)}): set zero_optimization.sub_group_size to at least {total}.")
    config = optimizer.config
    if config.hvp not in (HVPMethod.AUTO, HVPMethod.FINITE_DIFFERENCE):
        raise UnsupportedDeepSpeedSetup(
            f"DHO2 hvp={config.hvp.value!r} needs each rank's full parameters, which ZeRO-3 never holds; under "
            "ZeRO-3 DHO2 takes products by finite differences. Set hvp to 'auto' or 'finite_difference'.")
    params = tuple(zero_optimizer.fp16_groups[0])
    comm = TorchDistCommunicator(zero_optimizer.dp_process_group)
    layout = ParameterShardLayout(params=params, rank=comm.rank, world_size=comm.world_size,
                                  partition_sizes=tuple(p.ds_tensor.numel() for p in params),
                                  numels=tuple(p.ds_numel for p in params))
    partition = zero_optimizer.fp32_partitioned_groups_flat[0]
    if partition.numel() != layout.partition_numel:
        raise UnsupportedDeepSpeedSetup(
            f"ZeRO-3 partition has {partition.numel()} elements but the parameters' slices hold "
            f"{layout.partition_numel}; unexpected parameter layout.")
    with torch.no_grad():  # ZeRO-3 leaves the padding of the last slices uninitialised; norms must not see it
        for (offset, _, valid), size, param in zip(layout.slices(), layout.partition_sizes, params):
            param.ds_tensor.data[valid:] = 0
            partition.data[offset + valid:offset + size] = 0
    optimizer.tracker.chooser.resolved = HVPMethod.FINITE_DIFFERENCE
    if config.hvp is HVPMethod.AUTO and config.curvature.enabled and comm.rank == 0:
        logger.info("DHO2 under ZeRO-3 takes Hessian-vector products by finite differences of gradients on the "
                    "partitions: the exact strategies need each rank's full parameters.")
    offload = zero_optimizer.parameter_offload
    def repartition() -> None:
        """After a products backward: release the layers left gathered and partition every parameter again,
        as ZeRO-3's step found them (it partitions all before calling DHO2 and gathers the persistent ones
        after)."""
        offload.release_backward_leftovers()
        offload.partition_all_parameters()

    return layout, comm, partition, repartition


#: What :func:`load_config` puts in place of ``"auto"`` when no override is given. ``train_batch_size``
#: has no default: an ``"auto"`` there is removed so DeepSpeed computes micro batch x accumulation x world.
AUTO_DEFAULTS: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "lr": 1e-3,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.0,
}
_TOP_LEVEL_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "gradient_clipping")


def load_config(path: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """A DeepSpeed config (JSON file or dict) with every ``"auto"`` resolved, for ``deepspeed.initialize``.

    ``overrides`` name top-level batch/clipping keys (``train_batch_size``, ``train_micro_batch_size_per_gpu``,
    ``gradient_accumulation_steps``, ``gradient_clipping``) or keys of ``optimizer.params`` (``lr``, ``betas``,
    ``eps``, ``weight_decay`` and any DHO2 key such as ``rank`` or ``refresh_interval``); they replace the
    value whether it is ``"auto"`` or not. Remaining ``"auto"`` values take :data:`AUTO_DEFAULTS`
    (``train_batch_size`` is removed so DeepSpeed derives it). An ``"auto"`` anywhere else, or an override
    that names no such key, raises ``ValueError`` naming it.
    """
    if isinstance(path, Mapping):
        config = copy.deepcopy(dict(path))
    else:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    params = config.get("optimizer", {}).get("params")
    for key, value in overrides.items():
        if key in _TOP_LEVEL_KEYS:
            config[key] = value
        elif params is not None:
            params[key] = value
        else:
            raise ValueError(f"load_config: cannot apply override {key}={value!r}: the config has no "
                             "optimizer.params block and it is not a top-level batch/clipping key.")
    if config.get("train_batch_size") == "auto":
        del config["train_batch_size"]
    for key in _TOP_LEVEL_KEYS[1:]:
        if config.get(key) == "auto":
            config[key] = AUTO_DEFAULTS[key]
    if params is not None:
        for key, value in list(params.items()):
            if value == "auto" and key in AUTO_DEFAULTS:
                params[key] = copy.deepcopy(AUTO_DEFAULTS[key])
    leftover = _auto_paths(config)
    if leftover:
        hint = (" DHO2's hvp='auto' is its default: omit the key (accelerate and the HF Trainer reject any "
                "'auto' they cannot fill)." if "optimizer.params.hvp" in leftover else "")
        raise ValueError(f"load_config: no value for \"auto\" at {', '.join(leftover)}; pass it as an override "
                         f"or write a value in the config.{hint}")
    return config


def _auto_paths(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, Mapping):
        return [path for key, item in value.items() for path in _auto_paths(item, f"{prefix}{key}.")]
    if isinstance(value, list):
        return [path for index, item in enumerate(value) for path in _auto_paths(item, f"{prefix}{index}.")]
    return [prefix.rstrip(".")] if value == "auto" else []
