"""Curvature products on the loss handed to ``engine.backward`` (``hvp="graph"``) under DeepSpeed's output
backward hooks (DeepSpeed 0.19 hooks the outputs of ``engine.forward``).

A backward through those outputs opens DeepSpeed's backward once per forward and divides the outputs'
gradient by the accumulation steps. The graph products must do neither: with gradient accumulation 2 they
give the same eigenvalues as products on a replay of the same micro-batch (``hvp="reverse"``), the refresh
does not fail, and training is the same as with the replay route.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_ranks


class _LossModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.net(x), y)


def _train(rank: int, world_size: int, stage: int, hvp: str) -> dict:
    import logging

    import deepspeed

    import ds_dho2  # noqa: F401 - registers DHO2
    from ds_dho2.integrations.deepspeed import load_config

    failures: list[str] = []

    class Failures(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                failures.append(record.getMessage())

    logging.getLogger("ds_dho2").addHandler(Failures())
    torch.manual_seed(0)
    model = _LossModel()
    config = load_config("ds_configs/dho2_zero2.json", train_micro_batch_size_per_gpu=4,
                         gradient_accumulation_steps=2, rank=2, lanczos_order=8, warmup_steps=1,
                         refresh_interval=2, hvp=hvp, curvature={"batch_fraction": 1.0, "back_off": False})
    config["zero_optimization"] = {"stage": stage}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    generator = torch.Generator().manual_seed(1)
    eigenvalues = []
    for _ in range(3):  # optimizer steps 1..3 (refreshes before steps 1 and 3), two micro-batches each
        for _ in range(2):
            x, y = torch.randn(4, 4, generator=generator), torch.randn(4, 1, generator=generator)
            engine.backward(engine(x, y))
            engine.step()
        eigenvalues.append(engine.basic_optimizer.eigenvalues.tolist())
    return {"eigenvalues": eigenvalues, "failures": failures,
            "params": torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])}


def _train_both(rank: int, world_size: int, stage: int) -> dict:
    return {hvp: _train(rank, world_size, stage, hvp) for hvp in ("graph", "reverse")}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [0, 2])
def test_graph_products_under_gradient_accumulation_match_replayed_products(stage: int) -> None:
    (runs,) = run_ranks(_train_both, 1, stage, timeout=200)
    graph, reverse = runs["graph"], runs["reverse"]
    assert graph["failures"] == [] and reverse["failures"] == []
    for at_graph, at_reverse in zip(graph["eigenvalues"], reverse["eigenvalues"]):
        assert at_graph == pytest.approx(at_reverse, rel=1e-5)
    torch.testing.assert_close(graph["params"], reverse["params"], rtol=1e-5, atol=1e-6)
