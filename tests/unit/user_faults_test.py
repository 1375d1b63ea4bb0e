"""What a user meets first, in plain PyTorch: parameters without a gradient stay where AdamW leaves them,
frozen layers, added parameter groups, a bad batch at a refresh, damaged checkpoints and unclear inputs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from ds_dho2 import DHO2, ConfigError


class TokenModel(torch.nn.Module):
    """An embedding of 50 tokens (batches use 0-9 only), a head, an unused layer and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 10)
        self.unused = torch.nn.Linear(8, 8)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.frozen(self.embedding(tokens)).mean(dim=1)
        return torch.nn.functional.cross_entropy(self.head(hidden), labels)


def _batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 10, (16, 4), generator=generator), torch.randint(0, 10, (16,), generator=generator))
            for _ in range(steps)]


def _train(model: TokenModel, opt: torch.optim.Optimizer, batches: list) -> None:
    for tokens, labels in batches:
        opt.zero_grad()
        model(tokens, labels).backward()
        opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_parameters_without_a_gradient_stay_where_adamw_leaves_them(weight_decay: float, caplog) -> None:
    """Absent embedding rows, an unused layer and a frozen layer, all handed to the optimizer, end
    bit-identical to torch.optim.AdamW's run, with curvature installed and refreshed meanwhile."""
    batches = _batches(30)
    model, reference = TokenModel(), TokenModel()
    opt = DHO2(model.parameters(), lr=1e-2, rank=4, refresh_interval=10, weight_decay=weight_decay).attach(model)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=weight_decay)
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        _train(model, opt, batches)
    _train(reference, adamw, batches)
    assert opt.eigenvalues is not None and opt.curvature_stats()["refresh_count"] >= 2
    assert "refresh failed" not in caplog.text  # the frozen layer is not differentiated
    assert torch.equal(model.embedding.weight[10:], reference.embedding.weight[10:])
    for name in ("unused", "frozen"):
        for mine, theirs in zip(getattr(model, name).parameters(), getattr(reference, name).parameters()):
            assert torch.equal(mine, theirs), name
    assert not torch.equal(model.embedding.weight[:10], TokenModel().embedding.weight[:10])  # the rest trained


def test_curvature_is_over_the_trainable_parameters_only() -> None:
    model = TokenModel()
    opt = DHO2(model.parameters(), lr=1e-2, rank=4, refresh_interval=5, warmup_steps=3).attach(model)
    _train(model, opt, _batches(4))
    layout = opt.flat_parameters().layout
    frozen = torch.cat([torch.full((p.numel(),), not p.requires_grad) for p in layout.params])
    assert opt.local_eigenvectors[:, frozen].abs().max() == 0  # the subspace never touches frozen weights


def test_add_param_group_joins_the_subspace_from_the_next_refresh() -> None:
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))

    class Both(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = first, second

        def forward(self) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.second(torch.tanh(self.first(x))), y)

    model = Both()
    second.requires_grad_(False)
    opt = DHO2(first.parameters(), lr=1e-2, rank=2, refresh_interval=4, warmup_steps=2, curvature={"back_off": False},
               admm={"enabled": True, "window": 3}).attach(model)
    for _ in range(5):
        opt.zero_grad()
        model().backward()
        opt.step()
    assert opt.eigenvalues is not None
    second.requires_grad_(True)
    before = [p.detach().clone() for p in second.parameters()]
    opt.add_param_group({"params": second.parameters(), "weight_decay": 0.01})
    assert opt.local_eigenvectors.shape[1] == sum(p.numel() for p in model.parameters())
    for _ in range(6):
        opt.zero_grad()
        model().backward()
        opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(second.parameters(), before))  # the added layer trains
    added = slice(sum(p.numel() for p in first.parameters()), None)
    assert opt.local_eigenvectors[:, added].abs().max() > 0  # and the refreshed subspace spans it
    with pytest.raises(ValueError, match=r"differs from the existing one in \['lr'\]"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0})
    with pytest.raises(ValueError, match="same parameter twice"):
        opt.add_param_group({"params": [first.weight]})


def test_add_param_group_under_an_engine_is_refused_with_what_to_do() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = DHO2([param])
    opt.bind_engine_backward(lambda: True)  # what a DeepSpeed engine does at initialize
    with pytest.raises(ValueError, match="cannot take new parameters after deepspeed.initialize"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)


def test_a_non_finite_batch_at_the_first_refresh_skips_it_and_changes_nothing_later(caplog, capsys) -> None:
    """The refresh due on a NaN batch is skipped with one warning (no traceback), the step is skipped, the
    next batch refreshes, and the product choice is not turned into a whole-batch fallback."""
    model = _Regression()
    opt = DHO2(model.parameters(), lr=1e-2, rank=2, refresh_interval=50, warmup_steps=3).attach(model)
    generator = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        for step in range(1, 7):
            x, y = torch.randn(16, 6, generator=generator), torch.randn(16, generator=generator)
            if step == 3:
                x[0, 0] = float("nan")
                before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            model(x, y).backward()
            opt.step()
            if step == 3:
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
                assert opt.eigenvalues is None
    assert opt.eigenvalues is not None and opt.curvature_stats()["refresh_step"] == 4
    assert not opt.tracker.chooser.whole_batch
    skipped = [r for r in caplog.records if "skipped the curvature refresh at step 3" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].levelno == logging.WARNING and skipped[0].exc_info is None
    assert "whole micro-batch" not in caplog.text and "Traceback" not in capsys.readouterr().err


def test_at_error_level_a_skipped_refresh_prints_nothing(capsys) -> None:
    library = logging.getLogger("ds_dho2")
    handler = logging.StreamHandler()
    library.addHandler(handler)
    library.setLevel(logging.ERROR)
    try:
        model = _Regression()
        opt = DHO2(model.parameters(), lr=1e-2, rank=2, refresh_interval=50, warmup_steps=1).attach(model)
        x = torch.full((4, 6), float("nan"))
        model(x, torch.zeros(4)).backward()
        opt.step()
    finally:
        library.removeHandler(handler)
        library.setLevel(logging.NOTSET)
    assert capsys.readouterr().err == ""


def _trained(**options) -> tuple[_Regression, DHO2, dict]:
    model = _Regression()
    opt = DHO2(model.parameters(), lr=1e-2, rank=2, refresh_interval=50, warmup_steps=2, hvp="reverse",
               **options).attach(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 6, generator=generator), torch.randn(16, generator=generator)
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    assert opt.eigenvalues is not None
    return model, opt, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("damage, reason", [
    ("nan", "non-finite eigenvalues or eigenvectors"),
    ("scaled", "eigenvectors not orthonormal"),
    ("shape", "eigenvectors of shape (2, 65) for 1 eigenvalues and a partition of 65"),
])
def test_a_damaged_checkpointed_basis_is_dropped_with_a_message(damage: str, reason: str, caplog) -> None:
    model, _, saved = _trained()
    entry, replicated = saved["state"][0], saved["param_groups"][0]["dho2_replicated"]
    if damage == "nan":
        entry["dho2_curvature_eigenvectors_0"][3] = float("nan")
    elif damage == "scaled":
        entry["dho2_curvature_eigenvectors_1"].mul_(2.0)
    else:
        values = replicated["components"]["curvature"]["replicated"]["eigenvalues"]
        values.update(shape=[1], data=values["data"][:1])
    fresh = DHO2(model.parameters(), lr=1e-2, rank=2, refresh_interval=50, warmup_steps=2).attach(model)
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        fresh.load_state_dict(saved)
    assert fresh.eigenvalues is None and fresh.local_eigenvectors is None
    assert f"dropped its curvature basis: the checkpointed basis is unusable ({reason}" in caplog.text
    x, y = torch.randn(16, 6), torch.randn(16)
    fresh.zero_grad()
    model(x, y).backward()
    fresh.step()  # refreshes again (the drop brought the next refresh forward) and stays finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert fresh.eigenvalues is not None


def test_non_finite_coupling_and_momentum_state_is_reset_on_load(caplog) -> None:
    model, _, saved = _trained(admm={"enabled": True, "window": 2})
    saved["state"][0]["dho2_admm_dual"][0] = float("inf")
    momentum = saved["param_groups"][0]["dho2_replicated"]["components"]["newton"]["replicated"]["momentum"]
    momentum["data"][0] = float("nan")
    fresh = DHO2(model.parameters(), lr=1e-2, rank=2, refresh_interval=50, warmup_steps=2,
                 admm={"enabled": True, "window": 2}).attach(model)
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        fresh.load_state_dict(saved)
    assert "reset its checkpointed ADMM state" in caplog.text
    assert torch.isfinite(fresh.admm.state.dual).all() and fresh.newton.state.momentum is None
    fresh.zero_grad()
    model(torch.randn(16, 6), torch.randn(16)).backward()
    fresh.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_named_parameters_are_accepted() -> None:
    one, two = _Regression(), _Regression()
    plain = DHO2(one.parameters(), lr=1e-2, warmup_steps=100)
    named = DHO2(two.named_parameters(), lr=1e-2, warmup_steps=100)
    grouped = DHO2([{"params": list(two.named_parameters()), "weight_decay": 0.0}], lr=1e-2)
    assert len(grouped.param_groups[0]["params"]) == 4
    x, y = torch.randn(8, 6), torch.randn(8)
    for model, opt in ((one, plain), (two, named)):
        model(x, y).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), two.parameters()))


@pytest.mark.parametrize("params, error, message", [
    (lambda: torch.nn.Parameter(torch.zeros(3)), TypeError,
     "DHO2 expects an iterable of parameters (e.g. model.parameters()) or of parameter groups; got a single "
     "tensor. Pass [tensor] to optimize one tensor."),
    (lambda: [{"params": []}], ValueError,
     "DHO2 got no parameters (every group's 'params' is empty): pass model.parameters() of a model with "
     "parameters."),
    (lambda: [], ValueError, "DHO2 got an empty parameter list: pass model.parameters() of a model with parameters."),
    (lambda: [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))], TypeError,
     "DHO2 parameter 0 is complex (torch.complex64); DHO2 optimizes real parameters only. Optimize "
     "torch.view_as_real(param) or keep complex parameters in another optimizer."),
    (lambda: [3.0], TypeError, "DHO2 parameter 0 is a float, not a tensor: pass model.parameters(), "
     "model.named_parameters() or a list of tensors / parameter groups."),
])
def test_bad_parameters_are_refused_at_construction_with_what_to_pass(params, error, message) -> None:
    with pytest.raises(error) as info:
        DHO2(params())
    assert str(info.value) == message and not isinstance(info.value, ConfigError)
