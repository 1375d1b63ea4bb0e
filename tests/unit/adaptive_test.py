"""A rank that follows the spectrum, a curvature that backs off when it does not pay, and a heavy-ball base
that stays stable: rank='auto', curvature.back_off, the boost cap and the divergence guard."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch

from ds_dho2 import DHO2
from ds_dho2.update.base import STABILITY_MARGIN


class PlantedOutliers(torch.nn.Module):
    """``0.5 x^T A x`` with ``count`` outlier eigenvalues (100 .. 10) over a bulk in [0, 1)."""

    def __init__(self, count: int, size: int = 300, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        values = torch.cat([torch.logspace(2, 1, count, dtype=torch.float64),
                            torch.rand(size - count, generator=generator, dtype=torch.float64)])
        self.register_buffer("A", q @ torch.diag(values) @ q.t())
        self.x = torch.nn.Parameter(torch.randn(size, generator=generator, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.x @ self.A @ self.x


AUTO = dict(lr=1e-3, rank="auto", max_rank=32, warmup_steps=1, refresh_interval=5, hvp="reverse")


def _steps(model: torch.nn.Module, opt: DHO2, steps: int) -> list[int]:
    ranks = []
    for _ in range(steps):
        opt.zero_grad()
        model().backward()
        opt.step()
        ranks.append(opt.tracker.rank)
    return ranks


@pytest.mark.parametrize("count", [2, 10, 20])
def test_auto_rank_finds_the_planted_outliers(count: int) -> None:
    model = PlantedOutliers(count)
    opt = DHO2(model.parameters(), **AUTO).attach(model)
    ranks = _steps(model, opt, 12)
    assert ranks[-1] == count and opt.local_eigenvectors.shape[0] == count
    assert opt.curvature_stats()["outliers"] == count
    torch.testing.assert_close(opt.eigenvalues, torch.logspace(2, 1, count, dtype=torch.float64), rtol=1e-3, atol=0)


def test_auto_rank_grows_when_the_outliers_reach_the_edge_of_what_a_refresh_resolved() -> None:
    model = PlantedOutliers(20)
    opt = DHO2(model.parameters(), **{**AUTO, "max_rank": 24, "lanczos_order": 48}).attach(model)
    opt.tracker.state.order_in_use = 8  # as if the last refresh had found k = 2: it resolves about 4 values
    ranks = _steps(model, opt, 30)
    assert ranks[0] < 20 and ranks[-1] == 20  # the order doubled until the gap after the 20 outliers showed


def test_resume_with_a_changed_rank_is_exact() -> None:
    def run(stop: int | None) -> torch.Tensor:
        model = PlantedOutliers(10)
        opt = DHO2(model.parameters(), **AUTO).attach(model)
        for step in range(1, 17):
            if step == stop:
                saved = io.BytesIO()
                torch.save(copy.deepcopy(opt.state_dict()), saved)
                saved.seek(0)
                x = model.x.detach().clone()
                model = PlantedOutliers(10)
                model.x.data.copy_(x)
                opt = DHO2(model.parameters(), **AUTO).attach(model)
                opt.load_state_dict(torch.load(saved, weights_only=False))
                assert opt.tracker.rank == 10  # the measured k travelled with the checkpoint
            opt.zero_grad()
            model().backward()
            opt.step()
        return model.x.detach()

    assert torch.equal(run(None), run(8))


def _noisy_regression(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Linear regression with strong label noise at batch 4: the gradient noise, not the curvature, limits."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=generator)
    y = x @ torch.randn(16, generator=generator) + 3.0 * torch.randn(512, generator=generator)
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 1)
    return model, x, y


def test_back_off_when_the_curvature_does_not_pay(caplog) -> None:
    """The curvature carried little of the loss decrease: the basis is dropped, that is said once, the steps
    then equal AdamW's from the same state, and no products run until the wake refresh."""
    model, x, y = _noisy_regression()
    opt = DHO2(model.parameters(), lr=1e-2, rank=2, warmup_steps=5, refresh_interval=5,
               curvature={"payoff_share": 0.9}).attach(
        model, loss_fn=lambda output, args, kwargs: torch.nn.functional.mse_loss(output.squeeze(-1), y_batch[0]))
    generator = torch.Generator().manual_seed(1)
    y_batch = [None]
    products: list[int] = []
    advance = opt.tracker.advance

    def counted(step, inputs):
        before = opt.tracker.state.last_products_step
        result = advance(step, inputs)
        if opt.tracker.state.last_products_step != before:
            products.append(step)
        return result

    opt.tracker.advance = counted
    with caplog.at_level(logging.INFO, logger="ds_dho2"):
        for _ in range(12):
            index = torch.randint(0, 512, (4,), generator=generator)
            y_batch[0] = y[index]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[index]).squeeze(-1), y[index]).backward()
            opt.step()
    assert products == [5]  # the refresh due at step 10 backed off instead of running
    assert opt.eigenvalues is None and opt.tracker.state.dormant
    assert opt.tracker.state.next_refresh == 10 + 4 * opt.config.max_refresh_interval
    assert caplog.text.count("DHO2 backs off its curvature at step 10") == 1
    # from here each step is AdamW's, moments included
    reference = copy.deepcopy(model)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    for p, q in zip(model.parameters(), reference.parameters()):
        adamw.state[q] = {"step": torch.tensor(float(opt.base.state.applied_steps)),
                          "exp_avg": opt.base.state.exp_avg[_slice(model, p)].view_as(p).clone(),
                          "exp_avg_sq": opt.base.state.exp_avg_sq[_slice(model, p)].view_as(p).clone()}
    for _ in range(5):
        index = torch.randint(0, 512, (4,), generator=generator)
        for net, optimizer in ((model, opt), (reference, adamw)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(x[index]).squeeze(-1), y[index]).backward()
            optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _slice(model: torch.nn.Module, param: torch.Tensor) -> slice:
    offset = 0
    for p in model.parameters():
        if p is param:
            return slice(offset, offset + p.numel())
        offset += p.numel()
    raise KeyError


def test_heavy_ball_boost_never_leaves_the_stable_range_of_the_sharpest_curvature_seen() -> None:
    """With eigenvalues 50 and 10 (lambda_max / lambda_min = 5) the boost would be lr_clip = 3; at lr 0.02 a
    boosted complement meeting the sharpest measured curvature (50) would run at 3 * 0.02 * 50 = 3, past half
    heavy-ball's stability limit 2 (1 + 0.9) = 3.8: the cap STABILITY_MARGIN * 3.8 / (0.02 * 50) = 1.9 binds.
    A later basis that measures a flatter surface (5 and 1) does not lift the cap: the run has shown 50."""
    from ds_dho2.core.hybrid import Basis

    param = torch.nn.Parameter(torch.zeros(4))
    opt = DHO2([param], lr=0.02, base="heavyball", rank=2)
    sharp = Basis(values=torch.tensor([50.0, 10.0], dtype=torch.float64), vectors=torch.eye(2, 4), version=1)
    flat = Basis(values=torch.tensor([5.0, 1.0], dtype=torch.float64), vectors=torch.eye(2, 4), version=2)
    opt._prepare()
    group = opt.param_groups[0]
    assert float(opt.base.scale(sharp, group)) == pytest.approx(STABILITY_MARGIN * 2 * 1.9 / (0.02 * 50))
    assert float(opt.base.scale(flat, group)) == pytest.approx(1.9)  # 5 / 1 asks for 3; 50 was seen
    group["lr"] = 0.2  # lr * 50 = 10 is past the limit already: no boost at all
    assert float(opt.base.scale(flat, group)) == pytest.approx(1.0)
    group["lr"] = 0.001  # small lr: the cap does not bind, lr_clip does
    assert float(opt.base.scale(flat, group)) == pytest.approx(3.0)
    assert opt.base.shrink_boost() == 0.5  # the guard's answer: half the boost beyond 1
    assert float(opt.base.scale(flat, group)) == pytest.approx(2.0)
    fresh = DHO2([torch.nn.Parameter(torch.zeros(4))], lr=0.001, base="heavyball", rank=2)
    fresh._prepare()
    fresh.load_state_dict(opt.state_dict())  # the sharpest curvature seen is part of the saved state
    assert float(fresh.base.state.sharpest) == 50.0 and fresh.base.state.boost == 0.5


class Sharpening(torch.nn.Module):
    """A quadratic whose curvature jumps 400-fold at a given step (the loss landscape sharpens)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.nn.Parameter(torch.randn(20, generator=generator, dtype=torch.float64))
        self.values = torch.linspace(5.0, 0.5, 20, dtype=torch.float64)
        self.scale = 1.0

    def forward(self) -> torch.Tensor:
        return 0.5 * (self.scale * self.values * self.x.square()).sum()


def test_divergence_guard_drops_the_basis_and_cuts_the_boost_once(caplog) -> None:
    """Without a rollback (``divergence_rollback`` off) the guard drops the basis, halves the boost and
    refreshes early, on the sharpened surface."""
    model = Sharpening()
    opt = DHO2(model.parameters(), lr=0.05, base="heavyball", rank=2, warmup_steps=2, refresh_interval=50,
               hvp="reverse", max_nonfinite_steps=5, curvature={"back_off": False},
               divergence_rollback=False).attach(model)
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        for step in range(1, 31):
            if step == 8:
                model.scale = 400.0
            opt.zero_grad()
            model().backward()
            opt.step()
            if step == 10:
                assert opt.eigenvalues is None or opt.curvature_stats()["refresh_step"] == 11
    stats = opt.curvature_stats()
    assert stats["divergence_guard_events"] >= 1 and opt.base.state.boost == 0.5 ** stats["divergence_guard_events"]
    assert caplog.text.count("DHO2 dropped its curvature basis and refreshes early") == 1
    assert stats["refresh_step"] > 10  # refreshed early on the sharpened surface
    assert all(torch.isfinite(p).all() for p in model.parameters())


class BoostTrap(torch.nn.Module):
    """A quadratic with curvatures 10, 2 and then 1 (18 coordinates); at ``sharpen_at`` the 18 flat ones
    become 25: plain heavy-ball at lr 0.09 still trains (0.09 * 25 = 2.25 < 2 (1 + 0.9)), but the lr boosted
    for the first basis (10 / 2, capped at 0.5 * 3.8 / (0.09 * 10) = 2.11) meets them at 0.19 * 25 = 4.75
    and diverges."""

    def __init__(self, sharpen_at: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.nn.Parameter(torch.randn(20, generator=generator, dtype=torch.float64))
        self.values = torch.tensor([10.0, 2.0] + [1.0] * 18, dtype=torch.float64)
        self.sharpen_at, self.calls = sharpen_at, 0

    def forward(self) -> torch.Tensor:
        values = self.values.clone()
        if self.calls >= self.sharpen_at:
            values[2:] = 25.0
        return 0.5 * (values * self.x.square()).sum()


def test_divergence_rollback_puts_back_the_install_point_and_the_run_trains_on(caplog) -> None:
    model = BoostTrap(sharpen_at=30)
    opt = DHO2(model.parameters(), lr=0.09, base="heavyball", rank=2, warmup_steps=2, refresh_interval=20,
               hvp="reverse", max_nonfinite_steps=5, curvature={"back_off": False}).attach(model)
    kept, installed, losses, rolled_back_at = None, None, [], None
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        for step in range(1, 151):
            before = (model.x.detach().clone(), None if step == 1 else opt.base.state.momentum_buffer.clone())
            opt.zero_grad()
            loss = model()
            model.calls += 1
            loss.backward()
            opt.step()
            basis = opt.tracker.basis
            if basis is not None and basis.version != installed:  # a basis was installed in this step
                kept, installed = before, basis.version
            losses.append(float(loss.detach()))
            if rolled_back_at is None and opt.curvature_stats().get("rollbacks") == 1:
                # the guard's read saw the rise: parameters and momentum are those of the install point
                rolled_back_at = step
                torch.testing.assert_close(model.x.detach(), kept[0], rtol=0, atol=0)
                torch.testing.assert_close(opt.base.state.momentum_buffer, kept[1], rtol=0, atol=0)
                assert opt.eigenvalues is None
    stats = opt.curvature_stats()
    assert stats["rollbacks"] == 1 and stats["divergence_guard_events"] == 1 and opt.base.state.boost == 0.5
    assert max(losses[:rolled_back_at]) > 10 * losses[0]  # it did diverge before the rollback
    assert rolled_back_at > 30 and losses[-1] < 1e-2 * losses[0]  # and trained on, as heavy-ball does there
    assert caplog.text.count("parameters and momentum put back to step") == 1
    assert stats["refresh_step"] >= rolled_back_at + 20  # no refresh on the surface the failed basis left


def test_divergence_guard_sees_a_steady_climb_the_running_mean_follows() -> None:
    """||g||^2 growing 4x a step: against the running mean (weight 0.1) each step is only ~31x, below the
    threshold of 100; against the mean at the last read it is far above."""
    from ds_dho2.update.guard import NonFiniteGuard

    guard = NonFiniteGuard(limit=5, divergence_growth=100.0)
    guard.materialize(torch.device("cpu"))
    keep = torch.ones(())
    flagged = []
    for step in range(1, 21):
        grad_sq = torch.tensor(1.0 if step <= 10 else 4.0 ** (step - 10), dtype=torch.float64)
        guard.record(keep, grad_sq, watch=True)
        flagged.append(guard.check(step))
    assert flagged[:10] == [False] * 10 and flagged[14] is True  # the read at step 15
