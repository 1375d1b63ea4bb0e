"""Hessian-vector products as *sessions*: one batch, one set of parameters, any number of products.

A refresh asks for its products one at a time (Lanczos is sequential), all on the same batch and at the
same parameters, so whatever a strategy can reuse between products is computed once when its session
opens:

* ``forward``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` (nothing to reuse);
* ``reverse``: the gradient graph is built once (``create_graph``); each product is one more backward
  through it;
* ``finite_difference``: the gradient at ``x`` is computed once; each product is one more gradient at
  ``x + h v`` (a forward difference, evaluated through ``torch.func.functional_call`` so the module's
  parameters are never written; its step balances truncation against the rounding of the coarser of the
  loss and parameter dtypes, learnt from that first gradient, so no probe forward is needed);
* ``graph``: like ``reverse`` but on the loss the training loop handed to ``engine.backward``, whose
  forward already ran: no replay, no loss function needed.

Replayed products run with dropout off (``model.eval()``) and the math SDPA backend (fused attention
kernels lack double backward and forward-mode AD), and leave the model's train/eval modes, its
parameters, its ``.grad`` fields and the autograd mode exactly as they found them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

LossClosure = Callable[[], torch.Tensor]
Vectors = Sequence[torch.Tensor]


class ProductSession(Protocol):
    """``H v`` for per-parameter vectors ``v`` on one fixed batch at fixed parameters."""

    def __call__(self, vectors: Vectors) -> list[torch.Tensor]: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def hvp_context(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off, math attention, gradients enabled; restores every module's training flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for module, training in modes:
            module.training = training


def _zeros_for_none(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


class _ClosureModule(torch.nn.Module):
    """Lets ``torch.func.functional_call`` swap the parameters seen by an arbitrary loss closure."""

    def __init__(self, model: torch.nn.Module, closure: LossClosure) -> None:
        super().__init__()
        self.model = model
        self._closure = closure

    def forward(self) -> torch.Tensor:
        return self._closure()


def _parameter_names(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(
            f"{len(missing)} parameter(s) optimized by DHO2 are not parameters of the attached model; attach the "
            "model that owns every optimized parameter."
        )
    return [names[id(p)] for p in params]


class ForwardOverReverse:
    """``jvp(grad(loss))``: one forward-mode pass through the gradient computation per product."""

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor], closure: LossClosure) -> None:
        self.model = model
        names = ["model." + n for n in _parameter_names(model, params)]
        wrapper = _ClosureModule(model, closure)

        def loss_of(*tensors: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(wrapper, dict(zip(names, tensors)), ())

        self._grad_of = torch.func.grad(loss_of, argnums=tuple(range(len(params))))
        self._primals = tuple(p.detach() for p in params)

    def __call__(self, vectors: Vectors) -> list[torch.Tensor]:
        with hvp_context(self.model):
            _, product = torch.func.jvp(self._grad_of, self._primals, tuple(vectors))
        return [t.detach() for t in product]

    def close(self) -> None:
        self._primals = ()


class GradientGraph:
    """Products by differentiating ``<grad(loss), v>`` once more, on a gradient graph built once.

    ``loss`` is a scalar whose graph reaches ``params`` (the training step's own loss, or a replay);
    ``scale`` multiplies it (see ``ds_dho2.curvature.loss_scale``).
    """

    def __init__(self, loss: torch.Tensor, params: Sequence[torch.Tensor], scale: float = 1.0) -> None:
        self.params = list(params)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, self.params, create_graph=True,
                                        retain_graph=True, allow_unused=True)
        self._grads = [g for g in grads]
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def __call__(self, vectors: Vectors) -> list[torch.Tensor]:
        if not self._live:
            return [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad():
            product = torch.autograd.grad([self._grads[i] for i in self._live], self.params,
                                          grad_outputs=[vectors[i].to(self._grads[i].dtype) for i in self._live],
                                          retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(product, self.params)]

    def close(self) -> None:
        self._grads, self._live = [], []


class ReverseOverReverse(GradientGraph):
    """Double backward on a replayed loss: one forward and one ``create_graph`` backward per session."""

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor], closure: LossClosure) -> None:
        with hvp_context(model):
            super().__init__(closure(), params)


class TrainableOnly:
    """A session over the parameters that require gradients; the products are zero on the frozen ones
    (a frozen parameter is a constant of the loss, so its rows of the Hessian are not the optimizer's)."""

    def __init__(self, open_inner: Callable[[Sequence[torch.Tensor]], ProductSession],
                 params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self._trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        self._inner = open_inner([self.params[i] for i in self._trainable])

    def __call__(self, vectors: Vectors) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in self.params]
        for i, product in zip(self._trainable, self._inner([vectors[i] for i in self._trainable])):
            out[i] = product
        return out

    def close(self) -> None:
        self._inner.close()


def loss_at(model: torch.nn.Module, params: Sequence[torch.Tensor], closure: LossClosure,
            shifts: Vectors | None = None) -> torch.Tensor:
    """The closure's loss (dropout off, no graph) with ``params + shifts`` in place of ``params``; the
    module's own parameters are never written."""
    with torch.no_grad(), hvp_context(model), torch.no_grad():
        if shifts is None:
            return closure().detach()
        names = ["model." + n for n in _parameter_names(model, params)]
        moved = [p.detach() + s.to(p.dtype) for p, s in zip(params, shifts)]
        return torch.func.functional_call(_ClosureModule(model, closure), dict(zip(names, moved)), ()).detach()


class FiniteDifference:
    """Forward differences of gradients, ``(g(x + h v) - g(x)) / h``, with ``g(x)`` computed once.

    The perturbed parameters are passed through ``torch.func.functional_call``: the module's own
    parameters are never written, so products can run while the training step's graph is still alive
    (inside ``engine.backward``) and the parameters stay exactly as they were.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor], closure: LossClosure) -> None:
        self.model, self.params = model, list(params)
        self._names = ["model." + n for n in _parameter_names(model, params)]
        self._wrapper = _ClosureModule(model, closure)
        with hvp_context(model):
            loss = closure()
            self._base = [g.detach() for g in _zeros_for_none(
                torch.autograd.grad(loss, self.params, allow_unused=True), self.params)]
        machine_eps = max(torch.finfo(p.dtype).eps for p in self.params)
        if loss.dtype.is_floating_point:
            machine_eps = max(machine_eps, torch.finfo(loss.dtype).eps)
        self._relative_step = machine_eps ** 0.5
        with torch.no_grad():
            self._x_norm = float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in self.params)))

    def __call__(self, vectors: Vectors) -> list[torch.Tensor]:
        with torch.no_grad():
            v_norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in vectors)))
        if v_norm == 0:
            return [torch.zeros_like(p) for p in self.params]
        step = self._relative_step * (1.0 + self._x_norm) / v_norm
        with torch.no_grad():
            shifted = [p.detach() + step * v.to(p.dtype) for p, v in zip(self.params, vectors)]
        for tensor in shifted:
            tensor.requires_grad_(True)
        with hvp_context(self.model):
            loss = torch.func.functional_call(self._wrapper, dict(zip(self._names, shifted)), ())
            plus = _zeros_for_none(torch.autograd.grad(loss, shifted, allow_unused=True), shifted)
        return [(a.detach() - b).div_(step) for a, b in zip(plus, self._base)]

    def close(self) -> None:
        self._base = []
