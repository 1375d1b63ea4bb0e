"""The most common DeepSpeed loop -- ``loss = criterion(engine(x), y); engine.backward(loss)`` with a model
that returns logits -- trains with DHO2 from the JSON entry alone: the curvature products are taken on the
loss handed to ``engine.backward`` (no loss in the model output, no ``loss_fn``). Eigenvalues agree across
world sizes (W=1 vs W=2, ZeRO 0/1/2), and a loop that bypasses ``engine.backward`` while its model returns
no loss is stopped at the first step with a message naming the fix.
"""

from __future__ import annotations

import pytest
import torch

import ds_dho2  # noqa: F401 - registers "type": "DHO2" with DeepSpeed
from tests.helpers import ds_setup as S
from tests.helpers.distributed import run_ranks

pytestmark = pytest.mark.distributed

STEPS, GBS = 8, 8
#: the graph route pinned (``auto`` may time a replay through the recorded criterion, or finite differences,
#: as cheaper on one world size and not on another), on the whole micro-batch (a strided subset differs with
#: the world size)
PARAMS = {"lr": 1e-2, "rank": 3, "refresh_interval": 3, "warmup_steps": 2, "hvp": "graph",
          "curvature": {"max_interval": 3, "back_off": False, "batch_fraction": 1.0}}


def _logits_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(S.IN_FEATURES, S.HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(S.HIDDEN, S.CLASSES))


def _worker(rank: int, world: int) -> dict:
    import deepspeed

    criterion = torch.nn.CrossEntropyLoss()
    out: dict = {}
    for stage in (0, 1, 2):
        model = _logits_model()
        engine, *_ = deepspeed.initialize(model=model, config=S.ds_config(stage, PARAMS, GBS // world))
        history = []
        for batch in S.batches(STEPS, GBS):
            x, y = S.shard(batch, rank, world)
            loss = criterion(engine(x), y)
            engine.backward(loss)
            engine.step()
            history.append(None if engine.basic_optimizer.eigenvalues is None
                           else engine.basic_optimizer.eigenvalues.clone())
        stats = engine.basic_optimizer.curvature_stats()
        out[stage] = {"eigenvalues": history, "hvp": stats.get("hvp_strategy"),
                      "refreshes": stats.get("refresh_count"), "params": S.flat_params(model)}
    # torch-style loss.backward() on an engine whose model returns logits: no route to the loss
    model = _logits_model()
    engine, *_ = deepspeed.initialize(model=model, config=S.ds_config(2, PARAMS, GBS // world))
    x, y = S.shard(S.batches(1, GBS)[0], rank, world)
    try:
        criterion(engine(x), y).backward()
        engine.step()
        out["bypass"] = None
    except Exception as error:  # noqa: BLE001
        out["bypass"] = f"{type(error).__name__}: {error}"
    return out


@pytest.fixture(scope="module")
def runs() -> dict:
    return {1: run_ranks(_worker, 1, timeout=300), 2: run_ranks(_worker, 2, timeout=300)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_external_criterion_eigenvalues_agree_across_world_sizes(runs: dict, stage: int) -> None:
    single, pair = runs[1][0][stage], [rank[stage] for rank in runs[2]]
    assert single["hvp"] == "graph" and all(r["hvp"] == "graph" for r in pair)  # no loss in the output
    assert single["refreshes"] == 3  # steps 2, 5, 8
    refreshed = [i for i, values in enumerate(single["eigenvalues"]) if values is not None]
    assert refreshed and refreshed[0] == 1
    for step in refreshed:
        reference = single["eigenvalues"][step]
        for rank in pair:
            relative = ((rank["eigenvalues"][step] - reference).abs() / reference.abs()).max().item()
            assert relative < 1e-2, (stage, step, relative)
    assert S.rel_err(pair[0]["params"], single["params"]) < 1e-4


@pytest.mark.timeout(600)
def test_loss_backward_outside_the_engine_without_a_model_loss_fails_at_the_first_step(runs: dict) -> None:
    message = ("LossNotFoundError: DHO2 sees no loss: the model output carries none and the loss did not pass "
               "through engine.backward(loss). Call engine.backward(loss) instead of loss.backward(), or return "
               "the loss from the model's forward.")
    for world in (1, 2):
        for rank in runs[world]:
            assert rank["bypass"] == message
