"""DHO2 under DeepSpeed ZeRO-3 (CPU, gloo): curvature on partitioned parameters.

One W=2 launch runs the parts below one after another (a failing part is recorded, not raised), a W=1
and a W=4 launch give the same run's eigenvalues at other world sizes, and a second W=1 launch resumes
the W=2 checkpoints. Stage 3 is compared with stage 2 on the same run (products by finite differences in
both, so the only difference is where the parameters live).
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import ds_dho2  # noqa: F401 - registers "type": "DHO2" with DeepSpeed, also in every spawned rank
from tests.helpers import ds_setup as S
from tests.helpers.distributed import run_ranks

pytestmark = pytest.mark.distributed

STEPS, GBS = 10, 8
#: blocking refreshes at 2, 5 and 8 on the whole micro-batch, finite-difference products in every stage
FD = dict(S.EQ_PARAMS, hvp="finite_difference")
#: interleaved refresh in flight at the checkpoint (steps 2..7)
CKPT_PARAMS = dict(FD, lanczos_order=6, refresh_interval=10, curvature={"mode": "interleaved", "iterations_per_step": 1,
                                                                        "batch_fraction": 1.0})
CKPT_AT = 4


def _part(out: dict, name: str, fn: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        out[name] = fn()
    except BaseException:  # noqa: BLE001 - recorded, checked by the test for this part
        out[name] = {"error": traceback.format_exc()}
    out.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 2)


def _ok(part: dict) -> dict:
    assert "error" not in part, part.get("error")
    return part


def _engine(stage: int, params: dict, world: int, *, model: torch.nn.Module | None = None, **extra: Any) -> Any:
    import deepspeed

    model = S.LossModel() if model is None else model
    config = S.ds_config(stage, params, GBS // world // extra.get("gradient_accumulation_steps", 1), **extra)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _train(engine: Any, rank: int, world: int, data: list, *, gas: int = 1, start: int = 0,
           loss_of: Callable | None = None, after: Callable[[int], None] | None = None) -> list[float]:
    losses = []
    for step in range(start, len(data)):
        for x, y in S.batch_micro(data[step], gas):
            xs, ys = S.shard((x, y), rank, world)
            loss = engine(xs, ys) if loss_of is None else loss_of(engine, xs, ys)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        if after is not None:
            after(step + 1)
    return losses


def _gathered(engine: Any) -> torch.Tensor:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return torch.cat([p.detach().float().reshape(-1).clone() for p in params])


def _run(stage: int, rank: int, world: int, params: dict = FD, **extra: Any) -> dict:
    engine = _engine(stage, params, world, **extra)
    losses = _train(engine, rank, world, S.batches(STEPS, GBS), gas=extra.get("gradient_accumulation_steps", 1))
    opt = engine.basic_optimizer
    return {"losses": losses, "eigenvalues": opt.eigenvalues.clone(), "params": _gathered(engine),
            "refreshes": opt.curvature_stats()["refresh_count"], "eigvec_shape": tuple(opt.local_eigenvectors.shape),
            "strategy": opt.curvature_stats().get("hvp_strategy")}


def _external_loss_run(stage: int, rank: int, world: int) -> dict:
    """A model that returns logits; the loop computes the loss with a criterion outside the model."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(S.IN_FEATURES, S.HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(S.HIDDEN, S.CLASSES))
    engine = _engine(stage, dict(FD, hvp="auto"), world, model=net)
    losses = _train(engine, rank, world, S.batches(STEPS, GBS),
                    loss_of=lambda e, x, y: torch.nn.functional.cross_entropy(e(x), y))
    opt = engine.basic_optimizer
    return {"losses": losses, "eigenvalues": opt.eigenvalues.clone(), "strategy": opt.curvature_stats()["hvp_strategy"]}


def _zero_init_run(rank: int, world: int) -> dict:
    import deepspeed

    config = S.ds_config(3, FD, GBS // world)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = S.LossModel()
    partitioned = all(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    losses = _train(engine, rank, world, S.batches(STEPS, GBS))
    return {"partitioned_at_construction": partitioned, "losses": losses,
            "eigenvalues": engine.basic_optimizer.eigenvalues.clone()}


def _undisturbed_run(rank: int, world: int) -> dict:
    """Snapshot ZeRO-3's gradient partition, buckets and parameters just before and after DHO2's products,
    which run inside ZeRO-3's step."""
    engine = _engine(3, FD, world)
    opt, zero = engine.basic_optimizer, engine.optimizer
    buffers = zero._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
    snapshots: list[dict] = []

    def snapshot() -> dict:
        params = zero.fp16_groups[0]
        return {"grad": zero.fp32_partitioned_groups_flat[0].grad.clone(),
                "fp32": zero.fp32_partitioned_groups_flat[0].detach().clone(),
                "slices": [p.ds_tensor.detach().clone() for p in params],
                "whole": [p.data.numel() for p in params], "status": [str(p.ds_status) for p in params],
                "param_grads": [p.grad is None for p in params],
                "buckets": {str(k): b.elements for k, b in zero.ipg_buckets.items()},
                "buffers": {k: v.clone() for k, v in buffers.items()}}

    advance = opt.tracker.advance

    def watched(step: int, inputs: Any) -> bool:
        due = opt.tracker.wants_products(step)
        before = snapshot() if due else None
        installed = advance(step, inputs)
        if due:
            snapshots.append({"step": step, "before": before, "after": snapshot(), "installed": installed})
        return installed

    opt.tracker.advance = watched
    _train(engine, rank, world, S.batches(6, GBS))
    return {"snapshots": snapshots}


def _checkpoint_runs(rank: int, world: int, root: str) -> dict:
    data = S.batches(STEPS, GBS, seed=3)
    engine = _engine(3, CKPT_PARAMS, world)
    saved: dict = {}

    def save(step: int) -> None:
        if step == CKPT_AT:
            engine.save_checkpoint(os.path.join(root, "regular"), tag="step4")
            saved.update(in_flight=engine.basic_optimizer.tracker.state.lanczos is not None,
                         params=_gathered(engine))

    _train(engine, rank, world, data, after=save)
    full = _gathered(engine)
    resumed = _engine(3, CKPT_PARAMS, world, model=S.LossModel(seed=123))
    resumed.load_checkpoint(os.path.join(root, "regular"), tag="step4")
    loaded = {"in_flight": resumed.basic_optimizer.tracker.state.lanczos is not None,
              "params": _gathered(resumed), "steps": resumed.basic_optimizer.steps}
    _train(resumed, rank, world, data, start=CKPT_AT)
    return {"full": full, "resumed": _gathered(resumed), "saved": saved, "loaded": loaded}


def w2_worker(rank: int, world: int, root: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out: dict = {}
    _part(out, "stage3", lambda: _run(3, rank, world))
    _part(out, "stage2", lambda: _run(2, rank, world))
    _part(out, "stage3_bf16", lambda: _run(3, rank, world, bf16={"enabled": True}))
    _part(out, "stage2_bf16", lambda: _run(2, rank, world, bf16={"enabled": True}))
    _part(out, "stage3_gas", lambda: _run(3, rank, world, gradient_accumulation_steps=2))
    _part(out, "external3", lambda: _external_loss_run(3, rank, world))
    _part(out, "external2", lambda: _external_loss_run(2, rank, world))
    _part(out, "zero_init", lambda: _zero_init_run(rank, world))
    _part(out, "undisturbed", lambda: _undisturbed_run(rank, world))
    _part(out, "checkpoint", lambda: _checkpoint_runs(rank, world, root))
    for name, extra, hvp in (("offload_param", {"offload_param": {"device": "cpu"}}, "auto"),
                             ("offload_optimizer", {"offload_optimizer": {"device": "cpu"}}, "auto"),
                             ("exact", {}, "reverse")):
        _part(out, name, lambda extra=extra, hvp=hvp: _refusal(world, extra, hvp))
    return out


def _refusal(world: int, zero_extra: dict, hvp: str) -> dict:
    try:
        _engine(3, dict(FD, hvp=hvp), world, zero_optimization={"stage": 3, **zero_extra})
    except Exception as error:  # noqa: BLE001 - the refusal under test
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": ""}


def eigen_worker(rank: int, world: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return _run(3, rank, world)


def w1_load_worker(rank: int, world: int, root: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out: dict = {}

    def regular_at_w1() -> dict:
        engine = _engine(3, CKPT_PARAMS, world)
        try:
            engine.load_checkpoint(os.path.join(root, "regular"), tag="step4")
        except Exception as error:  # noqa: BLE001 - the refusal under test
            return {"type": type(error).__name__, "message": str(error)}
        return {"type": None, "message": ""}

    def universal_at_w1() -> dict:
        engine = _engine(3, CKPT_PARAMS, world, model=S.LossModel(seed=123), checkpoint={"load_universal": True})
        engine.load_checkpoint(os.path.join(root, "regular"), tag="step4_universal")
        opt = engine.basic_optimizer
        loaded = {"in_flight": opt.tracker.state.lanczos is not None, "params": _gathered(engine),
                  "steps": opt.steps, "eigenvalues": None if opt.eigenvalues is None else opt.eigenvalues.clone()}
        _train(engine, rank, world, S.batches(STEPS, GBS, seed=3), start=CKPT_AT)
        return {"loaded": loaded, "final": _gathered(engine)}

    _part(out, "regular", regular_at_w1)
    _part(out, "universal", universal_at_w1)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from ds_dho2.integrations.universal import to_universal

    root = tmp_path_factory.mktemp("zero3")
    w2 = run_ranks(w2_worker, 2, str(root), timeout=600)
    summary = None
    if "error" not in w2[0]["checkpoint"]:
        summary = to_universal(root / "regular" / "step4", root / "regular" / "step4_universal", extract_workers=1,
                               merge_workers=1)
    return {"root": root, "w2": w2, "w1": run_ranks(eigen_worker, 1, timeout=300)[0],
            "w4": run_ranks(eigen_worker, 4, timeout=300), "summary": summary,
            "w1_load": run_ranks(w1_load_worker, 1, str(root), timeout=300)[0]}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return S.rel_err(a, b)


@pytest.mark.timeout(900)
def test_stage3_trains_from_the_json_entry_and_agrees_with_stage2(runs: dict) -> None:
    for rank in runs["w2"]:
        three, two = _ok(rank["stage3"]), _ok(rank["stage2"])
        assert three["refreshes"] == 3 and three["strategy"] == "finite_difference"
        assert three["eigvec_shape"][0] == 4 and three["eigvec_shape"][1] < S.NUM_PARAMS  # slices, not whole
        assert _rel(three["eigenvalues"], two["eigenvalues"]) < 0.01
        assert max(abs(a - b) for a, b in zip(three["losses"], two["losses"])) < 1e-3
        assert _rel(three["params"], two["params"]) < 1e-4


@pytest.mark.timeout(900)
def test_stage3_bf16_agrees_with_stage2_bf16(runs: dict) -> None:
    for rank in runs["w2"]:
        three, two = _ok(rank["stage3_bf16"]), _ok(rank["stage2_bf16"])
        assert three["refreshes"] == 3
        assert _rel(three["eigenvalues"], two["eigenvalues"]) < 0.05  # finite differences in bf16
        assert max(abs(a - b) for a, b in zip(three["losses"], two["losses"])) < 0.02


@pytest.mark.timeout(900)
def test_eigenvalues_do_not_depend_on_the_world_size_under_stage3(runs: dict) -> None:
    reference = runs["w1"]["eigenvalues"]
    assert _rel(_ok(runs["w2"][0]["stage3"])["eigenvalues"], reference) < 0.01
    for rank in runs["w4"]:
        assert _rel(rank["eigenvalues"], reference) < 0.01


@pytest.mark.timeout(900)
def test_gradient_accumulation_external_loss_and_zero_init_under_stage3(runs: dict) -> None:
    for rank in runs["w2"]:
        gas = _ok(rank["stage3_gas"])
        assert gas["refreshes"] == 3 and len(gas["losses"]) == 2 * STEPS
        external3, external2 = _ok(rank["external3"]), _ok(rank["external2"])
        assert external3["strategy"] == "finite_difference"  # the criterion is recorded and replayed
        assert _rel(external3["eigenvalues"], external2["eigenvalues"]) < 0.01
        init = _ok(rank["zero_init"])
        assert init["partitioned_at_construction"]
        assert _rel(init["eigenvalues"], _ok(rank["stage3"])["eigenvalues"]) < 1e-6


@pytest.mark.timeout(900)
def test_products_leave_zero3s_step_exactly_as_it_was(runs: dict) -> None:
    for rank in runs["w2"]:
        snapshots = _ok(rank["undisturbed"])["snapshots"]
        assert [s["step"] for s in snapshots] == [2, 5] and all(s["installed"] for s in snapshots)
        for shot in snapshots:
            before, after = shot["before"], shot["after"]
            assert torch.equal(before["grad"], after["grad"]) and torch.equal(before["fp32"], after["fp32"])
            assert all(torch.equal(a, b) for a, b in zip(before["slices"], after["slices"]))
            assert before["whole"] == after["whole"] and before["status"] == after["status"]
            assert before["param_grads"] == after["param_grads"] and before["buckets"] == after["buckets"]
            assert before["buffers"].keys() == after["buffers"].keys()
            assert all(torch.equal(before["buffers"][k], after["buffers"][k]) for k in before["buffers"])


@pytest.mark.timeout(900)
def test_stage3_checkpoint_resumes_exactly_mid_refresh_and_converts_for_zero_to_fp32(runs: dict) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for rank in runs["w2"]:
        part = _ok(rank["checkpoint"])
        assert part["saved"]["in_flight"] and part["loaded"]["in_flight"] and part["loaded"]["steps"] == CKPT_AT
        assert torch.equal(part["loaded"]["params"], part["saved"]["params"])
        assert torch.equal(part["resumed"], part["full"])
    state = get_fp32_state_dict_from_zero_checkpoint(str(runs["root"] / "regular"), tag="step4")
    flat = torch.cat([state[name].reshape(-1) for name, _ in S.LossModel().named_parameters()])
    assert torch.equal(flat, runs["w2"][0]["checkpoint"]["saved"]["params"])


@pytest.mark.timeout(900)
def test_stage3_checkpoint_at_another_world_size_universal_or_refused(runs: dict) -> None:
    regular = _ok(runs["w1_load"]["regular"])
    assert regular["type"] == "CheckpointFormatError" and "ds-dho2 to-universal" in regular["message"]
    assert "saved at world size 2" in regular["message"]
    summary = runs["summary"]
    assert summary is not None and summary["source_world_size"] == 2
    assert {"dho2_curvature_lanczos_basis_0", "exp_avg", "exp_avg_sq"} <= set(
        summary["dho2_entries"] + summary["base_entries"])
    universal = _ok(runs["w1_load"]["universal"])
    saved = runs["w2"][0]["checkpoint"]
    assert universal["loaded"]["in_flight"] and universal["loaded"]["steps"] == CKPT_AT
    assert torch.equal(universal["loaded"]["params"], saved["saved"]["params"])
    assert _rel(universal["final"], saved["full"]) < 1e-5  # the W=2 run, continued at W=1


@pytest.mark.timeout(900)
def test_unsupported_stage3_setups_are_refused_at_initialize(runs: dict) -> None:
    rank = runs["w2"][0]
    assert _ok(rank["offload_param"]) == {
        "type": "UnsupportedDeepSpeedSetup",
        "message": "DHO2 does not support ZeRO-3 parameter offload. DHO2 supports ZeRO stages 0 (fp32), 1, 2 and 3 "
                   "(fp32 and bf16) without offload. Remove zero_optimization.offload_param."}
    assert _ok(rank["offload_optimizer"])["message"].endswith("Remove zero_optimization.offload_optimizer.")
    assert "Set hvp to 'auto' or 'finite_difference'" in _ok(rank["exact"])["message"]


def test_stage3_configs_name_stage_3() -> None:
    import json

    root = Path(__file__).resolve().parents[2] / "ds_configs"
    for name in ("dho2_zero3.json", "dho2_zero3_bf16.json"):
        config = json.loads((root / name).read_text())
        assert config["zero_optimization"]["stage"] == 3 and config["optimizer"]["type"] == "DHO2"
