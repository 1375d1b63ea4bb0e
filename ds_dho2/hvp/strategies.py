"""Three ways to compute Hessian-vector products, and the ``auto`` choice among them.

* ``forward``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` (cheapest, needs
  functorch-compatible models);
* ``reverse``: reverse-over-reverse, double backward through ``torch.autograd.grad``;
* ``finite_difference``: central differences of gradients, ``(g(x+hv) - g(x-hv)) / 2h``.

Every product runs with dropout off (``model.eval()``) and the math SDPA backend (fused attention kernels
lack double backward and forward-mode AD), and leaves the model's train/eval modes, its parameters, its
``.grad`` fields and the autograd mode exactly as it found them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ds_dho2.config import HVPMethod
from ds_dho2.hvp.capture import LossNotFoundError

logger = logging.getLogger(__name__)

LossClosure = Callable[[], torch.Tensor]


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


def hvp_forward_over_reverse(model: torch.nn.Module, params: Sequence[torch.Tensor], closure: LossClosure,
                             vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``jvp(grad(loss))``: one forward-mode pass through the gradient computation."""
    names = ["model." + n for n in _parameter_names(model, params)]
    wrapper = _ClosureModule(model, closure)

    def loss_of(*tensors: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(wrapper, dict(zip(names, tensors)), ())

    grad_of = torch.func.grad(loss_of, argnums=tuple(range(len(params))))
    primals = tuple(p.detach() for p in params)
    _, product = torch.func.jvp(grad_of, primals, tuple(vectors))
    return [t.detach() for t in product]


def _gradients(closure: LossClosure, params: Sequence[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    loss = closure()
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def hvp_reverse_over_reverse(model: torch.nn.Module, params: Sequence[torch.Tensor], closure: LossClosure,
                             vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Double backward: differentiate ``<grad(loss), v>`` once more."""
    grads = _gradients(closure, params, create_graph=True)
    inner = sum((g * v).sum() for g, v in zip(grads, vectors) if g.requires_grad)
    if not torch.is_tensor(inner) or not inner.requires_grad:
        return [torch.zeros_like(p) for p in params]
    product = torch.autograd.grad(inner, list(params), allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(product, params)]


def hvp_finite_difference(model: torch.nn.Module, params: Sequence[torch.Tensor], closure: LossClosure,
                          vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Central differences of gradients; the parameters are restored bit for bit afterwards."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        x_norm = torch.sqrt(sum((s.double() ** 2).sum() for s in saved))
        v_norm = torch.sqrt(sum((v.double() ** 2).sum() for v in vectors))
    if v_norm == 0:
        return [torch.zeros_like(p) for p in params]
    # The step balances truncation error against rounding error; the rounding comes from the gradient,
    # which is only as precise as the coarser of the loss and the parameters.
    with torch.no_grad():
        loss_dtype = closure().dtype
    machine_eps = max(torch.finfo(p.dtype).eps for p in params)
    if loss_dtype.is_floating_point:
        machine_eps = max(machine_eps, torch.finfo(loss_dtype).eps)
    step = float(machine_eps ** 0.5 * (1.0 + x_norm) / v_norm)
    try:
        with torch.no_grad():
            for p, s, v in zip(params, saved, vectors):
                p.copy_(s + step * v)
        plus = [g.detach() for g in _gradients(closure, params, create_graph=False)]
        with torch.no_grad():
            for p, s, v in zip(params, saved, vectors):
                p.copy_(s - step * v)
        minus = [g.detach() for g in _gradients(closure, params, create_graph=False)]
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return [(a - b) / (2 * step) for a, b in zip(plus, minus)]


_STRATEGIES = {
    HVPMethod.FORWARD: hvp_forward_over_reverse,
    HVPMethod.REVERSE: hvp_reverse_over_reverse,
    HVPMethod.FINITE_DIFFERENCE: hvp_finite_difference,
}
_AUTO_ORDER = (HVPMethod.FORWARD, HVPMethod.REVERSE, HVPMethod.FINITE_DIFFERENCE)


class HessianVectorProduct:
    """Computes ``H v`` with one strategy; ``auto`` tries forward, reverse, finite differences in turn
    on the first call and keeps the first that works."""

    def __init__(self, method: HVPMethod | str = HVPMethod.AUTO) -> None:
        self.method = HVPMethod(method) if not isinstance(method, HVPMethod) else method
        self.resolved: HVPMethod | None = None if self.method is HVPMethod.AUTO else self.method

    def __call__(self, model: torch.nn.Module, params: Sequence[torch.Tensor], closure: LossClosure,
                 vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with hvp_context(model):
            if self.resolved is not None:
                return _STRATEGIES[self.resolved](model, params, closure, vectors)
            failures = []
            for method in _AUTO_ORDER:
                try:
                    product = _STRATEGIES[method](model, params, closure, vectors)
                except LossNotFoundError:
                    raise
                except Exception as error:  # noqa: BLE001 - any failure means "try the next strategy"
                    failures.append(f"{method.value}: {type(error).__name__}: {error}")
                    logger.info("HVP strategy %s unavailable for this model: %s", method.value, error)
                    continue
                self.resolved = method
                logger.info("HVP strategy chosen by 'auto': %s", method.value)
                return product
        raise RuntimeError("No Hessian-vector product strategy works for this model:\n" + "\n".join(failures))
