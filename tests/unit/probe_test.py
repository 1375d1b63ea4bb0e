"""The probe (``ds_dho2.probe``) against quantities computed by hand: planted outliers, dense Hessians of a
quadratic and of a small MLP, a noise-scale estimator on gradients with known mean and covariance, the
verdict on linear regression as its batch grows, and the hooks on a plain PyTorch loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ds_dho2.probe import ProbeError, probe_training
from ds_dho2.probe import measures, report
from ds_dho2.probe.hooks import ProbeDue, StepRecorder, TrainingCapture, last_step_from_state, read_base_optimizer


def planted_spectrum(outliers: int, n: int = 400, seed: int = 0) -> torch.Tensor:
    """``outliers`` eigenvalues spread from 4 to 400 over a bulk in [-0.3, 1] (a few negative values)."""
    generator = torch.Generator().manual_seed(seed)
    top = torch.logspace(math.log10(400.0), math.log10(4.0), outliers, dtype=torch.float64)
    bulk = torch.rand(n - outliers, generator=generator, dtype=torch.float64) * 1.3 - 0.3
    return torch.cat([top, bulk])


def rotated(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    q, _ = torch.linalg.qr(torch.randn(values.numel(), values.numel(), generator=generator, dtype=torch.float64))
    return (q * values) @ q.T


def by_magnitude(values: torch.Tensor) -> torch.Tensor:
    return values[torch.argsort(values.abs(), descending=True)]


class Quadratic(torch.nn.Module):
    """``0.5 x^T H x - b^T x`` with a known Hessian."""

    def __init__(self, hessian: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed + 2)
        self.register_buffer("hessian", hessian.float())
        self.register_buffer("b", torch.randn(hessian.shape[0], generator=generator))
        self.x = torch.nn.Parameter(torch.randn(hessian.shape[0], generator=generator))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.x @ self.hessian @ self.x - self.b @ self.x


def adam_metric_dense(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], hessian: torch.Tensor) -> float:
    """The top eigenvalue of ``D^-1/2 H D^-1/2`` with AdamW's denominator, computed densely."""
    group = optimizer.param_groups[0]
    steps = float(optimizer.state[params[0]]["step"])
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in params]).double()
    scale = ((v / (1 - group["betas"][1] ** steps)).sqrt() + group["eps"]).rsqrt()
    return float(torch.linalg.eigvalsh(scale[:, None] * hessian.double() * scale[None, :]).max())


def dense_share(hessian: torch.Tensor, step: torch.Tensor, k: int) -> float:
    values, vectors = torch.linalg.eigh(hessian.double())
    top = vectors[:, torch.argsort(values.abs(), descending=True)[:k]]
    d = step.double()
    return float((top.T @ d).norm() / d.norm())


# ------------------------------------------------------------------------------------------ outliers
@pytest.mark.parametrize("count", [2, 10, 20])
def test_outlier_count_finds_planted_outliers(count: int) -> None:
    values = planted_spectrum(count)
    diagonal = values.clone()
    spectrum = measures.lanczos_spectrum(lambda v: diagonal.to(v.dtype) * v, values.numel(), 2 * 32 + 16,
                                         dtype=torch.float64)
    assert measures.outlier_count(spectrum.values, 32, report.OUTLIER_GAP) == count
    torch.testing.assert_close(spectrum.values[:count], by_magnitude(values)[:count], rtol=1e-6, atol=0)
    assert measures.outlier_count(by_magnitude(values), 32, report.OUTLIER_GAP) == count


def test_outlier_rule_on_smooth_and_top_heavy_spectra() -> None:
    power_law = [1.0 / i for i in range(1, 60)]
    assert measures.outlier_count(power_law, 32, report.OUTLIER_GAP) == 0  # largest neighbour ratio 2
    top_heavy = [1000.0, 50.0, 40.0, 30.0] + [5.0 - 0.01 * i for i in range(40)]
    assert measures.outlier_count(top_heavy, 32, report.OUTLIER_GAP) == 4  # the last gap, not the largest
    assert measures.outlier_count([3.0, 2.0, 1e-9], 32, report.OUTLIER_GAP) == 2  # rank-2 operator
    rounding = [3.0, 2.0, 3e-7, 2e-8, 1e-9]  # a rank-2 operator through float32 products
    assert measures.outlier_count(rounding, 32, report.OUTLIER_GAP) == 4
    assert measures.outlier_count(rounding, 32, report.OUTLIER_GAP, report.EIGENVALUE_FLOOR) == 2
    assert measures.outlier_count(top_heavy, 3, report.OUTLIER_GAP) == 1  # gaps past max_rank are not seen


# --------------------------------------------------------------------------------- small quadratic
def test_quadratic_probe_matches_dense_values() -> None:
    values = planted_spectrum(10, n=120)
    hessian = rotated(values)
    model = Quadratic(hessian)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    recorder = StepRecorder(optimizer)
    for _ in range(4):
        optimizer.zero_grad()
        model().backward()
        optimizer.step()
    recorder.remove()
    params = list(model.parameters())
    step = recorder.last_step(params)
    rebuilt = last_step_from_state(optimizer, params)
    torch.testing.assert_close(rebuilt, step, rtol=1e-4, atol=1e-7)  # AdamW's last step, from its moments

    result = probe_training(model, model, optimizer, max_rank=16, last_step=step, lanczos_dtype=torch.float64)
    assert result.outliers == 10 and result.subspace_rank == 10 and result.recommended_rank == 10
    torch.testing.assert_close(torch.tensor(result.eigenvalues[:11]), by_magnitude(values)[:11].float(),
                               rtol=1e-4, atol=1e-4)
    assert result.subspace_share == pytest.approx(dense_share(hessian, step, 10), rel=1e-4)
    dense = adam_metric_dense(optimizer, params, hessian)
    assert result.metric_lambda_max == pytest.approx(dense, rel=1e-3)
    assert result.lr_lambda_max == pytest.approx(1e-2 * dense, rel=1e-3)
    assert result.stability_limit == pytest.approx(2 * 1.9 / 0.1)
    assert result.base == "adamw" and result.noise_scale is None
    text = str(result)
    assert "outliers above the bulk: 10" in text and text.splitlines()[-1].startswith("verdict: ")
    json.dumps(result.as_dict(), allow_nan=False)


def test_probe_reads_dho2_base_state() -> None:
    from ds_dho2 import DHO2

    values = planted_spectrum(2, n=60)
    hessian = rotated(values)
    model = Quadratic(hessian)
    optimizer = DHO2(model.parameters(), lr=1e-2, rank=2).attach(model)
    for _ in range(3):
        optimizer.zero_grad()
        model().backward()
        optimizer.step()
    result = probe_training(model, model, optimizer, max_rank=8, lanczos_dtype=torch.float64)
    v_hat = optimizer.base.state.exp_avg_sq.double() / (1 - 0.999 ** 3)
    scale = (v_hat.sqrt() + 1e-8).rsqrt()
    dense = float(torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :]).max())
    assert result.optimizer == "DHO2 (base adamw)" and result.outliers == 2
    assert result.metric_lambda_max == pytest.approx(dense, rel=1e-3)
    assert result.subspace_share is None and any("last step was not recorded" in note for note in result.notes)


# ------------------------------------------------------------------------------------------- MLP
class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(x), y)


def dense_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss(vector: torch.Tensor) -> torch.Tensor:
        tensors = [t.view(s) for t, s in zip(vector.split([math.prod(s) for s in shapes]), shapes)]
        return torch.func.functional_call(model.double(), dict(zip(names, tensors)), (x.double(), y))

    try:
        return torch.autograd.functional.hessian(loss, flat)
    finally:
        model.float()


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_mlp_probe_matches_dense_hessian(base: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    optimizer = (torch.optim.AdamW(model.parameters(), lr=3e-2) if base == "adamw"
                 else torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.8))
    recorder = StepRecorder(optimizer)
    for _ in range(5):
        optimizer.zero_grad()
        model(x, y).backward()
        optimizer.step()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    assert 80 <= n <= 120
    hessian = dense_hessian(model, x, y)
    step = recorder.last_step(params)
    result = probe_training(model, lambda: model(x, y), optimizer, max_rank=8, lanczos_order=n, metric_order=n,
                            lanczos_dtype=torch.float64)
    exact = torch.linalg.eigvalsh(hessian)
    top = by_magnitude(exact)[:9]
    torch.testing.assert_close(torch.tensor(result.eigenvalues, dtype=torch.float64), top, rtol=1e-4,
                               atol=1e-5 * float(top.abs().max()))
    k = result.subspace_rank
    assert measures.gap(top, k) > 1.01  # the subspace is well defined, so the shares compare
    assert result.subspace_share == pytest.approx(dense_share(hessian, step, k), rel=1e-3)
    if base == "adamw":
        assert result.metric_lambda_max == pytest.approx(adam_metric_dense(optimizer, params, hessian), rel=1e-4)
    else:
        # SGD's last step is rebuilt exactly from its momentum buffer
        torch.testing.assert_close(last_step_from_state(optimizer, params), step, rtol=1e-4, atol=1e-7)
        assert result.metric_lambda_max == pytest.approx(float(exact.max()), rel=1e-4)
        assert result.lr_lambda_max == pytest.approx(0.2 * float(exact.max()), rel=1e-4)
        assert result.stability_limit == pytest.approx(2 * 1.8)


# ------------------------------------------------------------------------------------- noise scale
def test_noise_scale_estimators_are_unbiased_for_known_sigma_and_g() -> None:
    generator = torch.Generator().manual_seed(0)
    dim, chunks, size, repeats = 30, 8, 4, 400
    mean = torch.randn(dim, generator=generator, dtype=torch.float64) * 0.3
    root = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    sigma = root @ root.T
    trace, grad_sq = float(sigma.trace()), float(mean.square().sum())
    estimates = []
    for _ in range(repeats):
        examples = mean + torch.randn(chunks * size, dim, generator=generator, dtype=torch.float64) @ root.T
        chunk_gradients = list(examples.view(chunks, size, dim).mean(dim=1))
        estimates.append(measures.chunk_noise_scale(chunk_gradients, size))
    mean_trace = sum(e.trace_sigma for e in estimates) / repeats
    mean_grad_sq = sum(e.grad_sq for e in estimates) / repeats
    assert mean_trace == pytest.approx(trace, rel=0.05)
    assert mean_grad_sq == pytest.approx(grad_sq, rel=0.1)
    assert mean_trace / mean_grad_sq == pytest.approx(trace / grad_sq, rel=0.15)
    assert estimates[0].small == size and estimates[0].big == size * chunks and estimates[0].chunks == chunks
    # the two-batch formula itself, on exact expectations E|G_B|^2 = |G|^2 + tr(Sigma) / B
    exact = measures.noise_scale([grad_sq + trace / 2] * 3, 2, grad_sq + trace / 64, 64)
    assert exact.trace_sigma == pytest.approx(trace) and exact.grad_sq == pytest.approx(grad_sq)
    assert exact.b_noise == pytest.approx(trace / grad_sq)


class LinearRegression(torch.nn.Module):
    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(weights.clone())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x @ self.w - y).square().mean()


def test_verdict_flips_from_noise_limited_to_curvature_limited_as_the_batch_grows() -> None:
    """Linear regression with label noise, two outlier feature directions, SGD at 70% of its stability
    limit: B_noise is about 1,000 examples, so a batch of 8 is noise-limited and the whole data set
    (16,384) is curvature-limited, with the two outliers as DHO2's rank."""
    generator = torch.Generator().manual_seed(0)
    rows, dim = 16384, 100
    scales = torch.ones(dim)
    scales[:2] = torch.tensor([30.0, 20.0]).sqrt()
    x = torch.randn(rows, dim, generator=generator) * scales
    truth = torch.randn(dim, generator=generator)
    y = x @ truth + torch.randn(rows, generator=generator)  # label noise sigma = 1
    hessian = x.T.double() @ x.double() / rows
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    offset = direction * (0.38 / float((hessian @ direction).norm()))  # |G|^2 ~ 0.15, tr(Sigma) ~ 150
    model = LinearRegression(truth + offset.float())
    lam_max = float(torch.linalg.eigvalsh(hessian).max())
    lr = 0.7 * measures.heavy_ball_stability_limit(0.9) / lam_max
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def probe(batch: int) -> report.ProbeReport:
        xb, yb = x[:batch], y[:batch]
        size = batch // 8
        chunks = [lambda j=j: model(xb[j * size:(j + 1) * size], yb[j * size:(j + 1) * size]) for j in range(8)]
        return probe_training(model, lambda: model(xb, yb), optimizer, batches=chunks, batch_size=batch,
                              max_rank=16)

    small, full = probe(8), probe(rows)
    assert small.regime == report.NOISE_LIMITED, str(small)
    assert small.outliers == 8  # a batch of 8 gives a Hessian of rank 8: all of it stands above the zeros
    assert small.verdict.startswith("noise-limited at batch 8: expect no step savings below a batch of about")
    assert full.regime == report.CURVATURE_LIMITED, str(full)
    assert 300 < full.noise_scale < 3000 and full.outliers == 2
    assert full.stability_ratio == pytest.approx(0.7, rel=0.01)
    assert full.verdict.startswith("curvature-limited: DHO2 with base heavyball, rank 2 should save steps")


# ------------------------------------------------------------------------------ stability and verdict
@pytest.mark.parametrize("nesterov", [False, True])
def test_heavy_ball_stability_limit_matches_sgd_on_a_scalar_quadratic(nesterov: bool) -> None:
    momentum, curvature = 0.8, 4.0
    limit = measures.heavy_ball_stability_limit(momentum, nesterov=nesterov)

    def final_size(fraction: float) -> float:
        x = torch.nn.Parameter(torch.ones(1))
        optimizer = torch.optim.SGD([x], lr=fraction * limit / curvature, momentum=momentum, nesterov=nesterov)
        for _ in range(100):  # the unstable root is about -1.3 at 1.03x the limit: no overflow yet
            optimizer.zero_grad()
            (0.5 * curvature * x.square().sum()).backward()
            optimizer.step()
        return float(x.detach().abs())

    assert final_size(0.97) < 1.0 < final_size(1.03)
    assert measures.adam_stability_limit(0.9) == pytest.approx(38.0)


def test_judge_thresholds() -> None:
    common = dict(outliers=3, subspace_rank=3, lift=8.0, step_cost=0.2, max_rank=32, noise_big_batch=64.0)
    regime, text = report.judge(batch_size=32, noise_scale=500.0, stability_ratio=0.9, **common)
    assert regime == report.NOISE_LIMITED
    assert text == ("noise-limited at batch 32: expect no step savings below a batch of about 500; DHO2 will cost "
                    "~20% per step")
    regime, text = report.judge(batch_size=32, noise_scale=math.inf, stability_ratio=0.9, **common)
    assert regime == report.NOISE_LIMITED and "B_noise exceeds it" in text
    regime, text = report.judge(batch_size=1024, noise_scale=500.0, stability_ratio=0.5, **common)
    assert regime == report.CURVATURE_LIMITED and "DHO2 with base heavyball, rank 3 should save steps" in text
    regime, text = report.judge(batch_size=1024, noise_scale=500.0, stability_ratio=0.49, **common)
    assert regime == report.LR_LIMITED and text.startswith("lr-limited: lr x lambda_max is only 49%")
    regime, text = report.judge(batch_size=1024, noise_scale=None, stability_ratio=0.8,
                                **{**common, "outliers": 0, "subspace_rank": 4, "lift": 1.2})
    assert regime == report.CURVATURE_LIMITED and "expect little from DHO2" in text
    regime, _ = report.judge(batch_size=1024, noise_scale=None, stability_ratio=None, **common)
    assert regime == report.UNDETERMINED


def test_finite_population_correction_removes_the_noise_of_a_full_batch() -> None:
    """Batches drawn without replacement from N examples meet B_noise (1 - B/N): a full batch meets none, so the
    verdict cannot be noise-limited there however large B_noise came out."""
    assert report.batch_noise_scale(2000.0, 1000, 4000) == pytest.approx(1500.0)
    assert report.batch_noise_scale(2000.0, 4000, 4000) == 0.0
    assert report.batch_noise_scale(math.inf, 4000, 4000) == 0.0
    assert report.batch_noise_scale(2000.0, 1000, None) == 2000.0
    common = dict(outliers=3, subspace_rank=3, lift=8.0, step_cost=0.2, max_rank=32, noise_big_batch=512.0,
                  stability_ratio=0.9)
    regime, _ = report.judge(batch_size=1000, noise_scale=1200.0, **common)
    assert regime == report.NOISE_LIMITED  # unknown N: compared with B_noise itself
    regime, _ = report.judge(batch_size=1000, noise_scale=1200.0, dataset_size=4000, **common)
    assert regime == report.CURVATURE_LIMITED  # 1200 x (1 - 1000/4000) = 900 < 1000
    regime, text = report.judge(batch_size=4000, noise_scale=math.inf, dataset_size=4000,
                                **{**common, "stability_ratio": 0.1})
    assert regime == report.LR_LIMITED and "is the whole training set (no sampling noise)" in text


def test_read_base_optimizer_families() -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    sgd = read_base_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5), params)
    assert sgd.family == "heavyball" and sgd.stability_limit == pytest.approx(2 * 1.9 / 0.5)
    adagrad = read_base_optimizer(torch.optim.Adagrad(params, lr=0.1), params)
    assert adagrad.family is None and adagrad.stability_limit is None


# --------------------------------------------------------------------------------------------- hooks
class Regressor(torch.nn.Module):
    def __init__(self, returns_loss: bool = True) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.returns_loss = returns_loss

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        out = self.net(x)
        return torch.nn.functional.mse_loss(out, target) if self.returns_loss else out


def train_under_capture(model: torch.nn.Module, steps: int, due: int,
                        accumulation: int = 1) -> tuple[TrainingCapture, torch.Tensor | None]:
    """Train ``model`` with AdamW under a :class:`TrainingCapture`; returns it and the change of the
    parameters in the step at which it raised :class:`ProbeDue` (None if it never did)."""
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    capture = TrainingCapture(due).install()
    before: list[torch.Tensor] = []
    try:
        for _ in range(steps):
            for _ in range(accumulation):
                x = torch.randn(12, 6)
                out = model(x, target=x.sum(dim=1, keepdim=True))
                loss = out if out.dim() == 0 else out.square().mean()
                loss.backward()
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
    except ProbeDue:
        return capture, torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    finally:
        capture.remove()
    return capture, None


def test_capture_finds_model_loss_optimizer_and_step_in_a_plain_loop() -> None:
    model = Regressor()
    capture, step = train_under_capture(model, steps=10, due=3, accumulation=2)
    assert step is not None and capture.steps == 3 and capture.micro_batches_per_step == 2
    arguments = capture.probe_arguments()
    assert arguments["model"] is model and arguments["batch_size"] == 24 and arguments["chunk_size"] == 1
    assert len(arguments["batches"]) == 8 and arguments["step"] == 3
    torch.testing.assert_close(arguments["last_step"], step)
    result = probe_training(**arguments, max_rank=4)
    assert result.step == 3 and result.noise_scale is not None and result.subspace_share is not None
    assert result.regime in (report.NOISE_LIMITED, report.LR_LIMITED, report.CURVATURE_LIMITED)


def test_capture_errors_are_one_line_with_the_fix() -> None:
    capture, _ = train_under_capture(Regressor(returns_loss=False), steps=2, due=2)
    with pytest.raises(ProbeError, match="^no loss found: .*Return the loss from forward") as error:
        probe_training(**capture.probe_arguments(), max_rank=4)
    assert "\n" not in str(error.value)
    with pytest.raises(ProbeError, match="^no optimizer step seen"):
        TrainingCapture(5).probe_arguments()
