"""The model hooks DHO2 needs: the last training batch (for replayed products), whether the model's output
carries a loss, and math attention on the forwards whose gradient graph will be differentiated twice."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from ds_dho2.hvp.tape import CriterionTape

LossFn = Callable[[Any, tuple, dict], torch.Tensor]

#: keyword arguments a replay drops: Hugging Face models divide by this global item count (summed over
#: accumulation steps and ranks), while a curvature loss is the micro-batch's own mean
#: (``ds_dho2.curvature.loss_scale``).
REPLAY_DROPPED_KWARGS = ("num_items_in_batch",)


class LossNotFoundError(ValueError):
    """The model output holds no scalar loss and no other route to the loss exists (a user error)."""


def find_loss(output: Any) -> torch.Tensor | None:
    """The scalar loss in a model output (the output itself, its ``.loss`` or its ``["loss"]``), or None."""
    if torch.is_tensor(output):
        return output if output.dim() == 0 else None
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    return loss if torch.is_tensor(loss) and loss.dim() == 0 else None


def loss_from_output(output: Any) -> torch.Tensor:
    """The scalar loss in a model output; raises :class:`LossNotFoundError` naming the fixes."""
    loss = find_loss(output)
    if loss is None:
        raise LossNotFoundError(
            f"DHO2 cannot find a scalar loss in the model output of type {type(output).__name__}: expected a "
            "0-dim tensor, a `.loss` attribute or a ['loss'] entry (pass labels to a Hugging Face model). "
            "Otherwise call attach(model, loss_fn=lambda output, args, kwargs: ...), or train through a "
            "DeepSpeed engine's engine.backward(loss), whose loss DHO2 uses directly."
        )
    return loss


def _leading_batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def slice_batch(args: tuple, kwargs: dict, fraction: float) -> tuple[tuple, dict]:
    """Every ``round(1 / fraction)``-th row of every tensor whose leading dimension is the batch size ``B``
    (that of the first tensor argument); everything else is passed through unchanged.

    Strided rows make the subset independent of the world size: when each rank's micro-batch is a
    contiguous slice of the global batch, the ranks' subsets together are the single-process subset.
    """
    batch = _leading_batch_size(args, kwargs)
    stride = max(1, round(1.0 / fraction))
    if stride == 1 or batch is None or batch < 2:
        return args, kwargs
    stride = min(stride, batch)

    def cut(value: Any) -> Any:
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == batch:
            return value[::stride].contiguous()
        return value

    return tree_map(cut, args), tree_map(cut, kwargs)


class BatchCapture:
    """Forward hooks on the model DHO2 learns (``DHO2.attach``).

    * The pre-hook remembers the inputs of the last training-mode, grad-enabled forward (evaluation
      passes do not replace them; forwards run by the products themselves are ignored, see :meth:`paused`).
    * The post-hook records whether that forward's output carried a scalar loss, so a missing loss is
      reported at the first step rather than at the first refresh. When it carries none (and no
      ``loss_fn`` is given) it starts a :class:`~ds_dho2.hvp.tape.CriterionTape` of the script's criterion,
      which :meth:`finish_tape` completes with the loss handed to ``engine.backward``.
    * When ``math_attention()`` says so, a training forward runs under the math SDPA backend, whose graph
      supports a second backward (the steps whose own gradient graph yields products).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None = None,
                 math_attention: Callable[[], bool] | None = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.args: tuple | None = None
        self.kwargs: dict | None = None
        self.output_has_loss: bool | None = None
        self.math_attention = math_attention or (lambda: False)
        self.skipped_eval_forward = False
        self._paused = False
        #: record the script's criterion when the output has no loss (set where engine.backward hands
        #: DHO2 the loss that ends it)
        self.record_criterion = False
        self.tape: CriterionTape | None = None
        self._attention: contextlib.AbstractContextManager | None = None
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, always_call=True)]

    def _recording(self, module: torch.nn.Module) -> bool:
        return not self._paused and torch.is_grad_enabled() and module.training

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._paused or not torch.is_grad_enabled():
            return
        if not module.training:
            self.skipped_eval_forward = True
            return
        self._drop_tape()
        self.args, self.kwargs = args, kwargs
        if self._attention is None and self.math_attention():
            self._attention = sdpa_kernel([SDPBackend.MATH])
            self._attention.__enter__()

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._attention is not None:
            attention, self._attention = self._attention, None
            attention.__exit__(None, None, None)
        if self._recording(module):
            self.output_has_loss = find_loss(output) is not None
            if self.record_criterion and not self.output_has_loss and self.loss_fn is None and self.args is not None:
                self.tape = CriterionTape(output, _leading_batch_size(self.args, self.kwargs or {}))

    @property
    def has_batch(self) -> bool:
        return self.args is not None

    @property
    def can_replay(self) -> bool:
        """Whether a replay can produce a loss: a ``loss_fn`` was given, the output carries one, or the
        script's criterion was recorded."""
        return self.has_batch and (self.loss_fn is not None or bool(self.output_has_loss)
                                   or (self.tape is not None and self.tape.ready))

    def finish_tape(self, loss: torch.Tensor) -> None:
        """``engine.backward(loss)``: the recorded criterion ends in ``loss`` (or is dropped)."""
        if self.tape is not None and not self.tape.ready and not self.tape.finish(loss):
            self._drop_tape()

    def _drop_tape(self) -> None:
        if self.tape is not None:
            self.tape.stop()
            self.tape = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore forwards while inside this context (the products' own forwards)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def replay_closure(self, fraction: float = 1.0) -> Callable[[], torch.Tensor]:
        """A closure that re-runs the model on (a ``fraction`` of) the captured batch and returns its loss."""
        if self.args is None or self.kwargs is None:
            raise RuntimeError("DHO2 has no captured batch yet: run a training forward pass first.")
        kwargs = {k: v for k, v in self.kwargs.items() if k not in REPLAY_DROPPED_KWARGS}
        batch = _leading_batch_size(self.args, kwargs)
        args, kwargs = slice_batch(self.args, kwargs, fraction)
        stride = 1 if batch is None or batch < 2 else min(max(1, round(1.0 / fraction)), batch)
        tape = self.tape if (self.loss_fn is None and not self.output_has_loss) else None

        def closure() -> torch.Tensor:
            with self.paused():
                output = self.model(*args, **kwargs)
            if self.loss_fn is not None:
                return self.loss_fn(output, args, kwargs)
            if tape is not None and tape.ready:
                return tape.replay(output, stride)
            return loss_from_output(output)

        return closure

    def remove(self) -> None:
        self._drop_tape()
        for handle in self._handles:
            handle.remove()
        self._handles = []
