"""Warm-started refreshes against a cold, complete Lanczos run and the dense Hessian, and the ``auto``
strategy choice when some strategies cannot run."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.function import once_differentiable

from ds_dho2 import DHO2
from ds_dho2.config import HVPMethod
from ds_dho2.core.lanczos import LanczosRun
from ds_dho2.curvature.operator import hessian_operator, random_start_vector, warm_start_vector
from ds_dho2.dist.comm import LocalCommunicator
from ds_dho2.dist.layout import ShardLayout
from ds_dho2.hvp.selection import ProductInputs, StrategyChooser, open_session

K = 4


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
        generator = torch.Generator().manual_seed(3)
        self.register_buffer("x", torch.randn(64, 6, generator=generator, dtype=torch.float64))
        self.register_buffer("y", torch.randint(0, 3, (64,), generator=generator))

    def forward(self) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(self.x), self.y)


def _dense(model: _MLP) -> tuple[torch.Tensor, torch.Tensor]:
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(vector: torch.Tensor) -> torch.Tensor:
        tensors, offset = {}, 0
        for name, p in zip(names, params):
            tensors[name] = vector[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return torch.func.functional_call(model, tensors, ())

    hessian = torch.autograd.functional.hessian(loss, flat)
    values, vectors = torch.linalg.eigh(0.5 * (hessian + hessian.t()))
    order = torch.argsort(values.abs(), descending=True)[:K]
    return values[order], vectors[:, order].t()


def _principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(a.double() @ b.double().t())


def test_warm_started_refresh_matches_cold_lanczos_and_dense_hessian() -> None:
    """Eigenvectors at one point seed a refresh at a nearby point: the warm run stops early (fewer
    products than the cold one) and its top-k eigenvalues are within 5% of both references."""
    model = _MLP()
    params = list(model.parameters())
    layout, comm = ShardLayout.unsharded(params), LocalCommunicator()

    def refresh(start: torch.Tensor, order: int, tolerance: float | None) -> LanczosRun:
        inputs = ProductInputs(model=model, params=params, replay=model.forward)
        session = open_session(HVPMethod.REVERSE, inputs)
        run = LanczosRun.start(start, order, comm, rank=K, tolerance=tolerance, eig_floor=1e-4)
        return run.run(hessian_operator(session, layout, comm), comm)

    cold_before = refresh(random_start_vector(layout, 0, torch.float64, "cpu"), 40, None)
    previous = cold_before.lift(cold_before.selection(K, 1e-4).coefficients)
    with torch.no_grad():  # move to a nearby point, as a few training steps would
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    dense_values, dense_vectors = _dense(model)
    warm = refresh(warm_start_vector(previous, random_start_vector(layout, 1, torch.float64, "cpu"), 0.1, comm),
                   2 * K + 8, 0.05)
    cold = refresh(random_start_vector(layout, 2, torch.float64, "cpu"), 40, None)
    warm_pairs, cold_pairs = warm.selection(K, 1e-4), cold.selection(K, 1e-4)
    warm_vectors = warm.lift(warm_pairs.coefficients)
    assert "converged" in warm.stop_reason and warm.iterations < cold.iterations
    for reference in (dense_values, cold_pairs.values):
        relative = ((warm_pairs.values - reference).abs() / reference.abs()).max()
        assert relative < 0.05, (warm_pairs.values, reference)
    cosines = _principal_cosines(warm_vectors, dense_vectors)
    print("principal cosines warm vs dense:", [round(float(c), 4) for c in cosines],
          "products:", warm.iterations, "vs cold", cold.iterations)
    assert cosines.min() > 0.9


def test_optimizer_refreshes_warm_start_and_report_rotation() -> None:
    model = _MLP()
    opt = DHO2(model.parameters(), lr=1e-2, rank=K, refresh_interval=3, warmup_steps=1, hvp="reverse",
               lanczos_dtype="float64").attach(model)
    warm = []
    for _ in range(10):
        opt.zero_grad()
        model().backward()
        opt.step()
        warm.append(opt.curvature_stats().get("warm_start"))
    stats = opt.curvature_stats()
    assert warm[0] is False and warm[-1] is True  # the first refresh is cold, later ones warm
    assert 0.0 <= stats["subspace_rotation"] <= 1.0
    assert stats["lanczos_iterations"] <= 2 * K


class _NoSecondOrder(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again and which has no forward-mode rule: what a
    fused kernel without double backward / forward AD looks like to the HVP strategies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _FusedModel(_MLP):
    def forward(self) -> torch.Tensor:
        hidden = _NoSecondOrder.apply(self.net[0](self.x))
        return torch.nn.functional.cross_entropy(self.net[2](hidden), self.y)


def test_auto_falls_back_to_finite_differences_when_second_order_autograd_is_missing() -> None:
    model = _FusedModel()
    params = list(model.parameters())
    chooser = StrategyChooser(HVPMethod.AUTO)
    session = chooser.open(ProductInputs(model=model, params=params, replay=model.forward,
                                         full_replay=model.forward), expected_products=8)
    product = session([torch.ones_like(p) for p in params])
    session.close()
    report = chooser.report["candidates"]
    assert chooser.resolved is HVPMethod.FINITE_DIFFERENCE
    # reverse ran but its products were partial (caught against finite differences); forward-over-reverse,
    # the slowest exact mode, is only measured when no other exact mode runs
    assert report["reverse"]["available"] is False and "disagrees" in report["reverse"]["error"]
    assert report["forward"] == {"available": False, "measured": False,
                                 "error": "not measured: the slowest exact mode is only a fallback"}
    assert all(torch.isfinite(t).all() for t in product)


def test_configured_strategy_that_cannot_run_names_the_fix() -> None:
    model = _MLP()
    inputs = ProductInputs(model=model, params=list(model.parameters()))  # no replay, no engine loss
    with pytest.raises(RuntimeError, match="hvp='graph' needs the training loss from engine.backward"):
        open_session(HVPMethod.GRAPH, inputs)
    with pytest.raises(RuntimeError, match="replays the captured batch, but the model output carries no loss"):
        open_session(HVPMethod.REVERSE, inputs)

