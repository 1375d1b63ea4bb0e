"""Hugging Face Trainer integration: curvature statistics in the Trainer's logs, and DHO2 without DeepSpeed.

Two ways to train with DHO2 under :class:`transformers.Trainer`:

* **DeepSpeed** (``TrainingArguments(deepspeed="ds_config.json")`` or ``--deepspeed``, or
  ``accelerate launch`` with a DeepSpeed plugin): the config's ``"optimizer": {"type": "DHO2", ...}`` block
  builds DHO2 after ``import ds_dho2`` (or under ``ds-dho2 run``). HF hands DeepSpeed a *flat* parameter
  list (no decay / no-decay groups); DeepSpeed binds DHO2 to the rank's ZeRO partition and attaches the
  model, so nothing else is needed.
* **No DeepSpeed**: ``Trainer(..., optimizer_cls_and_kwargs=dho2_optimizer_cls_and_kwargs(lr=...))``. The
  Trainer passes its decay / no-decay parameter groups, which DHO2 merges (groups may differ only in
  ``weight_decay``). The Trainer does **not** pass ``learning_rate`` to a class given this way: give
  ``lr`` (the peak rate) here. DHO2 must learn the model (``DHO2.attach``): :class:`DHO2CurvatureCallback`,
  which every Trainer gets after ``import ds_dho2``, does that in ``on_train_begin``.

Learning rate, ``alpha`` and ``"auto"``
---------------------------------------
HF fills ``"auto"`` only in ``optimizer.params.{lr, betas, eps, weight_decay}`` (from ``learning_rate``,
``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``), the ``scheduler.params`` warm-up / total-step keys,
``gradient_clipping``, batch sizes and precision flags. An explicit value there that differs from the
``TrainingArguments`` value is a start-up ``ValueError``. **Never write ``"auto"`` in DHO2-specific keys**
(``rank``, ``refresh_interval``, ``alpha``, ...): accelerate rejects any ``"auto"`` it cannot fill.

* DS config **without** a ``"scheduler"`` block: HF's own scheduler (``lr_scheduler_type``, linear decay by
  default, with ``warmup_steps`` / ``warmup_ratio``) is built on DHO2 itself and drives its ``lr``.
* DS config **with** a ``"scheduler"`` block (e.g. ``WarmupDecayLR`` with ``"auto"`` values): DeepSpeed's
  scheduler drives ``lr``; HF's ``lr_scheduler_type`` is ignored.
* Either way DHO2 scales its Newton step size ``alpha`` by ``lr / initial lr``, so the schedule drives
  ``alpha`` too. Without DeepSpeed the Trainer's scheduler drives both in the same way.

Curvature statistics in the logs
--------------------------------
After ``import ds_dho2`` (and so under ``ds-dho2 run``) every Trainer gets a :class:`DHO2CurvatureCallback`
first in its callback list (:mod:`ds_dho2.integrations.trainer_hook`); it does nothing unless the
Trainer's optimizer is DHO2. Once a refresh has run it adds :func:`curvature_log_entries` to every training
log: ``dho2/eigenvalue_max``, ``dho2/eigenvalue_min``, ``dho2/rank``, the HVP strategy in use
(``dho2/hvp_strategy_<name>`` = 1) and, when ``hvp="auto"`` measured it, its cost
(``dho2/hvp_gradients_per_product``), ``dho2/refresh_interval``, ``dho2/subspace_rotation``,
``dho2/newton_trust_scale``, ``dho2/subspace_grad_fraction``, ``dho2/refresh_seconds``,
``dho2/refresh_count``, ``dho2/refresh_step``, ``dho2/lanczos_iterations``, ``dho2/warm_start`` and, with
ADMM, the ``dho2/admm_*`` entries: every numeric entry of ``DHO2.curvature_stats()``. It asks the Trainer to
log at each step where a refresh completed, and on rank 0 warns at the start of training when the run ends
before the first refresh (``max_steps < warmup_steps``).

In transformers 5 ``Trainer.log`` appends a *copy* of ``logs`` to ``state.log_history`` before the
callbacks' ``on_log`` run, and reporting callbacks (TensorBoard, W&B, ...) are registered before user
callbacks. The callback therefore also updates the entry just appended to ``state.log_history``, and it
must run before the reporters and the console printer: the automatic installation and
:func:`add_curvature_callback` both put it first, and a Trainer never holds more than one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback

from ds_dho2.optimizer import DHO2

logger = logging.getLogger(__name__)

PREFIX = "dho2/"
# curvature_stats() entries logged in a form of their own (or not at all).
_SPECIAL_STATS = ("eigenvalues", "hvp_strategy", "hvp_report", "rank")
# Attributes through which HF / accelerate / DeepSpeed wrappers reach the optimizer they wrap.
_WRAPPER_ATTRIBUTES = ("basic_optimizer", "optimizer", "_optimizer", "base_optimizer", "opt", "inner_optimizer")


def find_dho2(obj: Any, max_depth: int = 8) -> DHO2 | None:
    """The :class:`DHO2` inside ``obj``, or None.

    ``obj`` may be DHO2 itself, a DeepSpeed engine (``.basic_optimizer`` / ``.optimizer``), a ZeRO optimizer
    (``.optimizer``), accelerate's ``AcceleratedOptimizer`` / ``DeepSpeedOptimizerWrapper`` (``.optimizer``),
    a scheduler (``.optimizer``) or any chain of these; attributes are followed breadth-first.
    """
    seen: set[int] = set()
    frontier = [obj]
    for _ in range(max_depth + 1):
        following = []
        for item in frontier:
            if item is None or id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, DHO2):
                return item
            for name in _WRAPPER_ATTRIBUTES:
                try:
                    inner = getattr(item, name, None)
                except Exception:  # noqa: BLE001 - a property of a half-built wrapper may raise
                    inner = None
                if inner is not None and not isinstance(inner, (str, int, float, bool, dict, list, tuple)):
                    following.append(inner)
        if not following:
            return None
        frontier = following
    return None


def _number(value: Any) -> float | None:
    """``value`` as a finite float if it is a number (a bool counts as 0 / 1, a 1-element tensor as its
    value), else None."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def curvature_log_entries(optimizer: DHO2) -> dict[str, float]:
    """DHO2's latest curvature statistics as flat ``dho2/...`` float entries (empty before any refresh).

    The eigenvalues become ``eigenvalue_max`` / ``eigenvalue_min`` / ``rank``; the HVP strategy in use
    becomes ``hvp_strategy_<name>`` = 1 and, when ``hvp="auto"`` measured it, ``hvp_gradients_per_product``
    (its cost in gradients); every other numeric entry of ``curvature_stats()`` (refresh interval, subspace
    rotation, trust scale, ADMM entries, ...) is logged under its own name, and non-numeric ones are left out.
    """
    stats = optimizer.curvature_stats()
    entries: dict[str, float] = {}
    eigenvalues = stats.get("eigenvalues")
    if eigenvalues is None:
        return entries  # nothing to report before the first refresh
    values = [float(v) for v in (eigenvalues.tolist() if torch.is_tensor(eigenvalues) else eigenvalues)]
    if values:
        entries[PREFIX + "eigenvalue_max"] = max(values)
        entries[PREFIX + "eigenvalue_min"] = min(values)
        entries[PREFIX + "rank"] = float(len(values))
    strategy = stats.get("hvp_strategy")
    if isinstance(strategy, str) and strategy:
        entries[PREFIX + "hvp_strategy_" + strategy] = 1.0
        report = stats.get("hvp_report") or {}
        cost = _number(report.get("candidates", {}).get(strategy, {}).get("gradients_per_product"))
        if cost is not None:
            entries[PREFIX + "hvp_gradients_per_product"] = cost
    for key in sorted(stats):
        if key not in _SPECIAL_STATS:
            value = _number(stats[key])
            if value is not None:
                entries[PREFIX + key] = value
    return entries


class DHO2CurvatureCallback(TrainerCallback):
    """Adds DHO2's curvature statistics to the Trainer's logs; attaches the model when needed.

    ``log_on_refresh``: ask the Trainer to log at every step where a curvature refresh completed, so each
    refresh reaches the loggers even between ``logging_steps``. ``attach_model``: in ``on_train_begin``,
    call ``DHO2.attach(model)`` if DHO2 has no model yet (the non-DeepSpeed path; under DeepSpeed the
    engine attaches it). The refresh loss needs no scaling here at any world size: DHO2 takes it from
    ``engine.backward`` or replays the micro-batch without ``num_items_in_batch``
    (``ds_dho2.curvature.loss_scale``). ``automatic``: installed by ``import ds_dho2`` rather than by the
    script, so it stays silent when the Trainer's optimizer is not DHO2.
    """

    def __init__(self, log_on_refresh: bool = True, attach_model: bool = True,
                 automatic: bool = False) -> None:
        self.log_on_refresh = log_on_refresh
        self.attach_model = attach_model
        self.automatic = automatic
        self.optimizer: DHO2 | None = None
        self._last_refresh_count = 0
        self._warned_missing = False

    def _locate(self, kwargs: dict) -> DHO2 | None:
        if self.optimizer is None:
            for candidate in (kwargs.get("optimizer"), kwargs.get("lr_scheduler"), kwargs.get("model")):
                found = find_dho2(candidate)
                if found is not None:
                    self.optimizer = found
                    break
        return self.optimizer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.optimizer = None
        optimizer = self._locate(kwargs)
        if optimizer is None:
            if not self._warned_missing:
                logger.log(logging.DEBUG if self.automatic else logging.INFO,
                           "DHO2CurvatureCallback: the Trainer's optimizer is not DHO2; nothing to log.")
                self._warned_missing = True
            return
        self._last_refresh_count = int(optimizer.curvature_stats().get("refresh_count", 0))
        model = kwargs.get("model")
        if self.attach_model and optimizer.model is None and model is not None:
            optimizer.attach(model)
            logger.info("DHO2CurvatureCallback attached DHO2 to %s.", type(model).__name__)
        if getattr(state, "is_world_process_zero", True):
            warn_if_run_ends_before_first_refresh(optimizer, int(getattr(state, "max_steps", 0) or 0))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = self._locate(kwargs)
        if optimizer is None:
            return
        count = int(optimizer.curvature_stats().get("refresh_count", 0))
        if count != self._last_refresh_count:
            self._last_refresh_count = count
            if self.log_on_refresh:
                control.should_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        optimizer = self._locate(kwargs)
        if optimizer is None or logs is None or "loss" not in logs:
            return  # only training logs (evaluation / final summary logs carry no optimizer state)
        entries = curvature_log_entries(optimizer)
        if not entries:
            return
        history = state.log_history
        # Trainer.log appended {**logs, "step": global_step} before calling on_log: update that entry too.
        if history and history[-1].get("step") == state.global_step and all(
                history[-1].get(k) == v for k, v in logs.items()):
            history[-1].update(entries)
        logs.update(entries)


def short_run_message(optimizer: DHO2, max_steps: int) -> str | None:
    """The warning for a run of ``max_steps`` steps that ends before DHO2's first refresh, or None."""
    config = optimizer.config
    if not config.curvature.enabled or max_steps <= 0 or max_steps >= config.warmup_steps:
        return None
    return (f"DHO2 will not refresh its curvature in this run: max_steps={max_steps} is less than its "
            f"warmup_steps={config.warmup_steps}, so it trains as its base optimizer ({config.base.value}) "
            f"throughout. Set warmup_steps to at most {max_steps} in the DHO2 params "
            "(optimizer.params.warmup_steps in a DeepSpeed config).")


def warn_if_run_ends_before_first_refresh(optimizer: DHO2, max_steps: int) -> None:
    """Log :func:`short_run_message` as a warning when it applies."""
    message = short_run_message(optimizer, max_steps)
    if message is not None:
        logger.warning(message)


def ensure_curvature_callback(trainer: Any) -> DHO2CurvatureCallback:
    """Make ``trainer`` hold exactly one :class:`DHO2CurvatureCallback`, first in its list (the one it
    already has, moved there, or an automatic one); called for every new Trainer after ``import ds_dho2``."""
    callbacks = trainer.callback_handler.callbacks
    existing = [callback for callback in callbacks if isinstance(callback, DHO2CurvatureCallback)]
    callback = existing[0] if existing else DHO2CurvatureCallback(automatic=True)
    callbacks[:] = [callback] + [c for c in callbacks if not isinstance(c, DHO2CurvatureCallback)]
    return callback


def add_curvature_callback(trainer: Any, **callback_kwargs: Any) -> DHO2CurvatureCallback:
    """Register a :class:`DHO2CurvatureCallback` first in ``trainer``'s callbacks (before reporters).

    It replaces any curvature callback the Trainer already holds (such as the one ``import ds_dho2`` adds
    to every Trainer), so the statistics are never logged twice.
    """
    callback = DHO2CurvatureCallback(**callback_kwargs)
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [callback] + [c for c in callbacks if not isinstance(c, DHO2CurvatureCallback)]
    return callback


def dho2_optimizer_cls_and_kwargs(**params: Any) -> tuple[type[DHO2], dict[str, Any]]:
    """``(DHO2, params)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` (the non-DeepSpeed path).

    ``params`` are DHO2's keyword arguments (validated now, so a bad key fails before training); pass
    ``lr=training_args.learning_rate``, since the Trainer does not forward it. Add
    :class:`DHO2CurvatureCallback` so the model gets attached and the statistics get logged.
    """
    from ds_dho2.config import DHO2Config

    DHO2Config.from_dict(params)
    return DHO2, dict(params)


__all__ = ["DHO2CurvatureCallback", "add_curvature_callback", "curvature_log_entries",
           "dho2_optimizer_cls_and_kwargs", "ensure_curvature_callback", "find_dho2",
           "short_run_message"]
