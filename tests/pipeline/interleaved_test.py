"""Interleaved (overlapped) curvature refresh: agreement with blocking mode, the atomic swap at a step
boundary, and exact resume from checkpoints taken in the middle of a refresh (plain and DeepSpeed W=2)."""

from __future__ import annotations

import copy

import pytest
import torch

from ds_dho2 import DHO2
from tests.helpers.distributed import run_ranks

ORDER, RANK = 24, 4


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(x), target)


def fixed_problem() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=generator)
    return x, (x @ torch.randn(20, 3, generator=generator)).argmax(1)


def make_optimizer(model: torch.nn.Module, mode: str, iterations_per_step: int = 4, **overrides) -> DHO2:
    params = dict(lr=1e-3, rank=RANK, lanczos_order=ORDER, refresh_interval=30, warmup_steps=10,
                  curvature={"mode": mode, "iterations_per_step": iterations_per_step, "back_off": False})
    params.update(overrides)
    return DHO2(model.parameters(), **params).attach(model)


def first_eigenpairs(mode: str) -> tuple[int, torch.Tensor, torch.Tensor, list]:
    x, y = fixed_problem()
    model = Classifier()
    opt = make_optimizer(model, mode)
    none_until = []
    for step in range(1, 30):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
        if opt.eigenvalues is None:
            none_until.append(step)
        else:
            return step, opt.eigenvalues.clone(), opt.local_eigenvectors.clone(), none_until
    raise AssertionError("no refresh completed")


def test_interleaved_eigenpairs_match_blocking_on_fixed_problem() -> None:
    blocking_step, blocking_values, blocking_vectors, _ = first_eigenpairs("blocking")
    interleaved_step, values, vectors, none_until = first_eigenpairs("interleaved")
    assert blocking_step == 10
    # 24 iterations at 4 per step, starting at step 10: the new basis is swapped in at step 15.
    assert interleaved_step == 15 and none_until == list(range(1, 15))
    assert ((values - blocking_values).abs() / blocking_values.abs()).max() < 0.05
    cosines = torch.linalg.svdvals(blocking_vectors.double() @ vectors.double().t())
    assert (cosines**2).mean() >= 0.9


def test_old_basis_stays_in_use_until_new_one_is_complete() -> None:
    x, y = fixed_problem()
    model = Classifier()
    opt = make_optimizer(model, "interleaved", refresh_interval=8, warmup_steps=4, lanczos_order=12,
                         iterations_per_step=3)
    history = []
    for _ in range(20):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
        basis = opt.local_lanczos_basis
        history.append((None if opt.eigenvalues is None else opt.eigenvalues.clone(), basis is not None))
    # Runs start at steps 4, 12, 20 and take 4 steps each (12 iterations, 3 per step): in flight after
    # steps 4-6, 12-14 and 20; the first basis appears at step 7 and is kept, unchanged, while the next run
    # is in flight.
    in_flight = [step for step, (_, busy) in enumerate(history, start=1) if busy]
    assert in_flight == [4, 5, 6, 12, 13, 14, 20]
    assert all(values is None for values, _ in history[:6]) and history[6][0] is not None
    for step in (12, 13, 14):
        torch.testing.assert_close(history[step - 1][0], history[10][0], rtol=0, atol=0)
    assert not torch.equal(history[14][0], history[10][0]), "the second run must swap in a new basis"


def train(model: torch.nn.Module, opt: DHO2, steps: range, batches: list) -> None:
    for step in steps:
        x, y = batches[step]
        opt.zero_grad()
        model(x, y).backward()
        opt.step()


def minibatches(count: int) -> list:
    x, y = fixed_problem()
    generator = torch.Generator().manual_seed(5)
    return [(x[idx], y[idx]) for idx in (torch.randint(0, 256, (32,), generator=generator) for _ in range(count))]


@pytest.mark.parametrize("mode", ["blocking", "interleaved"])
def test_resume_from_state_dict_mid_refresh_is_exact(mode: str) -> None:
    batches = minibatches(30)
    model = Classifier()
    opt = make_optimizer(model, mode, refresh_interval=8, warmup_steps=4, lanczos_order=12, iterations_per_step=3,
                         lanczos_dtype="float64")
    train(model, opt, range(0, 13), batches)
    if mode == "interleaved":
        assert opt.local_lanczos_basis is not None, "the checkpoint must be taken mid-refresh"
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, range(13, 30), batches)

    resumed = Classifier()
    resumed.load_state_dict(saved_model)
    resumed_opt = make_optimizer(resumed, mode, refresh_interval=8, warmup_steps=4, lanczos_order=12,
                                 iterations_per_step=3, lanczos_dtype="float64")
    resumed_opt.load_state_dict(saved_opt)
    if mode == "interleaved":
        assert resumed_opt.local_lanczos_basis.dtype == torch.float64
    train(resumed, resumed_opt, range(13, 30), batches)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(opt.eigenvalues, resumed_opt.eigenvalues, rtol=0, atol=0)


# ------------------------------------------------------------ DeepSpeed ZeRO-2, W=2, checkpoint mid-refresh
DS_PARAMS = {"lr": 1e-2, "rank": 3, "lanczos_order": 12, "refresh_interval": 8, "warmup_steps": 4,
             "curvature": {"mode": "interleaved", "iterations_per_step": 3, "back_off": False}}


def _zero2_interleaved_worker(rank: int, world_size: int, checkpoint_dir: str, stop_at: int | None,
                              resume: bool, steps: int) -> dict:
    import deepspeed

    import ds_dho2  # noqa: F401 - registers DHO2

    model = Classifier()
    config = {"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "DHO2", "params": DS_PARAMS},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    batches = minibatches(steps * world_size)
    start = 0
    if resume:
        engine.load_checkpoint(checkpoint_dir, tag="mid")
        start = engine.global_steps
    mid_refresh = None
    for step in range(start, steps):
        x, y = batches[step * world_size + rank]
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if stop_at is not None and step + 1 == stop_at:
            mid_refresh = engine.basic_optimizer.local_lanczos_basis is not None
            engine.save_checkpoint(checkpoint_dir, tag="mid")
    return {"params": [p.detach().clone() for p in model.parameters()], "mid_refresh": mid_refresh,
            "eigenvalues": engine.basic_optimizer.eigenvalues.clone()}


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_deepspeed_checkpoint_mid_interleaved_refresh_resumes_exactly(tmp_path) -> None:
    steps, stop_at = 16, 13  # a run starts at step 12 and is in flight after step 13
    uninterrupted = run_ranks(_zero2_interleaved_worker, 2, str(tmp_path), stop_at, False, steps)
    assert uninterrupted[0]["mid_refresh"] is True
    resumed = run_ranks(_zero2_interleaved_worker, 2, str(tmp_path), None, True, steps)
    for before, after in zip(uninterrupted, resumed):
        for a, b in zip(before["params"], after["params"]):
            assert torch.equal(a, b)
        assert torch.equal(before["eigenvalues"], after["eigenvalues"])


def test_resume_in_the_middle_of_a_warm_started_adaptive_refresh_is_exact() -> None:
    """The second refresh starts from the first one's eigenvectors (warm), may stop early on convergence and
    the interval adapts to the measured rotation: a checkpoint taken while it is in flight resumes exactly."""
    batches = minibatches(40)

    def build(model: torch.nn.Module) -> DHO2:
        return make_optimizer(model, "interleaved", refresh_interval=6, warmup_steps=3, lanczos_order=12,
                              iterations_per_step=2, curvature={"mode": "interleaved", "iterations_per_step": 2, "back_off": False,
                                                                "max_interval": 24, "tolerance": 0.2})

    model = Classifier()
    opt = build(model)
    checkpoint_at = None
    for step in range(40):
        train(model, opt, range(step, step + 1), batches)
        stats = opt.curvature_stats()
        if opt.local_lanczos_basis is not None and stats.get("refresh_count", 0) >= 1 and stats.get("warm_start"):
            checkpoint_at = step + 1
            break
    assert checkpoint_at is not None, "a warm-started refresh must be in flight at some step"
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, range(checkpoint_at, 40), batches)
    resumed = Classifier()
    resumed.load_state_dict(saved_model)
    resumed_opt = build(resumed)
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, resumed_opt, range(checkpoint_at, 40), batches)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt.curvature_stats()["refresh_count"] == resumed_opt.curvature_stats()["refresh_count"] >= 3
    torch.testing.assert_close(opt.eigenvalues, resumed_opt.eigenvalues, rtol=0, atol=0)
