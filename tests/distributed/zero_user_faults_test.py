"""The promises of ``tests/unit/user_faults_test.py`` under DeepSpeed ZeRO-2 at W=2 (CPU, gloo): parameters
without a gradient end where DeepSpeed's AdamW leaves them, a refresh on a bad batch is a warning, and a
loss that stays NaN stops the run after ``max_nonfinite_steps`` although ZeRO skips those steps itself."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

import ds_dho2  # noqa: F401 - registers "type": "DHO2" with DeepSpeed, also in every spawned rank
from tests.helpers import ds_setup as S
from tests.helpers.distributed import run_ranks
from tests.unit.user_faults_test import TokenModel, _batches

pytestmark = pytest.mark.distributed

STEPS = 12


def _engine(optimizer: dict, world: int) -> tuple[Any, TokenModel]:
    import deepspeed

    model = TokenModel()
    config = S.ds_config(2, {}, 16 // world)
    config["optimizer"] = optimizer
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine, model


def _no_gradient_run(rank: int, world: int, optimizer: dict) -> dict:
    engine, model = _engine(optimizer, world)
    for tokens, labels in _batches(STEPS):
        per = tokens.shape[0] // world
        engine.backward(engine(tokens[rank * per:(rank + 1) * per], labels[rank * per:(rank + 1) * per]))
        engine.step()
    dho2 = engine.basic_optimizer if isinstance(engine.basic_optimizer, ds_dho2.DHO2) else None
    return {"absent_rows": model.embedding.weight[10:].detach().clone(),
            "unused": [p.detach().clone() for p in model.unused.parameters()],
            "trained_rows": model.embedding.weight[:10].detach().clone(),
            "refreshes": None if dho2 is None else dho2.curvature_stats().get("refresh_count", 0)}


def _nan_run(rank: int, world: int) -> dict:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("ds_dho2").addHandler(Keep())
    import deepspeed

    model = S.LossModel()
    params = {"lr": 1e-2, "rank": 4, "warmup_steps": 1, "max_nonfinite_steps": 4}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=S.ds_config(2, params, 4))
    steps = 0
    error = None
    try:
        for x, y in S.batches(30, 4):
            engine.backward(engine(torch.full_like(x, float("nan")), y))  # a batch of NaN inputs
            engine.step()
            steps += 1
    except ds_dho2.optimizer.NonFiniteGradientError as stop:
        error = str(stop)
    return {"error": error, "steps": steps, "records": records, "skipped": int(engine.skipped_steps)}


def worker(rank: int, world: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    dho2 = {"type": "DHO2", "params": {"lr": 1e-2, "rank": 4, "refresh_interval": 5, "warmup_steps": 3}}
    adamw = {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.0}}
    return {"dho2": _no_gradient_run(rank, world, dho2), "adamw": _no_gradient_run(rank, world, adamw),
            "nan": _nan_run(rank, world)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(worker, 2, timeout=300)


def test_parameters_without_a_gradient_end_where_deepspeed_adamw_leaves_them(results: list[dict]) -> None:
    for rank in results:
        dho2, adamw = rank["dho2"], rank["adamw"]
        assert dho2["refreshes"] >= 2  # curvature was installed and refreshed meanwhile
        assert torch.equal(dho2["absent_rows"], adamw["absent_rows"])
        assert all(torch.equal(a, b) for a, b in zip(dho2["unused"], adamw["unused"]))
        assert not torch.equal(dho2["trained_rows"], TokenModel().embedding.weight[:10].detach())


def test_a_loss_that_stays_nan_stops_the_run_under_zero(results: list[dict]) -> None:
    for rank, result in enumerate(r["nan"] for r in results):
        assert result["error"] is not None, result
        assert result["error"].startswith("DHO2 stopped at step 4: the gradient was inf or NaN in 4 consecutive "
                                          "steps (max_nonfinite_steps=4)"), result["error"]
        assert result["steps"] == 3 and result["skipped"] == 3  # ZeRO skipped each; the fourth stops inside its step
        warned = [r for r in result["records"] if "skipped the curvature refresh at step 1" in r]
        assert len(warned) == (1 if rank == 0 else 0), result["records"]  # the refresh on the bad batch
