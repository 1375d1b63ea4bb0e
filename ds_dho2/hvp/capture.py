"""Capturing the last training batch a model saw, and turning a model output into a scalar loss."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch

LossFn = Callable[[Any, tuple, dict], torch.Tensor]


class LossNotFoundError(ValueError):
    """The model output holds no scalar loss and no ``loss_fn`` was given (a user error, never retried)."""


def loss_from_output(output: Any) -> torch.Tensor:
    """The scalar loss in a model output: the output itself, its ``.loss`` or its ``["loss"]``."""
    if torch.is_tensor(output) and output.dim() == 0:
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise LossNotFoundError(
            f"DHO2 cannot find a scalar loss in the model output of type {type(output).__name__}: expected a "
            "0-dim tensor, a `.loss` attribute or a ['loss'] entry (pass labels to a Hugging Face model). "
            "Otherwise call attach(model, loss_fn=lambda output, args, kwargs: ...)."
        )
    return loss


class BatchCapture:
    """A forward pre-hook that remembers the inputs of the last training-mode, grad-enabled forward.

    Evaluation passes (``model.eval()`` or ``torch.no_grad()``) do not replace the captured batch, and
    forwards run by the HVPs themselves are ignored (see :meth:`paused`).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.args: tuple | None = None
        self.kwargs: dict | None = None
        self._paused = False
        self.skipped_eval_forward = False
        self._handle = model.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._paused or not torch.is_grad_enabled():
            return
        if not module.training:
            self.skipped_eval_forward = True
            return
        self.args, self.kwargs = args, kwargs

    @property
    def has_batch(self) -> bool:
        return self.args is not None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore forwards while inside this context (the HVPs' own forwards)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def loss(self) -> torch.Tensor:
        """Re-run the model on the captured batch and return the scalar loss."""
        if self.args is None or self.kwargs is None:
            raise RuntimeError("DHO2 has no captured batch yet: run a training forward pass first.")
        output = self.model(*self.args, **self.kwargs)
        if self.loss_fn is not None:
            return self.loss_fn(output, self.args, self.kwargs)
        return loss_from_output(output)

    def remove(self) -> None:
        self._handle.remove()
