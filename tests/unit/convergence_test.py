"""Steps to a loss target: DHO2 vs AdamW at the same learning rate (deterministic step counts, no timing)."""

from __future__ import annotations

import pytest
import torch

from ds_dho2 import DHO2

from hybrid_update_test import Quadratic  # noqa: I001 - sibling test module (rootdir on path)

P = 50
# Condition number 1e4: eight sharp directions (1e4 .. 1e3) over a bulk in [1, 3].
ILL_CONDITIONED = torch.cat([torch.logspace(4, 3, 8), torch.linspace(3.0, 1.0, P - 8)]).double()


def _steps_to_target(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_of, target: float,
                     max_steps: int) -> int | None:
    for step in range(max_steps + 1):
        opt.zero_grad()
        loss = loss_of(model)
        if loss.item() <= target:
            return step
        loss.backward()
        opt.step()
    return None


@pytest.mark.parametrize("seed", [0, 1])
def test_ill_conditioned_quadratic_dho2_needs_fewer_steps_than_adamw(seed):
    lr = 0.1
    probe = Quadratic(ILL_CONDITIONED, seed=seed)
    assert float(probe.eigenvalues.max() / probe.eigenvalues.min()) == pytest.approx(1e4)
    x_star = torch.linalg.solve(probe.A, probe.b)
    f_star = float(-0.5 * probe.b @ x_star)
    f_0 = probe().item()
    target = f_star + 1e-2 * (f_0 - f_star)

    adamw_model = Quadratic(ILL_CONDITIONED, seed=seed)
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=lr, weight_decay=0.0)
    adamw_steps = _steps_to_target(adamw_model, adamw, lambda m: m(), target, 200)

    dho2_model = Quadratic(ILL_CONDITIONED, seed=seed)
    dho2 = DHO2(dho2_model.parameters(), lr=lr, weight_decay=0.0, rank=8, lanczos_order=24, refresh_interval=20,
                warmup_steps=5, alpha=1.0, hvp="reverse", seed=seed).attach(dho2_model)
    dho2_steps = _steps_to_target(dho2_model, dho2, lambda m: m(), target, 200)

    # Measured: AdamW 38 / 34 steps, DHO2 9 / 8 steps (seeds 0 / 1); with newton_max_ratio 3 instead of the
    # default 10 the per-direction trust region binds here and DHO2 needs 18 / 17.
    assert adamw_steps is not None and dho2_steps is not None
    assert 2 * dho2_steps < adamw_steps, (dho2_steps, adamw_steps)
    assert dho2.eigenvalues is not None
    torch.testing.assert_close(dho2.eigenvalues, ILL_CONDITIONED[:8], rtol=1e-6, atol=0)


class _DigitsMLP(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(x), y)


@pytest.fixture(scope="module")
def digits():
    from ds_dho2.data import load_digits_split

    x_train, y_train, _, _ = load_digits_split()
    return x_train, y_train


def _minibatch_steps_to_target(model, opt, x_train, y_train, target: float, seed: int, max_steps: int):
    """Train on minibatches of 64 (a seeded order shared by both optimizers); count steps until the loss on
    the whole training set is <= target."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, max_steps + 1):
        index = torch.randint(0, len(x_train), (64,), generator=generator)
        opt.zero_grad()
        model(x_train[index], y_train[index]).backward()
        opt.step()
        with torch.no_grad():
            if model(x_train, y_train).item() <= target:
                return step
    return None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_digits_mlp_dho2_needs_fewer_steps_than_adamw(digits, seed):
    """Minibatch training of an MLP on sklearn digits at lr 0.03. Measured steps to a training loss of 0.1
    (seeds 0/1/2): AdamW 69/56/56, DHO2 46/50/45 with products on the whole micro-batch of 64 (with the
    default quarter, 16 samples: 46/49/56 -- the curvature of 16 samples is too noisy to gain a step). (Full-batch at lr <= 0.1 the two are equal within a
    step: there the lr is not limited by the top curvature directions, which is what DHO2 removes from
    the AdamW step.)"""
    x_train, y_train = digits
    lr, target = 0.03, 0.1
    adamw_model = _DigitsMLP(seed)
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=lr, weight_decay=0.0)
    adamw_steps = _minibatch_steps_to_target(adamw_model, adamw, x_train, y_train, target, seed, 150)

    dho2_model = _DigitsMLP(seed)
    dho2 = DHO2(dho2_model.parameters(), lr=lr, weight_decay=0.0, rank=8, refresh_interval=10, warmup_steps=5,
                alpha=1.0, curvature={"batch_fraction": 1.0, "back_off": False}).attach(dho2_model)
    dho2_steps = _minibatch_steps_to_target(dho2_model, dho2, x_train, y_train, target, seed, 150)
    assert adamw_steps is not None and dho2_steps is not None
    assert dho2.eigenvalues is not None
    assert dho2_steps < adamw_steps, (dho2_steps, adamw_steps)
