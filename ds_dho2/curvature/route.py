"""Where a refresh gets its loss: the loss handed to ``engine.backward``, or a replay of the captured batch.

A user never passes batches or a loss function to DHO2 (docs/design.md, "Where the curvature loss comes
from"). :class:`LossRoute` owns the model hooks (:class:`~ds_dho2.hvp.capture.BatchCapture`), decides on
which steps the training forward must build a graph that supports products, hands the tracker what a
step offers (:class:`~ds_dho2.hvp.selection.ProductInputs`), reports a missing route at the first step,
and re-evaluates the curvature batch's loss for the ADMM acceptance check.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch

from ds_dho2.config import DHO2Config, HVPMethod
from ds_dho2.curvature.tracker import CurvatureTracker
from ds_dho2.dist.layout import ParameterShardLayout
from ds_dho2.hvp.capture import BatchCapture, LossFn, LossNotFoundError
from ds_dho2.hvp.partitioned import Partitions, shifted_partitions
from ds_dho2.hvp.selection import ProductInputs
from ds_dho2.hvp.strategies import loss_at

logger = logging.getLogger(__name__)


class LossRoute:
    """The routes to the curvature loss of one DHO2; ``next_step()`` is the number of the coming step."""

    def __init__(self, config: DHO2Config, tracker: CurvatureTracker, next_step: Callable[[], int]) -> None:
        self.config = config
        self.tracker = tracker
        self.next_step = next_step
        self.capture: BatchCapture | None = None
        self.engine_backward = False  # an engine hands DHO2 the loss of engine.backward
        self.saw_engine_loss = False
        self.is_boundary: Callable[[], bool] = lambda: True
        #: ZeRO-3: products run in ``step()`` on the partitions, never on the graph of engine.backward
        self.products_in_step_only = False
        self.release_after_backward: Callable[[], None] = lambda: None
        self.quiet_products: Callable[[], Any] = contextlib.nullcontext
        self._warned: set[str] = set()

    # ---------------------------------------------------------------------------------------- wiring
    def attach(self, model: torch.nn.Module, loss_fn: LossFn | None = None) -> None:
        if self.capture is not None:
            self.capture.remove()
        self.capture = BatchCapture(model, loss_fn, math_attention=self.graph_products_due)
        self.capture.record_criterion = self.engine_backward

    def bind_engine_backward(self, is_boundary: Callable[[], bool]) -> None:
        self.engine_backward, self.is_boundary = True, is_boundary
        if self.capture is not None:
            self.capture.record_criterion = True

    @property
    def model(self) -> torch.nn.Module | None:
        return None if self.capture is None else self.capture.model

    # -------------------------------------------------------------------------------------- products
    def graph_products_due(self) -> bool:
        """Whether the next training forward must build a graph that supports products (math attention)."""
        if not self.engine_backward or not self.config.curvature.enabled or self.products_in_step_only:
            return False
        if self.tracker.chooser.resolved not in (None, HVPMethod.GRAPH) or not self.is_boundary():
            return False
        return self.tracker.wants_products(self.next_step())

    def on_backward(self, loss: torch.Tensor, scale: float) -> None:
        """The engine's ``backward(loss)``: on a boundary micro-batch of a step due for products, run them
        on this loss's graph (``scale``: see ``ds_dho2.curvature.loss_scale``)."""
        self.saw_engine_loss = True
        if self.capture is not None:
            self.capture.finish_tape(loss)
        if not self.config.curvature.enabled or not self.is_boundary() or self.products_in_step_only:
            return
        step = self.next_step()
        if not self.tracker.wants_products(step):
            return
        graph_loss = loss if loss.requires_grad else None
        self.advance(step, lambda: self.product_inputs(graph_loss, scale))

    def in_step(self, step: int) -> None:
        """``step()``: check the route at the first step, then run the products still due at this step."""
        if step == 1:
            self._check()
        if not self.tracker.wants_products(step):
            return
        if self.engine_backward and self.saw_engine_loss and not self.products_in_step_only:
            self._warn_once("late_products", "DHO2 took curvature products in step() by replaying the batch: the "
                            "last engine.backward was not on an accumulation boundary.")
        self.advance(step, self.product_inputs)

    def advance(self, step: int, inputs: Callable[[], ProductInputs | None]) -> None:
        if self.capture is None:
            self.tracker.advance(step, inputs)
            return
        with self.capture.paused():
            self.tracker.advance(step, inputs)

    def product_inputs(self, graph_loss: torch.Tensor | None = None, graph_scale: float = 1.0) -> ProductInputs | None:
        capture = self.capture
        if (capture is None or not capture.has_batch) and graph_loss is None:
            self._warn_once("unattached", "DHO2 skipped a curvature refresh: %s. Until then DHO2 behaves as its "
                            "base optimizer.", self._attach_hint())
            return None
        replay = full = None
        if capture is not None and capture.can_replay:
            replay = capture.replay_closure(self.config.curvature.batch_fraction)
            full = capture.replay_closure(1.0)
        if replay is None and graph_loss is None:
            return None
        layout = self.tracker.require_layout()
        if isinstance(layout, ParameterShardLayout):
            partitions = Partitions(layout, self.tracker.shard_comm, self.release_after_backward, self.quiet_products)
            return ProductInputs(model=capture.model, params=list(layout.params), replay=replay, full_replay=full,
                                 partitions=partitions)
        return ProductInputs(model=None if capture is None else capture.model, params=list(layout.params),
                             replay=replay, full_replay=full, graph_loss=graph_loss, graph_scale=graph_scale)

    # ------------------------------------------------------------------------------------------ ADMM
    def loss_evaluator(self) -> Callable[[torch.Tensor | None], float] | None:
        """The curvature batch's loss at the module's parameters plus a shift (this rank's slice), averaged
        over ranks; None when no loss can be re-evaluated."""
        capture = self.capture
        if capture is None or not capture.can_replay:
            return None
        fraction = 1.0 if self.tracker.chooser.whole_batch else self.config.curvature.batch_fraction
        replay = capture.replay_closure(fraction)
        tracker = self.tracker

        def evaluate(shift: torch.Tensor | None) -> float:
            layout = tracker.require_layout()
            if isinstance(layout, ParameterShardLayout):  # ZeRO-3: shift the partitions themselves
                with torch.no_grad(), shifted_partitions(layout, shift, tracker.shard_comm):
                    loss = loss_at(capture.model, layout.params, replay)
            else:
                shifts = None
                if shift is not None:
                    shifts = layout.unflatten(tracker.shard_comm.all_gather(shift)[: layout.total_numel])
                loss = loss_at(capture.model, layout.params, replay, shifts)
            return float(tracker.batch_comm.all_reduce_mean(loss.double().reshape(1)))

        return evaluate

    # ---------------------------------------------------------------------------------------- checks
    def _check(self) -> None:
        """At the first step: fail now, not at the first refresh, if no route to the loss exists."""
        if not self.config.curvature.enabled:
            return
        capture = self.capture
        if capture is None:
            self._warn_once("unattached", "DHO2 has no model to take curvature from: %s. Until then DHO2 behaves "
                            "as its base optimizer.", self._attach_hint())
            return
        if not capture.has_batch or capture.can_replay or self.saw_engine_loss:
            return
        if self.engine_backward:
            raise LossNotFoundError(
                "DHO2 sees no loss: the model output carries none and the loss did not pass through "
                "engine.backward(loss). Call engine.backward(loss) instead of loss.backward(), or return the "
                "loss from the model's forward.")
        raise LossNotFoundError(
            "DHO2 cannot find a scalar loss in the model output: return the loss from forward (a 0-dim "
            "tensor, .loss or ['loss']), or call attach(model, loss_fn=lambda output, args, kwargs: ...).")

    def _attach_hint(self) -> str:
        if self.capture is not None and self.capture.skipped_eval_forward:
            return ("the attached model only ran in eval mode (from_pretrained returns an eval-mode model): call "
                    "model.train() before training")
        return "call optimizer.attach(model) and run a training forward pass first"

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)
