"""Problems DHO2 reports at the start, in one line naming the fix, instead of at the first refresh."""

from __future__ import annotations

import logging

import pytest
import torch

from ds_dho2 import DHO2
from ds_dho2.hvp.capture import LossNotFoundError


def _logits_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_model_without_loss_fails_at_the_first_step_not_the_first_refresh() -> None:
    model = _logits_model()
    opt = DHO2(model.parameters(), lr=1e-2, warmup_steps=1000).attach(model)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    message = ("DHO2 cannot find a scalar loss in the model output: return the loss from forward (a 0-dim tensor, "
               ".loss or ['loss']), or call attach(model, loss_fn=lambda output, args, kwargs: ...).")
    with pytest.raises(LossNotFoundError) as error:
        opt.step()
    assert str(error.value) == message


def test_loss_fn_gives_the_route_to_the_loss(caplog) -> None:
    """A loss_fn that closes over the labels (a Sequential never sees them) cannot follow the strided batch
    fraction: the products fall back to the whole micro-batch, once, with a warning."""
    model = _logits_model()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = DHO2(model.parameters(), lr=1e-2, rank=2, warmup_steps=2, refresh_interval=2,
               curvature={"back_off": False}, admm={"enabled": True, "window": 4}).attach(
        model, loss_fn=lambda output, args, kwargs: torch.nn.functional.cross_entropy(output, y))
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert opt.eigenvalues is not None and opt.curvature_stats()["refresh_count"] == 2
    assert caplog.text.count("using the whole micro-batch") == 1
    assert "cannot re-evaluate the loss" not in caplog.text  # the ADMM check follows the products' fallback


def test_rank_larger_than_the_parameter_count_is_clamped_with_a_warning(caplog) -> None:
    param = torch.nn.Parameter(torch.zeros(5))
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        opt = DHO2([param], rank=8)
    assert opt.config.rank == 5 and opt.config.lanczos_order == 5
    assert "DHO2 rank=8 exceeds the 5 trainable parameters; using rank=5." in caplog.text


def test_unattached_optimizer_warns_at_the_first_step(caplog) -> None:
    model = _logits_model()
    opt = DHO2(model.parameters(), lr=1e-2)
    torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        opt.step()
    assert ("DHO2 has no model to take curvature from: call optimizer.attach(model) and run a training forward "
            "pass first. Until then DHO2 behaves as its base optimizer.") in caplog.text
