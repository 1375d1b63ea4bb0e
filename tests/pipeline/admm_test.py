"""ADMM coupling: the window-end rule and the dual-augmented gradient against hand computations,
the overshoot safeguard, and sharded (W=2 DeepSpeed ZeRO-2) equality with the unsharded optimizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ds_dho2 import DHO2
from ds_dho2.dist import LocalCommunicator
from tests.helpers.distributed import run_ranks


class Quadratic(torch.nn.Module):
    """0.5 x^T A x - b^T x with an ill-conditioned A; forward returns the scalar loss."""

    def __init__(self, size: int = 12, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        spectrum = torch.logspace(0, 2, size, dtype=torch.float64)
        self.register_buffer("A", basis @ torch.diag(spectrum) @ basis.t())
        self.register_buffer("b", torch.randn(size, generator=generator, dtype=torch.float64) * 3)
        self.x = torch.nn.Parameter(torch.full((size,), 0.1, dtype=torch.float64))

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        return self.A @ x - self.b

    def forward(self) -> torch.Tensor:
        return 0.5 * self.x @ self.A @ self.x - self.b @ self.x


def test_window_end_rule_and_dual_gradient_match_hand_computation() -> None:
    model = Quadratic()
    lr, rho, window, betas, eps = 0.05, 0.5, 3, (0.9, 0.999), 1e-8
    opt = DHO2(model.parameters(), lr=lr, betas=betas, eps=eps, curvature={"enabled": False},
               admm={"enabled": True, "rho": rho, "window": window, "max_extrapolation_ratio": 1e9,
                     "extrapolation": "jump"})
    x = model.x.detach().clone()
    dual, anchor = torch.zeros_like(x), x.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
    for step in range(1, 10):
        opt.zero_grad()
        model().backward()
        opt.step()
        grad = model.gradient(x) + dual
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * grad
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * grad * grad
        m_hat = exp_avg / (1 - betas[0] ** step)
        v_hat = exp_avg_sq / (1 - betas[1] ** step)
        x = x - lr * m_hat / (v_hat.sqrt() + eps)
        if step % window == 0:
            dual = dual + rho * (x - anchor)
            x = x + dual / rho
            anchor = x.clone()
        torch.testing.assert_close(model.x.detach(), x, rtol=1e-10, atol=1e-10, msg=f"step {step}")
    assert dual.abs().max() > 0.1, "the dual variable must matter in this test"


def test_hybrid_update_sees_dual_augmented_gradient() -> None:
    """DHO2+ADMM equals DHO2 without ADMM fed ``g + y`` and given the window-end step by hand."""
    # one fixed product route: "auto" picks by timing, and two optimizers on a loaded machine may pick two
    config = dict(lr=0.02, rank=3, lanczos_order=12, refresh_interval=4, warmup_steps=2, alpha=0.5, hvp="reverse")
    rho, window = 0.3, 4
    coupled_model, reference_model = Quadratic(), Quadratic()
    coupled = DHO2(coupled_model.parameters(), **config,
                   admm={"enabled": True, "rho": rho, "window": window, "max_extrapolation_ratio": 1e9,
                         "extrapolation": "jump"}).attach(coupled_model)
    reference = DHO2(reference_model.parameters(), **config, admm={"enabled": False}).attach(reference_model)
    dual = torch.zeros(12, dtype=torch.float64)
    anchor = reference_model.x.detach().clone()
    for step in range(1, 13):
        for model, optimizer in ((coupled_model, coupled), (reference_model, reference)):
            optimizer.zero_grad()
            model().backward()
        reference_model.x.grad += dual
        coupled.step()
        reference.step()
        if step % window == 0:
            with torch.no_grad():
                dual += rho * (reference_model.x - anchor)
                reference_model.x += dual / rho
                anchor = reference_model.x.detach().clone()
        torch.testing.assert_close(coupled_model.x, reference_model.x, rtol=1e-9, atol=1e-9, msg=f"step {step}")
    assert coupled.eigenvalues is not None


def _coupling(x: torch.Tensor, dual: torch.Tensor, anchor: torch.Tensor, **admm: float) -> tuple:
    """DHO2's ADMM coupling (jump mode) on a plain parameter ``x``, with its dual and anchor given."""
    from ds_dho2.config import DHO2Config
    from ds_dho2.dist.flat import SeparateParameters
    from ds_dho2.dist.layout import ShardLayout
    from ds_dho2.update.admm import ADMMCoupling

    param = torch.nn.Parameter(x)
    coupling = ADMMCoupling(DHO2Config(admm={"enabled": True, "extrapolation": "jump", **admm}))
    coupling.state.dual, coupling.state.anchor = dual, anchor
    return coupling, param, SeparateParameters(ShardLayout.unsharded([param]))


def test_safeguard_caps_extrapolation_with_global_norm() -> None:
    dual, anchor = torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    coupling, x, flat = _coupling(torch.ones(10, dtype=torch.float64), dual, anchor, rho=1e-3,
                                  max_extrapolation_ratio=0.05)
    coupling.window_end(flat, LocalCommunicator(), None)
    # Uncapped: y/rho = x - z = 1 everywhere, ||y/rho|| = ||x||; the cap allows 0.05 ||x||.
    assert coupling.stats["admm_safeguard_scale"] == pytest.approx(0.05)
    assert coupling.stats["admm_extrapolation_norm"] == pytest.approx(0.05 * math.sqrt(10))
    torch.testing.assert_close(x.detach(), torch.full((10,), 1.05, dtype=torch.float64))
    torch.testing.assert_close(coupling.state.anchor, x.detach())
    torch.testing.assert_close(coupling.state.dual / 1e-3, torch.full((10,), 0.05, dtype=torch.float64))


def test_non_finite_extrapolation_is_skipped() -> None:
    dual = torch.tensor([float("inf"), 0.0, 0.0, 0.0], dtype=torch.float64)
    coupling, x, flat = _coupling(torch.ones(4, dtype=torch.float64), dual, torch.zeros(4, dtype=torch.float64),
                                  rho=1.0, max_extrapolation_ratio=0.1)
    coupling.window_end(flat, LocalCommunicator(), None)
    assert coupling.stats["admm_accepted"] == 0.0
    assert torch.equal(x.detach(), torch.ones(4, dtype=torch.float64))
    assert torch.equal(coupling.state.dual, torch.zeros(4, dtype=torch.float64))


def _train(ratio: float, steps: int = 200) -> tuple[list[float], DHO2]:
    model = Quadratic(size=20)
    opt = DHO2(model.parameters(), lr=0.05, rank=4, refresh_interval=10, warmup_steps=5,
               admm={"enabled": True, "window": 5, "max_extrapolation_ratio": ratio, "extrapolation": "jump"}
               ).attach(model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def test_safeguard_triggers_on_constructed_overshoot_and_keeps_loss_finite() -> None:
    """With the published rho the accumulated dual extrapolates by every past window's displacement; on
    this quadratic that overshoots and the loss climbs. The cap keeps it near the optimum."""
    unguarded, _ = _train(ratio=1e9)
    guarded, opt = _train(ratio=0.05)
    assert unguarded[-1] > unguarded[50] + 100, "the constructed problem must overshoot without the safeguard"
    assert all(math.isfinite(v) for v in guarded)
    assert guarded[-1] < unguarded[-1] - 1000
    assert opt.curvature_stats()["admm_safeguard_scale"] < 1.0


def test_spread_extrapolation_matches_hand_computation() -> None:
    """``spread``: at a window end x does not move; the next window adds e/window after each step and the
    anchor is x + e, so the dual sees only the optimizer's own displacement."""
    model = Quadratic()
    lr, rho, window, betas, eps = 0.05, 0.5, 3, (0.9, 0.999), 1e-8
    opt = DHO2(model.parameters(), lr=lr, betas=betas, eps=eps, curvature={"enabled": False},
               admm={"enabled": True, "rho": rho, "window": window, "max_extrapolation_ratio": 1e9,
                     "extrapolation": "spread"})
    x = model.x.detach().clone()
    dual, anchor, pending = torch.zeros_like(x), x.clone(), torch.zeros_like(x)
    exp_avg, exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
    for step in range(1, 13):
        opt.zero_grad()
        model().backward()
        opt.step()
        grad = model.gradient(x) + dual
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * grad
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * grad * grad
        x = x - lr * (exp_avg / (1 - betas[0] ** step)) / ((exp_avg_sq / (1 - betas[1] ** step)).sqrt() + eps)
        x = x + pending  # zero in the first window
        if step % window == 0:
            dual = dual + rho * (x - anchor)
            extrapolation = dual / rho
            anchor = x + extrapolation
            pending = extrapolation / window
        torch.testing.assert_close(model.x.detach(), x, rtol=1e-10, atol=1e-10, msg=f"step {step}")
    assert pending.abs().max() > 1e-3, "the spread part must matter in this test"


def _loss_changes(extrapolation: str, ratio: float, steps: int = 120) -> tuple[list[float], list[float], dict]:
    """Loss after minus loss before each step, split into window-end steps and ordinary steps."""
    model = Quadratic(size=20)
    window = 5
    opt = DHO2(model.parameters(), lr=0.05, curvature={"enabled": False},
               admm={"enabled": True, "window": window, "max_extrapolation_ratio": ratio,
                     "extrapolation": extrapolation}).attach(model)
    at_window_end, ordinary = [], []
    for step in range(1, steps + 1):
        opt.zero_grad()
        before = model()
        before.backward()
        opt.step()
        with torch.no_grad():
            change = float(model()) - float(before)
        (at_window_end if step % window == 0 else ordinary).append(change)
    return at_window_end, ordinary, opt.curvature_stats()


@pytest.mark.parametrize("extrapolation, ratio", [("checked", 0.5), ("checked", 0.05), ("spread", 0.05)])
def test_no_spike_at_window_ends_where_a_blind_jump_overshoots(extrapolation: str, ratio: float) -> None:
    """On a quadratic where the literal jump overshoots, the loss change across a window-end step may not
    exceed the worst change across an ordinary step (+1e-6). ``spread`` removes the jump but not the
    accumulated drift (with a loose cap, 0.5, its drift diverges as the jump does; see the README), so it
    is held to this at the default cap; ``checked`` at both."""
    jump, ordinary, _ = _loss_changes("jump", ratio)
    assert max(jump) > 0.1 + max(0.0, max(ordinary)), "the constructed problem must make the blind jump overshoot"
    at_window_end, ordinary, stats = _loss_changes(extrapolation, ratio)
    tolerance = max(0.0, max(ordinary)) + 1e-6  # no worse than the worst ordinary step
    assert max(at_window_end) <= tolerance, (extrapolation, max(at_window_end), tolerance)
    if extrapolation == "checked":
        assert 0.0 <= stats["admm_acceptance_rate"] < 1.0  # some jumps were rejected
    assert stats["admm_extrapolation_norm"] >= 0.0


def test_admm_state_round_trips_through_state_dict() -> None:
    model = Quadratic()
    opt = DHO2(model.parameters(), lr=0.05, curvature={"enabled": False}, admm={"enabled": True, "window": 3})
    for _ in range(4):
        opt.zero_grad()
        model().backward()
        opt.step()
    clone_model = Quadratic()
    clone_model.load_state_dict(model.state_dict())
    clone = DHO2(clone_model.parameters(), lr=0.05, curvature={"enabled": False}, admm={"enabled": True, "window": 3})
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save + torch.load would
    for _ in range(5):
        for m, o in ((model, opt), (clone_model, clone)):
            o.zero_grad()
            m().backward()
            o.step()
    assert torch.equal(model.x, clone_model.x)


# ---------------------------------------------------------------- sharded state equals unsharded (W=2)
#: hvp pinned: under DeepSpeed "auto" may pick the products on the training graph (the whole micro-batch)
#: where the single process replays a quarter of it, and the trajectories would differ by design
ADMM_PARAMS = {"lr": 0.01, "rank": 3, "lanczos_order": 12, "refresh_interval": 3, "warmup_steps": 2, "hvp": "reverse",
               "admm": {"enabled": True, "rho": 0.2, "window": 2, "max_extrapolation_ratio": 0.05}}


class _Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(x), y)


def _batches(steps: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 10, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(steps)]


def _admm_params(extrapolation: str) -> dict:
    params = copy.deepcopy(ADMM_PARAMS)
    params["admm"]["extrapolation"] = extrapolation
    return params


def _zero2_admm_worker(rank: int, world_size: int, steps: int, batch: int, extrapolation: str) -> dict:
    import deepspeed

    import ds_dho2  # noqa: F401 - registers DHO2

    model = _Classifier()
    config = {"train_micro_batch_size_per_gpu": batch // world_size,
              "optimizer": {"type": "DHO2", "params": _admm_params(extrapolation)},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    per_rank = batch // world_size
    for x, y in _batches(steps, batch):
        loss = engine(x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank])
        engine.backward(loss)
        engine.step()
    stats = engine.basic_optimizer.curvature_stats()
    return {"params": [p.detach().clone() for p in model.parameters()], "scale": stats["admm_safeguard_scale"],
            "acceptance": stats["admm_acceptance_rate"],
            "dual_numel": engine.basic_optimizer.admm.state.dual.numel()}


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("extrapolation", ["jump", "spread", "checked"])
def test_sharded_admm_equals_unsharded(extrapolation: str) -> None:
    steps, batch = 9, 16
    model = _Classifier()
    opt = DHO2(model.parameters(), **_admm_params(extrapolation)).attach(model)
    for x, y in _batches(steps, batch):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    results = run_ranks(_zero2_admm_worker, 2, steps, batch, extrapolation)
    total = sum(p.numel() for p in model.parameters())
    assert sum(r["dual_numel"] for r in results) in (total, total + 1, total + 2, total + 3)
    assert all(r["dual_numel"] < total for r in results), "each rank keeps the dual only for its partition"
    for result in results:
        # spread: x - z subtracts the applied share from nearly equal float32 numbers (z = x + e), so the
        # ZeRO partition's different summation order shows up at ~1e-4 relative in the cap's scale
        rel = 1e-3 if extrapolation == "spread" else 1e-5
        assert result["scale"] == pytest.approx(opt.curvature_stats()["admm_safeguard_scale"], rel=rel)
        assert result["acceptance"] == opt.curvature_stats()["admm_acceptance_rate"]
        for sharded, single in zip(result["params"], model.parameters()):
            torch.testing.assert_close(sharded, single.detach(), rtol=1e-5, atol=1e-6)
