"""Safeguards (docs/design.md, "The step"): Lanczos breakdown and non-finite products, non-finite curvature at a
refresh, negative curvature, non-finite gradients and refreshes with no usable eigenpair."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ds_dho2 import DHO2
from ds_dho2.core.lanczos import LanczosRun
from ds_dho2.dist import LocalCommunicator

from hybrid_update_test import EXACT_FORMULA, EXACT_LANCZOS, Quadratic, _reference_steps  # noqa: I001 - sibling test module (rootdir on path)


def _diagonal_operator(diagonal: torch.Tensor):
    return lambda v: diagonal * v


def test_lanczos_breakdown_on_low_rank_operator_recovers_nonzero_eigenvalues():
    comm = LocalCommunicator()
    diagonal = torch.zeros(30, dtype=torch.float64)
    diagonal[[2, 11, 25]] = torch.tensor([7.0, 3.0, -2.0], dtype=torch.float64)
    start = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []

    def matvec(v):
        calls.append(1)
        return diagonal * v

    run = LanczosRun.start(start, 10, comm).run(matvec, comm)
    assert run.finished and "breakdown" in run.stop_reason
    assert run.iterations <= 3 + 1
    assert len(calls) == run.iterations
    pairs = run.ritz_pairs()
    assert torch.isfinite(pairs.values).all() and torch.isfinite(pairs.local_vectors).all()
    nonzero = pairs.values[pairs.values.abs() > 1e-8]
    torch.testing.assert_close(nonzero, torch.tensor([-2.0, 3.0, 7.0], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    top = pairs.local_vectors[pairs.values.argmax()]
    assert abs(top[2].item()) == pytest.approx(1.0, abs=1e-10)


def test_lanczos_stops_on_non_finite_product_and_keeps_completed_iterations(caplog):
    comm = LocalCommunicator()
    diagonal = torch.linspace(1.0, 10.0, 30, dtype=torch.float64)
    calls = []

    def matvec(v):
        calls.append(1)
        out = diagonal * v
        if len(calls) == 4:  # the product of iteration 3 (0-based) is NaN
            out[5] = float("nan")
        return out

    start = torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="ds_dho2.core.lanczos"):
        run = LanczosRun.start(start, 10, comm).run(matvec, comm)
    assert run.finished and "non-finite" in run.stop_reason
    assert run.iterations == 3 and len(calls) == 4
    assert any("non-finite" in r.getMessage() for r in caplog.records)
    pairs = run.ritz_pairs()
    assert pairs.values.shape == (3,) and pairs.local_vectors.shape == (3, 30)
    assert torch.isfinite(pairs.values).all() and torch.isfinite(pairs.local_vectors).all()
    # The 3 Ritz values are those of an uninterrupted run's first 3 iterations.
    clean = LanczosRun.start(start, 3, comm).run(_diagonal_operator(diagonal), comm).ritz_pairs()
    torch.testing.assert_close(pairs.values, clean.values, rtol=0, atol=1e-12)
    assert float(pairs.values.max()) <= 10.0 + 1e-12 and float(pairs.values.min()) >= 1.0 - 1e-12


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("inputs", torch.randn(32, 5, generator=generator, dtype=torch.float64))
        self.register_buffer("targets", torch.randn(32, 1, generator=generator, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return self.net(self.inputs)


def test_non_finite_hvp_at_refresh_keeps_previous_curvature_and_params_finite(caplog):
    """The loss is NaN in eval mode (HVPs run in eval mode) from step 6 on: the second refresh fails."""
    model = _Regression()
    poisoned = {"on": False}

    def loss_fn(output, args, kwargs):
        loss = torch.nn.functional.mse_loss(output, model.targets)
        if poisoned["on"] and not model.training:
            return loss * float("nan")
        return loss

    opt = DHO2(model.parameters(), lr=1e-2, rank=3, lanczos_order=12, warmup_steps=2, refresh_interval=5,
               alpha=0.5)
    opt.attach(model, loss_fn=loss_fn)
    history = []
    with caplog.at_level(logging.WARNING):
        for step in range(1, 13):
            poisoned["on"] = step >= 6
            opt.zero_grad()
            loss_fn(model(), (), {}).backward()
            opt.step()
            for p in model.parameters():
                assert torch.isfinite(p).all(), step
            history.append(None if opt.eigenvalues is None else opt.eigenvalues.clone())
    first = history[1]  # installed at step 2
    assert first is not None and first.numel() == 3 and torch.isfinite(first).all()
    assert history[0] is None
    for later in history[2:]:  # the refreshes at steps 7 and 12 found only NaN products
        assert torch.equal(later, first)
    assert opt.curvature_stats()["refresh_count"] == 3
    assert any("no usable eigenpair" in r.getMessage() for r in caplog.records)
    stats = opt.curvature_stats()
    assert stats["lanczos_iterations"] == 0 and "non-finite" in stats["lanczos_stop"]


def test_negative_curvature_uses_magnitudes_and_descends():
    lam = -torch.tensor([40.0, 15.0, 6.0] + torch.linspace(1.0, 0.1, 17).tolist(), dtype=torch.float64)
    model = Quadratic(lam, seed=2)
    opt = DHO2(model.parameters(), lr=1e-4, rank=3, lanczos_order=20, warmup_steps=1, refresh_interval=100,
               alpha=1.0, newton_momentum=0.5, newton_max_ratio=EXACT_FORMULA, **EXACT_LANCZOS)
    opt.attach(model)
    expected = _reference_steps(model, steps=3, rank=3, base="adamw", lr_at=lambda t: 1e-4, reference_lr=1e-4,
                                alpha=1.0, newton_momentum=0.5)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model()
        losses.append(loss.item())
        loss.backward()
        opt.step()
    losses.append(model().item())
    torch.testing.assert_close(opt.eigenvalues, lam[:3], rtol=1e-10, atol=1e-10)
    assert torch.isfinite(model.x).all()
    torch.testing.assert_close(model.x.detach(), expected, rtol=0, atol=1e-8)
    drops = [a - b for a, b in zip(losses, losses[1:])]
    assert all(d > 1e-3 for d in drops), losses


def test_non_finite_gradient_skips_step_and_leaves_state_alone(caplog):
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    opt = DHO2(model.parameters(), lr=1e-2, weight_decay=0.1, warmup_steps=100, max_nonfinite_steps=3)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 4)
    for step in range(6):
        for m, o in ((model, opt), (reference, adamw)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        if step == 2:
            model.weight.grad[1, 2] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            with caplog.at_level(logging.WARNING):
                opt.step()
            for p, b in zip(model.parameters(), before):
                assert torch.equal(p, b)
            # the flag is read every max_nonfinite_steps steps (here: at this third step), not per step
            assert any("skipped 1 of the last 3 steps" in r.getMessage() for r in caplog.records)
            continue  # the reference never sees this step
        opt.step()
        adamw.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert opt.steps == 6 and float(opt.base.state.applied_steps) == 5  # calls vs. steps applied (bias correction)


def test_non_finite_gradient_with_a_basis_installed_moves_nothing() -> None:
    """With a curvature basis and Newton momentum in place, a skipped step must not apply the Newton step
    either (nor touch the moments)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = DHO2(model.parameters(), lr=1e-2, rank=2, warmup_steps=1, refresh_interval=100, alpha=1.0).attach(
        model, loss_fn=lambda output, args, kwargs: torch.nn.functional.cross_entropy(output, y))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.eigenvalues is not None
    state = opt.state[opt.param_groups[0]["params"][0]]
    moments = [state["exp_avg"].clone(), state["exp_avg_sq"].clone()]
    momentum = opt.newton.state.momentum.clone()
    assert momentum.abs().max() > 0
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert torch.equal(state["exp_avg"], moments[0]) and torch.equal(state["exp_avg_sq"], moments[1])
    assert torch.equal(opt.newton.state.momentum, momentum)


def test_nan_gradient_in_one_of_several_params_skips_step():
    model = torch.nn.Linear(3, 2)
    opt = DHO2(model.parameters(), lr=1e-1, warmup_steps=10)
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.tensor([0.0, float("nan")])
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


class _Linear(torch.nn.Module):
    """Loss linear in the parameters: the Hessian is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 12, dtype=torch.float64))
        self.register_buffer("c", torch.linspace(0.5, 2.0, 12, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return (self.c * self.w).sum()


@pytest.mark.parametrize("hvp", ["forward", "reverse", "finite_difference"])
def test_refresh_without_usable_eigenpair_keeps_old_curvature_and_warns(caplog, hvp):
    model = _Linear()
    opt = DHO2(model.parameters(), lr=1e-2, rank=2, lanczos_order=8, warmup_steps=1, refresh_interval=2, hvp=hvp,
               admm={"enabled": False})
    opt.attach(model)
    start = model.w.detach().clone()
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        for _ in range(4):  # refreshes at steps 1 and 3
            opt.zero_grad()
            model().backward()
            opt.step()
    assert opt.eigenvalues is None and opt.local_eigenvectors is None
    warnings = [r for r in caplog.records if "no usable eigenpair" in r.getMessage()]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert opt.curvature_stats()["refresh_count"] == 2
    # Still plain AdamW: with a constant gradient every step moves each weight by lr against sign(c).
    torch.testing.assert_close(model.w.detach(), start - 4 * 1e-2, rtol=0, atol=1e-9)
    assert math.isfinite(model().item())


def test_newton_step_is_capped_relative_to_base_step() -> None:
    """A nearly flat direction (tiny eigenvalue) must not turn u/|lambda| into a jump."""

    class NearlyFlat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
            self.register_buffer("curvature", torch.tensor([1e-6, 1e-6, 1e-6], dtype=torch.float64))

        def forward(self) -> torch.Tensor:
            # Quadratic with tiny curvature plus a linear term: the exact Newton step is huge (~1e6).
            return 0.5 * (self.curvature * self.x**2).sum() + self.x.sum()

    def run(ratio: float) -> tuple[torch.Tensor, DHO2]:
        model = NearlyFlat()
        opt = DHO2(model.parameters(), lr=1e-2, rank=2, lanczos_order=3, refresh_interval=100, warmup_steps=1,
                   alpha=1.0, newton_momentum=0.0, eig_floor=0.0, newton_max_ratio=ratio).attach(model)
        opt.zero_grad()
        model().backward()
        opt.step()
        return model.x.detach().clone(), opt

    capped, opt = run(10.0)
    uncapped, _ = run(1e12)
    assert opt.eigenvalues is not None and opt.eigenvalues.abs().max() < 1e-5
    assert opt.curvature_stats()["newton_trust_scale"] < 1e-3
    assert (capped - 1.0).abs().max() < 1.0, "capped: each direction moves at most 10x the base step's RMS move"
    assert (uncapped - 1.0).abs().max() > 1e4, "without the cap the Newton step jumps"
    assert torch.isfinite(capped).all()


def test_refresh_warning_names_eval_mode(caplog) -> None:
    model = torch.nn.Linear(3, 1)
    model.eval()  # as returned by from_pretrained
    opt = DHO2(model.parameters(), rank=1, refresh_interval=1, warmup_steps=1).attach(
        model, loss_fn=lambda output, args, kwargs: output.pow(2).mean())
    with caplog.at_level("WARNING", logger="ds_dho2.optimizer"):
        opt.zero_grad()
        model(torch.ones(2, 3)).pow(2).mean().backward()
        opt.step()
    assert opt.eigenvalues is None
    assert "call model.train()" in caplog.text


def test_gradients_that_stay_non_finite_stop_the_run_with_a_clear_error() -> None:
    """The NaN stall ends: after ``max_nonfinite_steps`` consecutive skipped steps the run stops (the flag is
    read every ``max_nonfinite_steps`` steps, so within twice that many), and the parameters stay finite."""
    from ds_dho2.optimizer import NonFiniteGradientError

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = DHO2(model.parameters(), lr=1e-2, warmup_steps=100)  # default max_nonfinite_steps=10
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError) as raised:
        for step in range(1, 41):
            opt.zero_grad()
            (model(x).sum() * float("nan")).backward()
            opt.step()
    assert step <= 20
    message = str(raised.value)
    assert "inf or NaN in" in message and "consecutive steps" in message and "max_nonfinite_steps=10" in message
    assert "Lower the learning rate" in message
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_isolated_non_finite_steps_do_not_stop_the_run() -> None:
    """A NaN every few steps (an fp16-style overflow) is skipped, never an error."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = DHO2(model.parameters(), lr=1e-2, warmup_steps=100, max_nonfinite_steps=4)
    x = torch.randn(8, 4)
    for step in range(1, 41):
        opt.zero_grad()
        (model(x).pow(2).mean() * (float("nan") if step % 3 == 0 else 1.0)).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _ScaledQuadratic(torch.nn.Module):
    """``0.5 * scale * ||A w - b||^2``: ``scale`` sharpens the surface by any factor between refreshes."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(12, generator=generator))
        self.register_buffer("a", torch.randn(20, 12, generator=generator))
        self.register_buffer("b", torch.randn(20, generator=generator))
        self.scale = 1.0

    def forward(self) -> torch.Tensor:
        return 0.5 * self.scale * (self.a @ self.w - self.b).square().mean()


@pytest.mark.parametrize("sharpen", [100.0, 2.0])
def test_eigenvalue_jump_guard_resets_momentum_and_refreshes_early(caplog, sharpen: float) -> None:
    """The collapse guard: when the top eigenvalue grows >10x within one window, the tracker logs it, does
    not carry the old subspace's Newton momentum and sets the interval back to ``refresh_interval``; a
    moderate change (2x) is left to the adaptive schedule."""
    model = _ScaledQuadratic()
    opt = DHO2(model.parameters(), lr=1e-2, rank=2, refresh_interval=4, warmup_steps=2, hvp="reverse",
               curvature={"batch_fraction": 1.0, "max_interval": 16, "back_off": False},
               divergence_growth=1e30).attach(
        model, loss_fn=lambda output, args, kwargs: output)
    curvature = None
    with caplog.at_level(logging.WARNING):
        for step in range(1, 32):  # refreshes at 2, 6, 14 (the interval doubles: 4, 8, 16), then 30
            if step == 15:
                model.scale = sharpen
            opt.zero_grad()
            model().backward()
            opt.step()
            curvature = opt.tracker.state
            if step == 14:
                assert curvature.interval == 16  # a steady quadratic: the interval has grown to its bound
                refreshes_before = curvature.refresh_count
                top_before = float(opt.eigenvalues.abs().max())
    assert curvature.refresh_count == refreshes_before + 1  # the refresh at step 30 saw the new surface
    guard = [r.getMessage() for r in caplog.records if "curvature guard" in r.getMessage()]
    if sharpen > 10:
        assert float(opt.eigenvalues.abs().max()) == pytest.approx(sharpen * top_before, rel=0.05)
        assert len(guard) == 1 and "jumped" in guard[0] and "lower lr or alpha" in guard[0]
        assert opt.stats["curvature_guard_events"] == 1
        assert curvature.interval == 4
        assert curvature.transition is None  # momentum is not carried: restarted from zero at the install
    else:
        assert not guard and "curvature_guard_events" not in opt.stats
        assert curvature.interval == 16 and curvature.transition is not None
