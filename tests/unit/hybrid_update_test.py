"""The hybrid step against a hand-written reference (docs/design.md, "The step"), AdamW equivalence before the first
refresh, and checkpoint round trips."""

from __future__ import annotations

import io

import pytest
import torch

from ds_dho2 import DHO2

# newton_max_ratio so large that the trust region never triggers: checks the bare formula of docs/design.md, "The step".
EXACT_FORMULA = 1e30
#: an exact, complete Lanczos run: float64 basis, exact products, no early convergence stop
EXACT_LANCZOS = {"lanczos_dtype": "float64", "hvp": "reverse", "curvature": {"tolerance": 1e-12}}
P = 20
EIGENVALUES = torch.tensor([50.0, 20.0, 8.0] + torch.linspace(2.0, 0.1, P - 3).tolist(), dtype=torch.float64)


class Quadratic(torch.nn.Module):
    """``0.5 x^T A x - b^T x`` with ``A = Q diag(lam) Q^T``; forward returns the scalar loss."""

    def __init__(self, eigenvalues: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        n = eigenvalues.numel()
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        self.register_buffer("A", q @ torch.diag(eigenvalues) @ q.t())
        self.register_buffer("b", torch.randn(n, generator=generator, dtype=torch.float64))
        self.x = torch.nn.Parameter(torch.randn(n, generator=generator, dtype=torch.float64))
        self.eigenvalues, self.eigenvectors = eigenvalues.clone(), q.t().clone()  # rows are eigenvectors

    def forward(self) -> torch.Tensor:
        return 0.5 * self.x @ self.A @ self.x - self.b @ self.x


def _reference_steps(model: Quadratic, *, steps: int, rank: int, base: str, lr_at, reference_lr: float,
                     betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum=0.9, alpha=0.1,
                     newton_momentum=0.9, lr_clip=None) -> torch.Tensor:
    """docs/design.md, "The step", written out directly, with the exact top-``rank`` eigenpairs (refresh at step 1)."""
    order = torch.argsort(model.eigenvalues.abs(), descending=True)[:rank]
    lam, V = model.eigenvalues[order], model.eigenvectors[order]
    lr_clip = (1.0 if base == "adamw" else 3.0) if lr_clip is None else lr_clip
    s = min(max(float(lam.abs().max() / lam.abs().min()), 1.0), lr_clip)
    x = model.x.detach().clone()
    A, b = model.A, model.b
    m, v, buf, u = torch.zeros(P, dtype=x.dtype), torch.zeros(P, dtype=x.dtype), torch.zeros(P, dtype=x.dtype), \
        torch.zeros(rank, dtype=x.dtype)
    beta1, beta2 = betas
    for t in range(1, steps + 1):
        lr = lr_at(t)
        g = A @ x - b
        c = V @ g
        g2 = g - V.t() @ c
        if base == "adamw":
            u = newton_momentum * u + (1 - newton_momentum) * c
            m = beta1 * m + (1 - beta1) * g2
            v = beta2 * v + (1 - beta2) * g2 * g2
            d = -lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        else:
            u = newton_momentum * u + c
            buf = momentum * buf + g2
            d = -lr * buf
        n = V.t() @ (u / lam.abs())
        d = d - V.t() @ (V @ d)
        d = s * d
        x = x * (1 - lr * weight_decay)
        x = x + d - alpha * (lr / reference_lr) * n
    return x


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, scheduler=None) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("base, weight_decay, scheduled", [
    ("adamw", 0.0, False), ("adamw", 0.1, False), ("heavyball", 0.0, False), ("heavyball", 0.05, False),
    ("adamw", 0.1, True), ("heavyball", 0.0, True),
])
def test_three_hybrid_steps_match_reference(base, weight_decay, scheduled):
    """The formula of docs/design.md, "The step", exactly; the Newton trust region (a safeguard outside it) is disabled."""
    model = Quadratic(EIGENVALUES)
    lr = 0.01
    opt = DHO2(model.parameters(), lr=lr, weight_decay=weight_decay, base=base, rank=3, lanczos_order=P,
               warmup_steps=1, refresh_interval=100, alpha=0.7, newton_momentum=0.8, seed=3,
               newton_max_ratio=EXACT_FORMULA, **EXACT_LANCZOS)
    opt.attach(model)
    factors = [1.0, 0.5, 0.25]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: factors[e] if e < 3 else 0.1) if scheduled \
        else None
    expected = _reference_steps(model, steps=3, rank=3, base=base, reference_lr=lr, weight_decay=weight_decay,
                                alpha=0.7, newton_momentum=0.8,
                                lr_at=(lambda t: lr * factors[t - 1]) if scheduled else (lambda t: lr))
    start = model.x.detach().clone()
    _train(model, opt, 3, scheduler)
    assert opt.eigenvalues is not None
    torch.testing.assert_close(opt.eigenvalues, EIGENVALUES[:3], rtol=1e-10, atol=1e-10)
    alignment = (opt.local_eigenvectors @ model.eigenvectors[:3].t()).abs()
    torch.testing.assert_close(alignment, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (model.x.detach() - start).abs().max() > 1e-3  # the parameters really moved
    torch.testing.assert_close(model.x.detach(), expected, rtol=0, atol=1e-8)
    stats = opt.curvature_stats()
    assert stats["refresh_count"] == 1 and stats["refresh_step"] == 1
    assert stats["eigenvalues"] == pytest.approx([50.0, 20.0, 8.0], rel=1e-10)


def test_heavyball_newton_scale_is_clipped_at_lr_clip():
    """lambda_max / lambda_min = 50 / 8 = 6.25 exceeds lr_clip=2; a wrong s would move x differently."""
    model = Quadratic(EIGENVALUES)
    opt = DHO2(model.parameters(), lr=0.01, base="heavyball", rank=3, lanczos_order=P, warmup_steps=1,
               refresh_interval=100, lr_clip=2.0, newton_max_ratio=EXACT_FORMULA, **EXACT_LANCZOS)
    opt.attach(model)
    expected = _reference_steps(model, steps=3, rank=3, base="heavyball", reference_lr=0.01, lr_at=lambda t: 0.01,
                                lr_clip=2.0)
    _train(model, opt, 3)
    torch.testing.assert_close(model.x.detach(), expected, rtol=0, atol=1e-8)


class MLP(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        generator = torch.Generator().manual_seed(seed + 100)
        self.register_buffer("inputs", torch.randn(64, 8, generator=generator))
        self.register_buffer("targets", torch.randint(0, 4, (64,), generator=generator))

    def forward(self, batch: int | None = None) -> torch.Tensor:
        inputs, targets = self.inputs, self.targets
        if batch is not None:
            inputs, targets = inputs[16 * batch: 16 * (batch + 1)], targets[16 * batch: 16 * (batch + 1)]
        return torch.nn.functional.cross_entropy(self.net(inputs), targets)


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def test_before_first_refresh_matches_torch_adamw_with_groups_and_scheduler():
    reference, model = MLP(), MLP()
    model.load_state_dict(reference.state_dict())
    lr, betas, eps = 3e-3, (0.85, 0.99), 1e-7
    adamw = torch.optim.AdamW(_decay_groups(reference, 0.05), lr=lr, betas=betas, eps=eps)
    dho2 = DHO2(_decay_groups(model, 0.05), lr=lr, betas=betas, eps=eps, rank=2, warmup_steps=25,
                refresh_interval=10, admm={"enabled": False})  # ADMM's first window end would be step 10
    dho2.attach(model)
    schedule = lambda e: min(1.0, (e + 1) / 5) * 0.95**e  # noqa: E731 - warm-up then decay
    sched_a = torch.optim.lr_scheduler.LambdaLR(adamw, schedule)
    sched_d = torch.optim.lr_scheduler.LambdaLR(dho2, schedule)
    max_diff = 0.0
    for step in range(20):
        for m, opt, sched in ((reference, adamw, sched_a), (model, dho2, sched_d)):
            opt.zero_grad()
            m(step % 4).backward()
            opt.step()
            sched.step()
        for p_ref, p in zip(reference.parameters(), model.parameters()):
            max_diff = max(max_diff, (p_ref - p).abs().max().item())
    assert dho2.eigenvalues is None
    assert dho2.param_groups[0]["lr"] == pytest.approx(adamw.param_groups[0]["lr"])
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), MLP().parameters()))
    assert moved > 1e-2
    assert max_diff < 1e-6, max_diff


def test_param_groups_differing_in_weight_decay_apply_it_per_element():
    """No-decay parameters must not shrink: with a zero gradient only weight decay acts."""
    model = MLP()
    opt = DHO2(_decay_groups(model, 0.5), lr=0.1, warmup_steps=100)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if n.endswith("weight") else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=0, atol=1e-7)


def _interleaved_opt(model: torch.nn.Module) -> DHO2:
    opt = DHO2(model.parameters(), lr=1e-2, rank=2, lanczos_order=8, refresh_interval=5, warmup_steps=3,
               alpha=0.5, lanczos_dtype="float64", seed=4,
               curvature={"mode": "interleaved", "iterations_per_step": 2, "tolerance": 1e-12, "max_interval": 5})
    return opt.attach(model)


def test_state_dict_round_trip_continues_identically_and_keeps_float64_curvature():
    model = MLP(seed=1)
    opt = _interleaved_opt(model)
    for step in range(10):
        opt.zero_grad()
        model(step % 4).backward()
        opt.step()
    # Refreshes start at steps 3 and 8 and take 4 steps each: one is installed, one is in flight.
    assert opt.eigenvalues is not None and opt.local_lanczos_basis is not None
    assert opt.local_lanczos_basis.dtype == torch.float64
    values_dtype, vectors_dtype = opt.eigenvalues.dtype, opt.local_eigenvectors.dtype
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    resumed_model = MLP(seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = _interleaved_opt(resumed_model)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.local_lanczos_basis.dtype == torch.float64
    assert torch.equal(resumed.local_lanczos_basis, opt.local_lanczos_basis)
    assert resumed.eigenvalues.dtype == values_dtype and resumed.local_eigenvectors.dtype == vectors_dtype
    assert torch.equal(resumed.eigenvalues, opt.eigenvalues)

    for step in range(10, 15):
        for m, o in ((model, opt), (resumed_model, resumed)):
            o.zero_grad()
            m(step % 4).backward()
            o.step()
    assert opt.curvature_stats()["refresh_count"] == 2 == resumed.curvature_stats()["refresh_count"]
    assert torch.equal(resumed.eigenvalues, opt.eigenvalues)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
