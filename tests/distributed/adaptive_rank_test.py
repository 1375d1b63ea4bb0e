"""rank='auto' under DeepSpeed ZeRO-2 at W=2 follows the same k, eigenvalues and trajectory as one process."""

from __future__ import annotations

import pytest
import torch

import ds_dho2  # noqa: F401 - registers "type": "DHO2" with DeepSpeed, also in every spawned rank
from tests.helpers import ds_setup as S
from tests.helpers.distributed import run_ranks

pytestmark = pytest.mark.distributed

PARAMS = {"lr": 1e-2, "rank": "auto", "max_rank": 8, "refresh_interval": 3, "warmup_steps": 2, "hvp": "reverse",
          "curvature": {"batch_fraction": 1.0, "max_interval": 3, "back_off": False}}
STEPS, GBS = 12, 8


class Outliers(torch.nn.Module):
    """A regression whose Hessian (the inputs' second moment) has 3 outlier eigenvalues over a bulk near 1,
    so k moves from its start of 4 to 3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(S.IN_FEATURES, S.CLASSES)
        self.register_buffer("scale", torch.tensor([8.0, 5.0, 3.0] + [1.0] * (S.IN_FEATURES - 3)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(x * self.scale), y)


def _record(opt) -> tuple[int, list[float] | None]:
    return opt.tracker.rank, None if opt.eigenvalues is None else [float(v) for v in opt.eigenvalues]


def worker(rank: int, world: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = Outliers()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=S.ds_config(2, PARAMS, GBS // world))
    history = []
    for batch in S.batches(STEPS, GBS):
        x, y = S.shard(batch, rank, world)
        engine.backward(engine(x, y))
        engine.step()
        history.append(_record(engine.basic_optimizer))
    return {"history": history, "params": S.flat_params(model)}


def test_changing_rank_agrees_between_one_process_and_zero2_at_w2() -> None:
    model = Outliers()
    opt = ds_dho2.DHO2(model.parameters(), **PARAMS).attach(model)
    reference = []
    for x, y in S.batches(STEPS, GBS):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
        reference.append(_record(opt))
    ranks = run_ranks(worker, 2, timeout=300)
    ks = [k for k, _ in reference]
    assert len(set(ks)) > 1, ks  # k really changed during the run
    for result in ranks:
        assert [k for k, _ in result["history"]] == ks
        for (_, mine), (_, theirs) in zip(result["history"], reference):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert mine == pytest.approx(theirs, rel=1e-6)
        assert S.rel_err(result["params"], S.flat_params(model)) < 1e-6
