"""Capturing a user's training run for the probe: the base optimizer's state, its last step, and (for
``ds-dho2 probe``) the model, the batch and the loss of an unmodified script.

Three pieces, each usable alone:

* :func:`read_base_optimizer` reads what the stability test needs from the optimizer a run uses: its
  family (AdamW-like or heavy-ball), learning rate, momentum, and for AdamW the denominator
  ``D = sqrt(v_hat) + eps`` of every parameter.
* :class:`StepRecorder` records the parameter change of an optimizer's last step (what the subspace
  share is measured on); :func:`last_step_from_state` rebuilds it from the optimizer's moments when
  nothing was recorded.
* :class:`TrainingCapture` is what ``ds-dho2 probe`` installs before it runs a script: global PyTorch hooks
  (a forward hook on every module, keeping the inputs of the last outermost training forward; a step hook
  on every ``torch.optim.Optimizer``) and, when DeepSpeed is installed, wrappers of
  ``DeepSpeedEngine.backward`` and ``DeepSpeedEngine.step``. After the N-th optimizer step it raises
  :class:`ProbeDue`, which unwinds the script; :meth:`TrainingCapture.probe_arguments` then hands
  :func:`ds_dho2.probe.probe_training` the model, loss, optimizer and batch it found.

What is supported, and how the optimizer state is read:

* plain PyTorch: any loop whose model returns its loss (a scalar, ``.loss`` or ``["loss"]``, as Hugging
  Face models given labels do) and whose optimizer is a ``torch.optim.Optimizer`` (the first one that
  steps is probed). AdamW, Adam (also DeepSpeed's ``FusedAdam`` and ``DeepSpeedCPUAdam``), SGD with or
  without momentum and DHO2 have a stability limit; other optimizers get the rest of the report.
* a Hugging Face Trainer, with or without DeepSpeed: its model is the outermost module that runs, its
  optimizer the one that steps (inside accelerate's wrapper, or the engine's); when the model's output
  carries no loss the Trainer's own ``compute_loss`` is used.
* a DeepSpeed engine under ZeRO stage 0, 1 or 2: the parameters are whole on the rank, the base
  optimizer is ``engine.basic_optimizer``; its moments are read per parameter from ``optimizer.state``
  (stage 0), or under stages 1 and 2 (and DeepSpeed's bf16 optimizer) from each parameter's fragment of
  the flat fp32 partition (``param._hp_mapping``): directly when the whole parameter lies in this rank's
  partition, as it always does in one process, else through
  ``deepspeed.utils.safe_get_full_optimizer_state`` (a collective over the data-parallel group). The
  step is measured on the module's parameters around ``engine.step`` at an accumulation boundary, after
  ZeRO has copied the new partition back. ZeRO-3 is not supported (the parameters are not whole on a
  rank), and ``ds-dho2 probe`` runs one process.

The capture costs a copy of the trainable parameters per optimizer step (for the step's change) and
turns off PyTorch's fast path for module calls while installed (global hooks); it is removed before the
probe computes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_map

from ds_dho2.hvp.capture import REPLAY_DROPPED_KWARGS, find_loss
from ds_dho2.probe import measures

logger = logging.getLogger(__name__)

#: steps whose spacing gives the wall time of one training step (the median of the last few)
STEP_TIMING_WINDOW = 5


class ProbeError(Exception):
    """A probe that cannot run; the message is one line naming the problem and the fix."""


class ProbeDue(BaseException):
    """Raised from an optimizer-step hook when the probe's step is reached, to end the training script.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that a script's ``except Exception`` does not
    swallow it; ``ds-dho2 probe`` catches it around the script.
    """


# ------------------------------------------------------------------------------------ base optimizer
@dataclasses.dataclass
class BaseOptimizer:
    """What the probe knows of the optimizer a run uses.

    ``family``: ``"adamw"`` (a diagonal ``sqrt(v_hat) + eps`` preconditioner: AdamW, Adam, DeepSpeed's
    Adam kernels, DHO2 with base adamw), ``"heavyball"`` (SGD with momentum, DHO2 with base heavyball) or
    ``None`` (anything else: no stability limit is known). ``denominator``: for ``"adamw"``, ``D`` as one
    flat vector over the probed parameters. ``stability_limit``: the ``lr x lambda_max`` (in the metric
    ``D^-1/2 H D^-1/2`` for ``"adamw"``, of ``H`` for ``"heavyball"``) above which the base step diverges
    on a quadratic (:mod:`ds_dho2.probe.measures`).
    """

    name: str
    family: str | None
    lr: float
    stability_limit: float | None = None
    beta1: float | None = None
    momentum: float | None = None
    steps: int = 0
    denominator: torch.Tensor | None = None
    optimizer: Any = dataclasses.field(default=None, repr=False)

    @property
    def metric(self) -> str:
        """The metric ``lr x lambda_max`` is measured in, in words."""
        return {"adamw": "AdamW's metric D^-1/2 H D^-1/2", "heavyball": "the Hessian"}.get(self.family or "",
                                                                                         "the Hessian")


def base_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds the state: ``engine.basic_optimizer`` of a DeepSpeed engine, the inner
    optimizer of a ZeRO optimizer, of accelerate's ``AcceleratedOptimizer`` or of any wrapper with an
    ``.optimizer`` that has ``param_groups``."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(optimizer, "basic_optimizer", None)
        if inner is None:
            candidate = getattr(optimizer, "optimizer", None)
            inner = candidate if hasattr(candidate, "param_groups") else None
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def _is_dho2(optimizer: Any) -> bool:
    from ds_dho2.optimizer import DHO2

    return isinstance(optimizer, DHO2)


def _state_steps(optimizer: Any) -> int:
    """The optimizer's applied step count: the largest ``step`` in its state (DeepSpeed's FusedAdam
    counts only in the last parameter's entry of a group) or its groups."""
    counts = [float(s["step"]) for s in optimizer.state.values() if isinstance(s, dict) and "step" in s]
    counts += [float(g["step"]) for g in optimizer.param_groups if "step" in g]
    return int(max(counts)) if counts else 0


def _per_parameter(optimizer: Any, params: Sequence[torch.Tensor], key: str) -> list[torch.Tensor]:
    """``optimizer.state[p][key]`` for each parameter, or its ZeRO-assembled full value."""
    out = []
    for index, p in enumerate(params):
        state = optimizer.state.get(p) if hasattr(optimizer, "state") else None
        if isinstance(state, dict) and key in state and state[key].numel() == p.numel():
            out.append(state[key].detach().reshape(p.shape))
            continue
        value = None
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None and mapping.lp_fragment_address.numel == p.numel():
            value = mapping.get_hp_fragment(key)  # the whole parameter is in this rank's flat partition
        elif hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_full_optimizer_state

            value = safe_get_full_optimizer_state(p, key)  # assembled over the data-parallel group
        if value is None:
            raise ProbeError(f"cannot find '{key}' for parameter {index} (shape {tuple(p.shape)}) in the state of "
                             f"{type(optimizer).__name__}; probe the optimizer that updates the model's parameters "
                             "(for a DeepSpeed engine pass the engine or engine.optimizer).")
        out.append(value.detach().reshape(p.shape))
    return out


def _dho2_flat_state(optimizer: Any, params: Sequence[torch.Tensor], vector: torch.Tensor) -> list[torch.Tensor]:
    """Per-parameter views of one of DHO2's flat base-state vectors (whole on this rank: plain PyTorch,
    ZeRO stage 0, or a ZeRO-1/2 partition at world size 1)."""
    layout = optimizer.flat_parameters().layout
    if getattr(layout, "world_size", 1) != 1 or not hasattr(layout, "unflatten"):
        raise ProbeError("DHO2's state is partitioned over several ranks; run the probe as one process.")
    by_id = {id(p): t for p, t in zip(layout.params, layout.unflatten(vector[: layout.total_numel]))}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ProbeError(f"{len(missing)} probed parameter(s) are not DHO2's; probe the model DHO2 optimizes.")
    return [by_id[id(p)] for p in params]


def read_base_optimizer(optimizer: Any, params: Sequence[torch.Tensor]) -> BaseOptimizer:
    """Describe ``optimizer`` (a torch optimizer, DHO2, a DeepSpeed engine or ZeRO optimizer, accelerate's
    wrapper) for the parameters ``params``: family, learning rate, stability limit and AdamW's ``D``."""
    opt = base_optimizer(optimizer)
    name = type(opt).__name__
    group = opt.param_groups[0]
    lr = float(group["lr"])
    if _is_dho2(opt):
        config = opt.config
        family = "adamw" if config.base.value == "adamw" else "heavyball"
        state = opt.base.state
        steps = int(float(state.applied_steps)) if getattr(state, "applied_steps", None) is not None else 0
        info = BaseOptimizer(name=f"DHO2 (base {config.base.value})", family=family, lr=lr, steps=steps,
                             optimizer=opt)
        if family == "heavyball":
            info.momentum = float(config.momentum)
            info.stability_limit = measures.heavy_ball_stability_limit(info.momentum)
            return info
        beta1, beta2 = (float(b) for b in config.betas)
        info.beta1, info.stability_limit = beta1, measures.adam_stability_limit(beta1)
        if state.exp_avg_sq is None or steps == 0:
            return info
        if any(hasattr(p, "_hp_mapping") for p in params):
            squares = _per_parameter(opt, params, "exp_avg_sq")
        else:
            squares = _dho2_flat_state(opt, params, state.exp_avg_sq)
        info.denominator = _adam_denominator(squares, beta2, float(config.eps), steps, bias_correction=True)
        return info
    if "betas" in group:
        beta1, beta2 = (float(b) for b in group["betas"])
        steps = _state_steps(opt)
        info = BaseOptimizer(name=name, family="adamw", lr=lr, beta1=beta1, steps=steps,
                             stability_limit=measures.adam_stability_limit(beta1), optimizer=opt)
        if steps == 0:
            return info
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        squares = _per_parameter(opt, params, key)
        info.denominator = _adam_denominator(squares, beta2, float(group.get("eps", 1e-8)), steps,
                                             bias_correction=bool(group.get("bias_correction", True)))
        return info
    if "momentum" in group:
        momentum = float(group["momentum"])
        nesterov, dampening = bool(group.get("nesterov", False)), float(group.get("dampening", 0.0))
        return BaseOptimizer(name=name, family="heavyball", lr=lr, momentum=momentum, steps=_state_steps(opt),
                             stability_limit=measures.heavy_ball_stability_limit(momentum, nesterov, dampening),
                             optimizer=opt)
    return BaseOptimizer(name=name, family=None, lr=lr, optimizer=opt)


def _adam_denominator(squares: Sequence[torch.Tensor], beta2: float, eps: float, steps: int,
                      bias_correction: bool) -> torch.Tensor:
    """``sqrt(v / (1 - beta2^t)) + eps`` as one flat float32 vector (``v`` unscaled without bias correction)."""
    v = measures.flat(list(squares), dtype=torch.float32)
    correction = 1.0 - beta2 ** steps if bias_correction and steps > 0 else 1.0
    return (v / correction).clamp_min(0).sqrt() + eps


def last_step_from_state(optimizer: Any, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The last step of a torch optimizer rebuilt from its state, or None where that is not possible.

    AdamW / Adam: ``-lr m_hat / (sqrt(v_hat) + eps)``, exactly the moment part of the last update (the
    moments after a step are the ones it used), plus AdamW's decoupled decay ``-lr wd x`` at the current
    instead of the previous parameters. SGD with momentum (not Nesterov): ``-lr b``, exact (the buffer
    includes the L2 term). Nothing for other optimizers, DHO2 (whose step has a Newton part) or state
    that is not keyed by the parameters (ZeRO partitions): record the step with :class:`StepRecorder`.
    """
    opt = base_optimizer(optimizer)
    if _is_dho2(opt) or len(opt.param_groups) != 1:
        return None
    group = opt.param_groups[0]
    lr = float(group["lr"])
    if not all(isinstance(opt.state.get(p), dict) and opt.state.get(p) for p in params):
        return None
    if "betas" in group and all("exp_avg" in opt.state[p] for p in params):
        beta1, beta2 = (float(b) for b in group["betas"])
        steps = _state_steps(opt)
        if steps == 0:
            return None
        m = measures.flat([opt.state[p]["exp_avg"] for p in params], dtype=torch.float32)
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        d = _adam_denominator([opt.state[p][key] for p in params], beta2, float(group.get("eps", 1e-8)), steps,
                              bias_correction=bool(group.get("bias_correction", True)))
        step = -lr * (m / (1.0 - beta1 ** steps)) / d
        if isinstance(opt, torch.optim.AdamW) and group.get("weight_decay", 0):
            step -= lr * float(group["weight_decay"]) * measures.flat(list(params), dtype=torch.float32)
        return step
    if "momentum" in group and not group.get("nesterov") and all("momentum_buffer" in opt.state[p] for p in params):
        buffers = [opt.state[p]["momentum_buffer"] for p in params]
        if any(b is None for b in buffers):
            return None
        return -lr * measures.flat(buffers, dtype=torch.float32)
    return None


# ---------------------------------------------------------------------------------------------- steps
class _Snapshot:
    """The parameters before a step; :meth:`delta` gives their change after it."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.before = [p.detach().clone() for p in self.params]

    def delta(self) -> dict[int, torch.Tensor]:
        return {id(p): (p.detach() - b).float() for p, b in zip(self.params, self.before)}


def _delta_for(deltas: dict[int, torch.Tensor] | None, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One flat step over ``params`` from per-parameter changes (zero for a parameter that did not move)."""
    if deltas is None:
        return None
    return torch.cat([deltas.get(id(p), torch.zeros(p.shape, device=p.device)).reshape(-1).float() for p in params])


def _optimizer_params(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class StepRecorder:
    """Records the parameter change of each step of one optimizer (its own step pre/post hooks).

    ``recorder = StepRecorder(optimizer)`` before the last step you train, then
    ``probe_training(..., last_step=recorder.last_step(params))``; :meth:`remove` takes the hooks off.
    It costs one copy of the parameters per step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._snapshot: _Snapshot | None = None
        self._deltas: dict[int, torch.Tensor] | None = None
        self._handles = [optimizer.register_step_pre_hook(self._before),
                         optimizer.register_step_post_hook(self._after)]

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._snapshot = _Snapshot(_optimizer_params(optimizer))

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._snapshot is not None:
            self._deltas, self._snapshot = self._snapshot.delta(), None

    def last_step(self, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The last recorded step as one flat vector over ``params`` (None before the first step)."""
        return _delta_for(self._deltas, params)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ------------------------------------------------------------------------------------- batches, losses
def leading_rows(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a forward's inputs: the leading dimension of its first tensor with one."""
    found: list[int] = []

    def visit(value: Any) -> Any:
        if not found and torch.is_tensor(value) and value.dim() >= 1:
            found.append(int(value.shape[0]))
        return value

    tree_map(visit, (args, kwargs))
    return found[0] if found else None


def chunk_inputs(args: tuple, kwargs: dict, rows: int, chunks: int) -> list[tuple[tuple, dict]]:
    """``chunks`` equal, disjoint, contiguous row ranges of a batch of ``rows`` rows: every tensor whose
    leading dimension is ``rows`` is sliced, everything else passed through (the remainder rows are
    left out)."""
    size = rows // chunks

    def part(j: int) -> tuple[tuple, dict]:
        def cut(value: Any) -> Any:
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == rows:
                return value[j * size:(j + 1) * size]
            return value

        return tree_map(cut, args), tree_map(cut, kwargs)

    return [part(j) for j in range(chunks)]


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside a DeepSpeed engine or a (D)DP wrapper (their ``.module``)."""
    for _ in range(4):
        inner = getattr(module, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner
    return module


def _find_trainer() -> Any:
    """The Hugging Face Trainer on the call stack (the ``self`` of one of its methods), if any."""
    trainer_module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(trainer_module, "Trainer", None)
    if trainer_cls is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_cls):
            return candidate
        frame = frame.f_back
    return None


class TrainingCapture:
    """The hooks ``ds-dho2 probe`` puts on an unmodified training run (see the module docstring).

    ``steps``: the optimizer step after which the probe runs (:class:`ProbeDue` is raised there, once a
    training batch has been seen); ``noise_chunks``: into how many chunks the captured batch is split for
    the noise scale.
    """

    def __init__(self, steps: int, noise_chunks: int = 8) -> None:
        if steps < 1:
            raise ValueError(f"Invalid {steps=}. Must be >= 1.")
        self.steps_due = steps
        self.noise_chunks = noise_chunks
        self.steps = 0
        self.optimizer: Any = None  # the torch optimizer whose steps are counted (outside DeepSpeed)
        self.engine: Any = None  # the DeepSpeed engine whose steps are counted
        self.trainer: Any = None
        self.micro_batches_per_step = 1
        self._micro_batches = 0
        self._batch: tuple[torch.nn.Module, tuple, dict] | None = None
        self._depth = 0
        self._snapshot: _Snapshot | None = None
        self._stepping: Any = None
        self._in_engine_step = False
        self._deltas: dict[int, torch.Tensor] | None = None
        self._step_ends: list[float] = []
        self._handles: list[Any] = []
        self._restore: list[Callable[[], None]] = []
        self.active = False

    # ------------------------------------------------------------------------------------ install
    def install(self) -> "TrainingCapture":
        """Register the global hooks and wrap DeepSpeed's engine (when installed); returns ``self``."""
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_module_forward_pre_hook(self._enter),
                         register_module_forward_hook(self._exit, with_kwargs=True, always_call=True),
                         register_optimizer_step_pre_hook(self._before_step),
                         register_optimizer_step_post_hook(self._after_step)]
        self._wrap_deepspeed()
        self.active = True
        return self

    def remove(self) -> None:
        """Take every hook and wrapper off (idempotent)."""
        self.active = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        while self._restore:
            self._restore.pop()()

    def _wrap_deepspeed(self) -> None:
        try:
            from deepspeed.runtime.engine import DeepSpeedEngine
        except ImportError:
            return
        capture = self
        original_backward, original_step = DeepSpeedEngine.backward, DeepSpeedEngine.step

        @functools.wraps(original_backward)
        def backward(engine: Any, *args: Any, **kwargs: Any) -> Any:
            if capture.active:
                capture.engine = engine
            return original_backward(engine, *args, **kwargs)

        @functools.wraps(original_step)
        def step(engine: Any, *args: Any, **kwargs: Any) -> Any:
            if not capture.active:
                return original_step(engine, *args, **kwargs)
            boundary = engine.is_gradient_accumulation_boundary()
            snapshot = _Snapshot([p for p in engine.module.parameters() if p.requires_grad]) if boundary else None
            capture._in_engine_step = True
            try:
                out = original_step(engine, *args, **kwargs)
            finally:
                capture._in_engine_step = False
            if snapshot is not None:
                capture.engine = engine
                capture._deltas = snapshot.delta()
                capture._step_done()
            return out

        DeepSpeedEngine.backward, DeepSpeedEngine.step = backward, step

        def restore() -> None:
            DeepSpeedEngine.backward, DeepSpeedEngine.step = original_backward, original_step

        self._restore.append(restore)

    # ------------------------------------------------------------------------------------- hooks
    def _enter(self, module: torch.nn.Module, args: tuple) -> None:
        self._depth += 1

    def _exit(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and module.training and torch.is_grad_enabled():
            self._batch = (module, args, dict(kwargs))
            self._micro_batches += 1

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._in_engine_step or self.engine is not None or self._stepping is not None:
            return
        if self.optimizer is None:
            self.optimizer = optimizer
        if optimizer is self.optimizer:
            self._stepping = optimizer
            self._snapshot = _Snapshot(_optimizer_params(optimizer))

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer is not self._stepping or self._snapshot is None:
            return
        self._deltas, self._snapshot, self._stepping = self._snapshot.delta(), None, None
        self._step_done()

    def _step_done(self) -> None:
        self.steps += 1
        self.micro_batches_per_step = max(1, self._micro_batches)
        self._micro_batches = 0
        self._step_ends.append(time.perf_counter())
        del self._step_ends[:-(STEP_TIMING_WINDOW + 1)]
        if self.trainer is None:
            self.trainer = _find_trainer()
        if self.steps >= self.steps_due and self._batch is not None:
            logger.info("ds-dho2 probe: step %d reached; stopping the script to probe.", self.steps)
            raise ProbeDue()

    # ---------------------------------------------------------------------------------- results
    @property
    def step_seconds(self) -> float | None:
        """The median wall time between the last steps (data, forward, backward and step), if >= 2 steps."""
        ends = self._step_ends
        if len(ends) < 2:
            return None
        return statistics.median(b - a for a, b in zip(ends, ends[1:]))

    def probe_arguments(self) -> dict[str, Any]:
        """Keyword arguments of :func:`ds_dho2.probe.probe_training` for what was captured, or
        :class:`ProbeError` naming what is missing."""
        if self.steps == 0:
            raise ProbeError("no optimizer step seen: the script ended before its optimizer (or DeepSpeed "
                             "engine) took a step. Check that it trains, and pass --steps no larger than the "
                             "steps it runs.")
        if self._batch is None:
            raise ProbeError("no training forward seen: no module ran forward in training mode with gradients "
                             "enabled. The probe needs the model's training forward (model.train()).")
        root, args, kwargs = self._batch
        kwargs = {k: v for k, v in kwargs.items() if k not in REPLAY_DROPPED_KWARGS}
        if self.engine is not None:
            model, optimizer = self.engine.module, self.engine.basic_optimizer or self.engine.optimizer
            if getattr(self.engine, "zero_optimization_stage", lambda: 0)() >= 3:
                raise ProbeError("ZeRO stage 3 is not supported by the probe (the parameters are not whole on a "
                                 "rank); probe with ZeRO stage 0, 1 or 2.")
        else:
            model, optimizer = unwrap_module(root), self.optimizer
            owned = {id(p) for p in model.parameters()}
            if not any(id(p) in owned for p in _optimizer_params(optimizer)):
                raise ProbeError(f"the optimizer ({type(optimizer).__name__}) updates none of the parameters of the "
                                 f"model that ran forward ({type(model).__name__}); the probe needs one model and "
                                 "the optimizer of its parameters.")
        params = [p for p in model.parameters() if p.requires_grad]
        loss_of = self._loss_function(model)
        rows = leading_rows(args, kwargs)
        batches = None
        chunk_size = None
        if rows is not None and rows >= 2:
            count = min(self.noise_chunks, rows)
            batches = [functools.partial(loss_of, a, k) for a, k in chunk_inputs(args, kwargs, rows, count)]
            chunk_size = rows // count
        if self.engine is not None:
            batch_size = float(self.engine.train_batch_size())
        elif rows is not None:
            batch_size = float(rows * self.micro_batches_per_step)
        else:
            batch_size = None
        return {"model": model, "loss_closure": functools.partial(loss_of, args, kwargs), "optimizer": optimizer,
                "batches": batches, "batch_size": batch_size, "chunk_size": chunk_size,
                "dataset_size": self.dataset_size(),
                "last_step": _delta_for(self._deltas, params), "step_seconds": self.step_seconds,
                "step": self.steps}

    def dataset_size(self) -> int | None:
        """The training set's size where the run names one: the Trainer's ``train_dataset`` or the dataset of
        the DeepSpeed engine's own dataloader (``training_data=``); None otherwise."""
        holders = [getattr(self.trainer, "train_dataset", None),
                   getattr(getattr(self.engine, "training_dataloader", None), "dataset", None)]
        for dataset in holders:
            try:
                return int(len(dataset)) if dataset is not None else None
            except TypeError:  # an iterable dataset has no length
                continue
        return None

    def _loss_function(self, model: torch.nn.Module) -> Callable[[tuple, dict], torch.Tensor]:
        """``(args, kwargs) -> loss``: the model's own loss, else the Trainer's ``compute_loss``."""
        trainer = self.trainer

        def loss_of(args: tuple, kwargs: dict) -> torch.Tensor:
            output = model(*args, **kwargs)
            loss = find_loss(output)
            if loss is not None:
                return loss
            if trainer is not None and not args:
                return trainer.compute_loss(model, dict(kwargs))
            raise ProbeError(f"no loss found: the model's output ({type(output).__name__}) carries no scalar loss. "
                             "Return the loss from forward (a Hugging Face model returns it when given labels), "
                             "or call ds_dho2.probe.probe_training(model, loss_closure, optimizer) in the script.")

        return loss_of


__all__ = ["BaseOptimizer", "ProbeDue", "ProbeError", "StepRecorder", "TrainingCapture", "base_optimizer",
           "chunk_inputs", "last_step_from_state", "leading_rows", "read_base_optimizer", "unwrap_module"]
