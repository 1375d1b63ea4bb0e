"""DHO2 inside real multi-process DeepSpeed (CPU, gloo): ZeRO-0/1/2 equality with single-process DHO2,
sharded state sizes, config-only registration, schedulers, clipping, accumulation, bf16, fp16 loss
scaling, checkpoint resume, world-size mismatch, two-node torchrun and ``ds-dho2 run``.

DeepSpeed's first ``initialize`` in a process costs seconds (process group + shm op); later ones are
instant, so each launch below runs many engines one after another and the tests check its parts. A part
that raises is recorded (not propagated), so one failure does not hide the others.
"""

from __future__ import annotations

import json
import re
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import ds_dho2  # noqa: F401 - registers "type": "DHO2" with DeepSpeed, also in every spawned rank
from tests.helpers import ds_setup as S
from tests.helpers.distributed import free_port, run_ranks

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
STEPS, GBS = 8, 8
K = S.EQ_PARAMS["rank"]
M = 16  # lanczos order of the interleaved runs

#: interleaved refresh: starts at step 2, one Lanczos iteration per step, finishes at step 2 + M - 1.
INTERLEAVED = {"lr": 1e-2, "rank": K, "lanczos_order": M, "refresh_interval": 20, "warmup_steps": 2,
               "hvp": "reverse", "curvature": {"mode": "interleaved", "iterations_per_step": 1, "batch_fraction": 1.0,
                             "back_off": False}}
INTERLEAVED_STEPS = 2 + M  # refresh finishes at step 17, one more step with the new basis
MID_REFRESH_STEP = 5

#: features run: WarmupLR scheduler, clipping and accumulation together, compared with a faithful
#: single-process run; config-only registration (no model_parameters, no client optimizer).
#: the product strategy is pinned: ``auto`` chooses by timing, and the reference (a separate process)
#: may time its candidates differently and take other (equally valid) products.
FEAT_PARAMS = {"lr": 1e-2, "rank": K, "refresh_interval": 3, "warmup_steps": 2, "hvp": "reverse",
               "curvature": {"back_off": False}}
FEAT_GBS, FEAT_GAS, FEAT_CLIP = 16, 2, 0.05
WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 4,
                                         "warmup_type": "linear"}}

#: checkpoint runs
CKPT_STEPS = 10
CKPT_BLOCKING_AT = 4  # after the refresh at step 2, before the one at 5 (its Lanczos seed uses the counter)
CKPT_INTERLEAVED = {"lr": 1e-2, "rank": K, "lanczos_order": 8, "refresh_interval": 10, "warmup_steps": 2,
                    "curvature": {"mode": "interleaved", "iterations_per_step": 1, "back_off": False}}
CKPT_INTERLEAVED_AT = 5  # mid-refresh: Lanczos basis in flight (steps 2..9)
ZERO0_STEPS, ZERO0_AT = 6, 3


#: other set-ups DHO2 rejects inside deepspeed.initialize: name -> (config, words the message must contain)
UNSUPPORTED_MESSAGES = {
    "offload": "offload", "elastic": "elastic_checkpoint", "zero0_bf16": "stage 0 supports fp32 only",
    "bf16_optimizer": "grad_accum_dtype",
}
UNSUPPORTED = {
    "offload": S.ds_config(2, S.EQ_PARAMS, 4, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}),
    "elastic": S.ds_config(2, S.EQ_PARAMS, 4, zero_optimization={"stage": 2, "elastic_checkpoint": True}),
    "zero0_bf16": S.ds_config(0, S.EQ_PARAMS, 4, bf16={"enabled": True}),
    "bf16_optimizer": S.ds_config(1, S.EQ_PARAMS, 4, bf16={"enabled": True},
                                  data_types={"grad_accum_dtype": "fp32"}),
}


# ------------------------------------------------------------------------------------------- workers
def _part(out: dict, name: str, fn: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        out[name] = fn()
    except BaseException:  # noqa: BLE001 - recorded, checked by the test for this part
        out[name] = {"error": traceback.format_exc()}
    out.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 2)


def _curvature(opt: Any) -> Any:
    return opt.tracker.state


def _train(engine: Any, rank: int, world: int, data: list, *, gas: int = 1, scale_at: dict | None = None,
           on_step: Callable[[int], None] | None = None, save: Callable[[int], None] | None = None,
           start: int = 0) -> list[float]:
    losses = []
    for step in range(start, len(data)):
        for x, y in S.batch_micro(data[step], gas):
            xs, ys = S.shard((x, y), rank, world)
            loss = engine(xs, ys, (scale_at or {}).get(step, 1.0))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step)
        if save is not None:
            save(step + 1)
    return losses


def _summary(engine: Any, model: torch.nn.Module) -> dict:
    opt = engine.basic_optimizer
    zero = engine.optimizer
    partition = opt.param_groups[0]["params"][0]
    vectors = opt.local_eigenvectors
    padding = int(zero.groups_padding[0]) if hasattr(zero, "groups_padding") else 0
    valid = partition.numel() - padding if engine.zero_optimization_stage() > 0 else vectors.shape[1]
    return {
        "params": S.flat_params(model), "eigenvalues": opt.eigenvalues.clone(),
        "eigvec_shape": tuple(vectors.shape), "partition_numel": partition.numel(), "padding": padding,
        "valid_numel": valid, "padding_eigvec_absmax": float(vectors[:, valid:].abs().max()) if padding else 0.0,
        "basic": type(opt).__name__, "wrapper": type(zero).__name__,
        "refresh_count": _curvature(opt).refresh_count,
    }


def _equality_run(rank: int, world: int, stage: int) -> dict:
    import deepspeed

    model = S.LossModel()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=S.ds_config(stage, S.EQ_PARAMS, GBS // world))
    history = []
    _train(engine, rank, world, S.batches(STEPS, GBS),
           on_step=lambda s: history.append(None if engine.basic_optimizer.eigenvalues is None
                                            else engine.basic_optimizer.eigenvalues.clone()))
    return {**_summary(engine, model), "eig_history": history}


def _interleaved_run(rank: int, world: int) -> dict:
    import deepspeed

    model = S.LossModel()
    engine, *_ = deepspeed.initialize(model=model, config=S.ds_config(2, INTERLEAVED, GBS // world))
    opt = engine.basic_optimizer
    seen: dict = {}

    def on_step(step: int) -> None:
        if step + 1 == MID_REFRESH_STEP:
            basis = opt.local_lanczos_basis
            seen["basis_shape"] = None if basis is None else tuple(basis.shape)
            seen["basis_dtype"] = None if basis is None else str(basis.dtype)
            seen["eigenvalues_mid"] = opt.eigenvalues

    _train(engine, rank, world, S.batches(INTERLEAVED_STEPS, GBS), on_step=on_step)
    return {**seen, **_summary(engine, model), "basis_after": opt.local_lanczos_basis}


def equality_worker(rank: int, world: int, stages: tuple[int, ...]) -> dict:
    out: dict = {}
    for stage in stages:
        _part(out, f"zero{stage}", lambda stage=stage: _equality_run(rank, world, stage))
    _part(out, "interleaved", lambda: _interleaved_run(rank, world))
    return out


def _features_run(rank: int, world: int) -> dict:
    import deepspeed

    model = S.LossModel()
    cfg = S.ds_config(2, FEAT_PARAMS, FEAT_GBS // (world * FEAT_GAS), gradient_accumulation_steps=FEAT_GAS,
                      gradient_clipping=FEAT_CLIP, scheduler=WARMUP)
    engine, _, _, scheduler = deepspeed.initialize(model=model, config=cfg)  # no model_parameters either
    opt = engine.basic_optimizer
    lrs, sq_norms = [], []

    def pre_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        lrs.append(optimizer.param_groups[0]["lr"])
        sq_norms.append(float(optimizer.param_groups[0]["params"][0].grad.double().pow(2).sum()))

    opt.register_step_pre_hook(pre_hook)
    _train(engine, rank, world, S.batches(STEPS, FEAT_GBS), gas=FEAT_GAS)
    return {**_summary(engine, model), "lrs": lrs, "sq_norms": sq_norms, "scheduler": type(scheduler).__name__,
            "allow_untested": bool(engine.zero_allow_untested_optimizer()),
            "engine_steps": engine.global_steps}


def _init_error(config: dict) -> dict:
    import deepspeed

    from ds_dho2.config import ConfigError
    from ds_dho2.integrations.deepspeed import UnsupportedDeepSpeedSetup

    try:
        deepspeed.initialize(model=S.LossModel(), config=config)
    except Exception as error:  # noqa: BLE001
        return {"type": type(error).__name__, "message": str(error),
                "config_error": isinstance(error, ConfigError),
                "unsupported": isinstance(error, UnsupportedDeepSpeedSetup)}
    return {"type": None, "message": ""}


def _bf16_run(rank: int, world: int) -> dict:
    import deepspeed

    from ds_dho2.integrations.deepspeed import load_config

    cfg = S.keep_curvature(load_config(ROOT / "ds_configs" / "dho2_zero2_bf16.json", train_micro_batch_size_per_gpu=8,
                                       lr=1e-2, rank=K, refresh_interval=10, warmup_steps=5))
    model = S.LossModel()
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    eig = []
    losses = _train(engine, rank, world, S.batches(30, 8 * world, seed=7),
                    on_step=lambda s: eig.append(engine.basic_optimizer.eigenvalues is not None))
    return {**_summary(engine, model), "losses": losses, "eig_present": eig,
            "param_dtype": str(next(model.parameters()).dtype),
            "finite": bool(torch.isfinite(S.flat_params(model)).all())}


def _fp16_run(rank: int, world: int) -> dict:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        # This CPU lacks the mkldnn fp16 capability bit, but plain torch fp16 ops run on CPU: override the
        # capability report so DeepSpeed builds its real ZeRO fp16 path with dynamic loss scaling.
        supported = accelerator.supported_dtypes
        accelerator.is_fp16_supported = lambda: True
        accelerator.supported_dtypes = lambda: list({*supported(), torch.half})
    cfg = S.ds_config(2, S.EQ_PARAMS, 4, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1,
                                               "loss_scale_window": 1000})
    model = S.LossModel()
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    opt = engine.basic_optimizer
    record = []

    def on_step(step: int) -> None:
        record.append({"dho2_step": opt.steps, "refresh_count": _curvature(opt).refresh_count,
                       "scale": float(engine.optimizer.cur_scale), "skipped": int(engine.skipped_steps),
                       "finite": bool(torch.isfinite(S.flat_params(model)).all())})

    losses = _train(engine, rank, world, S.batches(12, 4 * world), scale_at={4: 1e30}, on_step=on_step)
    return {"record": record, "losses": losses, "param_dtype": str(next(model.parameters()).dtype),
            "wrapper": type(engine.optimizer).__name__, "eigenvalues": opt.eigenvalues}


def _checkpoint_runs(rank: int, world: int, ckpt_dir: str) -> dict:
    import deepspeed

    out = {}
    for name, params, at in (("blocking", S.EQ_PARAMS, CKPT_BLOCKING_AT),
                             ("interleaved", CKPT_INTERLEAVED, CKPT_INTERLEAVED_AT)):
        data = S.batches(CKPT_STEPS, GBS, seed=3)
        path = os.path.join(ckpt_dir, name)
        model = S.LossModel()
        engine, *_ = deepspeed.initialize(model=model, config=S.ds_config(2, params, GBS // world))
        saved: dict = {}

        def save(step: int, engine: Any = engine, path: str = path, saved: dict = saved, at: int = at) -> None:
            if step == at:
                engine.save_checkpoint(path, tag=f"step{step}")
                curvature = _curvature(engine.basic_optimizer)
                saved.update(refresh_count=curvature.refresh_count, in_flight=curvature.lanczos is not None)

        _train(engine, rank, world, data, save=save)
        full = S.flat_params(model)
        resumed_model = S.LossModel(seed=123)  # different init: the checkpoint must overwrite it
        resumed, *_ = deepspeed.initialize(model=resumed_model, config=S.ds_config(2, params, GBS // world))
        resumed.load_checkpoint(path, tag=f"step{at}")
        curvature = _curvature(resumed.basic_optimizer)
        loaded = {"refresh_count": curvature.refresh_count, "in_flight": curvature.lanczos is not None,
                  "dho2_step": resumed.basic_optimizer.steps, "global_steps": resumed.global_steps}
        _train(resumed, rank, world, data, start=at)
        out[name] = {"full": full, "resumed": S.flat_params(resumed_model), "saved": saved, "loaded": loaded,
                     "final_refresh_count": _curvature(resumed.basic_optimizer).refresh_count}
    # ZeRO-0 checkpoint for the W=1 resume
    data = S.batches(ZERO0_STEPS, GBS, seed=5)
    model = S.LossModel()
    engine, *_ = deepspeed.initialize(model=model, config=S.ds_config(0, S.EQ_PARAMS, GBS // world))
    _train(engine, rank, world, data, save=lambda s: s == ZERO0_AT and engine.save_checkpoint(
        os.path.join(ckpt_dir, "zero0"), tag="ckpt"))
    out["zero0_full"] = S.flat_params(model)
    return out


def w2_worker(rank: int, world: int, ckpt_dir: str) -> dict:
    out = equality_worker(rank, world, (0, 1, 2))
    _part(out, "features", lambda: _features_run(rank, world))
    _part(out, "bad_rnk", lambda: _init_error(S.ds_config(2, {"rnk": 4}, 4)))
    _part(out, "bad_rank0", lambda: _init_error(S.ds_config(2, {"rank": 0}, 4)))
    _part(out, "zero3", lambda: _init_error(S.ds_config(3, S.EQ_PARAMS, 4)))  # EQ_PARAMS pins hvp='reverse'
    for name, cfg in UNSUPPORTED.items():
        _part(out, name, lambda cfg=cfg: _init_error(cfg))
    _part(out, "checkpoint", lambda: _checkpoint_runs(rank, world, ckpt_dir))
    _part(out, "bf16", lambda: _bf16_run(rank, world))
    _part(out, "fp16", lambda: _fp16_run(rank, world))  # last: it patches the accelerator
    return out


def w1_worker(rank: int, world: int, ckpt_dir: str) -> dict:
    import deepspeed

    out: dict = {}

    def zero2_at_w1() -> dict:
        engine, *_ = deepspeed.initialize(model=S.LossModel(), config=S.ds_config(2, S.EQ_PARAMS, GBS))
        try:
            engine.load_checkpoint(os.path.join(ckpt_dir, "blocking"), tag=f"step{CKPT_BLOCKING_AT}")
        except Exception as error:  # noqa: BLE001
            return {"type": type(error).__name__, "message": str(error)}
        return {"type": None}

    def zero0_at_w1() -> dict:
        model = S.LossModel(seed=123)
        engine, *_ = deepspeed.initialize(model=model, config=S.ds_config(0, S.EQ_PARAMS, GBS))
        engine.load_checkpoint(os.path.join(ckpt_dir, "zero0"), tag="ckpt")
        _train(engine, 0, 1, S.batches(ZERO0_STEPS, GBS, seed=5), start=ZERO0_AT)
        return {"params": S.flat_params(model)}

    _part(out, "zero2", zero2_at_w1)
    _part(out, "zero0", zero0_at_w1)
    return out


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reference() -> dict:
    return S.single_process_run(STEPS, GBS, S.EQ_PARAMS)


@pytest.fixture(scope="module")
def w2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    ckpt = tmp_path_factory.mktemp("ds_ckpt")
    return {"ranks": run_ranks(w2_worker, 2, str(ckpt), timeout=420), "ckpt": str(ckpt)}


@pytest.fixture(scope="module")
def w4() -> list:
    return run_ranks(equality_worker, 4, (1, 2), timeout=420)


def _ok(result: dict) -> dict:
    if isinstance(result, dict) and "error" in result and len(result) == 1:
        pytest.fail(result["error"])
    return result


# --------------------------------------------------------------------------------------------- tests
def _check_equality(ranks: list, key: str, reference: dict, world: int) -> None:
    parts = [_ok(r[key]) for r in ranks]
    for part in parts:
        assert part["basic"] == "DHO2"
        assert S.rel_err(part["params"], reference["params"]) < 1e-5, key
        assert S.rel_err(part["eigenvalues"], reference["eigenvalues"]) < 1e-3, key
        for mine, ref in zip(part["eig_history"], reference["eig_history"]):
            assert (mine is None) == (ref is None)
            if ref is not None:
                assert S.rel_err(mine, ref) < 1e-3
        assert part["refresh_count"] == 3  # steps 2, 5, 8
    assert torch.equal(parts[0]["eigenvalues"], parts[-1]["eigenvalues"])  # replicated
    stage = int(key[-1])
    single_numel = reference["eigvec_numel"]
    assert single_numel == K * S.NUM_PARAMS
    if stage == 0:
        for part in parts:
            assert part["wrapper"] == "DHO2" and part["eigvec_shape"] == (K, S.NUM_PARAMS)
        return
    partition = parts[0]["partition_numel"]
    assert partition == math.ceil(S.NUM_PARAMS / (2 * world)) * 2 * world // world
    for r, part in enumerate(parts):
        assert part["wrapper"] == "DeepSpeedZeroOptimizer"
        assert part["partition_numel"] == partition
        assert part["eigvec_shape"] == (K, partition)  # k x P_r
    paddings = [part["padding"] for part in parts]
    assert paddings[:-1] == [0] * (world - 1) and paddings[-1] > 0, paddings  # padding on the last rank
    assert parts[-1]["padding_eigvec_absmax"] == 0.0
    assert sum(K * part["valid_numel"] for part in parts) == single_numel


@pytest.mark.timeout(480)
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_w2_matches_single_process(w2: dict, reference: dict, stage: int) -> None:
    _check_equality(w2["ranks"], f"zero{stage}", reference, 2)


@pytest.mark.timeout(480)
@pytest.mark.parametrize("stage", [1, 2])
def test_w4_matches_single_process(w4: list, reference: dict, stage: int) -> None:
    _check_equality(w4, f"zero{stage}", reference, 4)


def _check_interleaved(ranks: list, world: int) -> None:
    reference = S.single_process_run(INTERLEAVED_STEPS, GBS, INTERLEAVED)
    parts = [_ok(r["interleaved"]) for r in ranks]
    partition = parts[0]["partition_numel"]
    for part in parts:
        assert part["basis_shape"] == (M, partition)  # m x P_r, mid-refresh
        assert part["basis_dtype"] == "torch.float32"  # the default lanczos_dtype
        assert part["eigenvalues_mid"] is None  # still base optimizer until the swap
        assert part["basis_after"] is None  # finished and freed
        assert part["eigvec_shape"] == (K, partition)
        assert S.rel_err(part["eigenvalues"], reference["eigenvalues"]) < 1e-3
        assert S.rel_err(part["params"], reference["params"]) < 1e-5
    assert sum(M * part["valid_numel"] for part in parts) == M * S.NUM_PARAMS


@pytest.mark.timeout(480)
def test_w2_interleaved_lanczos_basis_is_sharded(w2: dict) -> None:
    _check_interleaved(w2["ranks"], 2)


@pytest.mark.timeout(480)
def test_w4_interleaved_lanczos_basis_is_sharded(w4: list) -> None:
    _check_interleaved(w4, 4)


@pytest.mark.timeout(480)
def test_config_only_registration_scheduler_clipping_accumulation(w2: dict) -> None:
    parts = [_ok(r["features"]) for r in w2["ranks"]]
    lrs = parts[0]["lrs"]
    reference = S.single_process_run(STEPS, FEAT_GBS, FEAT_PARAMS, clip=FEAT_CLIP, lr_schedule=lambda s: lrs[s],
                                     accumulation=FEAT_GAS)
    for part in parts:
        assert part["basic"] == "DHO2" and part["wrapper"] == "DeepSpeedZeroOptimizer"
        assert part["allow_untested"] is False
        assert part["scheduler"] == "WarmupLR"
        assert part["lrs"] == lrs
        assert part["engine_steps"] == STEPS  # accumulation: one optimizer step per 2 micro-batches
    # WarmupLR wrote DHO2's group lr: min_lr at init and after its first step (iteration 0), then a linear
    # warm-up to 1e-2 over 4 iterations, then flat.
    assert lrs == pytest.approx([0.0, 0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2]), lrs
    # the gradient DHO2 saw was clipped to the global norm FEAT_CLIP whenever the raw norm exceeded it
    seen = [math.sqrt(sum(p["sq_norms"][i] for p in parts)) for i in range(STEPS)]
    raw = reference["pre_clip_norms"]
    assert max(raw) > 2 * FEAT_CLIP
    for mine, before in zip(seen, raw):
        assert mine == pytest.approx(min(before, FEAT_CLIP), rel=1e-4)
    # and the whole trajectory (scheduled lr, clipped grads, curvature on the last micro-batch) matches
    for part in parts:
        assert S.rel_err(part["params"], reference["params"]) < 1e-5
        assert S.rel_err(part["eigenvalues"], reference["eigenvalues"]) < 1e-3


def test_first_micro_batch_curvature_would_differ() -> None:
    """Guards the accumulation check above: curvature from another micro-batch gives other eigenvalues."""
    last = S.single_process_run(3, FEAT_GBS, FEAT_PARAMS, accumulation=FEAT_GAS)
    data = S.batches(3, FEAT_GBS)
    swapped = [(torch.cat(x.chunk(2)[::-1]), torch.cat(y.chunk(2)[::-1])) for x, y in data]
    import ds_dho2

    model = S.LossModel()
    opt = ds_dho2.DHO2(model.parameters(), **FEAT_PARAMS).attach(model)
    for x, y in swapped:
        opt.zero_grad()
        for xm, ym in S.batch_micro((x, y), FEAT_GAS):
            (model(xm, ym) / FEAT_GAS).backward()
        opt.step()
    assert S.rel_err(opt.eigenvalues, last["eigenvalues"]) > 1e-3


@pytest.mark.timeout(480)
def test_bad_params_and_exact_products_under_zero3_fail_at_initialize(w2: dict) -> None:
    for r in w2["ranks"]:
        rnk, rank0, zero3 = _ok(r["bad_rnk"]), _ok(r["bad_rank0"]), _ok(r["zero3"])
        assert rnk["type"] == "ConfigError" and rnk["config_error"]
        assert "'rnk'" in rnk["message"] and "Allowed keys" in rnk["message"] and "rank" in rnk["message"]
        assert rank0["type"] == "ConfigError" and "rank=0" in rank0["message"]
        assert "integer >= 1" in rank0["message"]
        assert zero3["type"] == "UnsupportedDeepSpeedSetup" and zero3["unsupported"]
        assert zero3["message"] == ("DHO2 hvp='reverse' needs each rank's full parameters, which ZeRO-3 never holds; "
                                    "under ZeRO-3 DHO2 takes products by finite differences. Set hvp to 'auto' or "
                                    "'finite_difference'.")
        for name, words in UNSUPPORTED_MESSAGES.items():
            error = _ok(r[name])
            assert error["type"] == "UnsupportedDeepSpeedSetup", (name, error)
            assert words in error["message"], (name, error["message"])


@pytest.mark.timeout(480)
def test_bf16_zero2_trains_and_refreshes(w2: dict) -> None:
    for r in w2["ranks"]:
        part = _ok(r["bf16"])
        assert part["param_dtype"] == "torch.bfloat16" and part["wrapper"] == "DeepSpeedZeroOptimizer"
        assert part["finite"]
        losses = part["losses"]
        assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
        assert part["eig_present"][4:] == [True] * 26 and not any(part["eig_present"][:4])
        assert part["refresh_count"] == 3  # steps 5, 15, 25
        assert torch.isfinite(part["eigenvalues"]).all()


@pytest.mark.timeout(480)
def test_fp16_overflow_step_is_skipped_by_dho2(w2: dict) -> None:
    parts = [r["fp16"] for r in w2["ranks"]]
    platform_errors = ("is not supported on your device", "not implemented for 'Half'")
    if ("error" in parts[0] and len(parts[0]) == 1 and not torch.cuda.is_available()
            and any(message in parts[0]["error"] for message in platform_errors)):
        # Only a platform limit (no fp16 kernels on this CPU build) skips; any other error fails below.
        pytest.skip("fp16 cannot run on this CPU even with the accelerator capability override:\n"
                    + parts[0]["error"])
    for part in parts:
        part = _ok(part)
        assert part["param_dtype"] == "torch.float16" and part["wrapper"] == "DeepSpeedZeroOptimizer"
        record = part["record"]
        steps = [entry["dho2_step"] for entry in record]
        assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11]  # the overflow step (index 4) was skipped
        assert record[4]["skipped"] == record[3]["skipped"] + 1
        assert record[4]["scale"] == record[3]["scale"] / 2  # dynamic loss scale backed off
        assert all(entry["finite"] for entry in record)
        counts = [entry["refresh_count"] for entry in record]
        assert counts[-1] > counts[4] and counts[-1] == 4  # refreshes at DHO2 steps 2, 5, 8, 11
        assert part["eigenvalues"] is not None and torch.isfinite(part["eigenvalues"]).all()
        assert all(math.isfinite(loss) for i, loss in enumerate(part["losses"]) if i != 4)


@pytest.mark.timeout(480)
@pytest.mark.parametrize("case", ["blocking", "interleaved"])
def test_checkpoint_resume_equals_uninterrupted(w2: dict, case: str) -> None:
    for r in w2["ranks"]:
        part = _ok(r["checkpoint"])[case]
        assert part["loaded"]["refresh_count"] == part["saved"]["refresh_count"]
        assert part["loaded"]["in_flight"] == part["saved"]["in_flight"] == (case == "interleaved")
        assert part["loaded"]["global_steps"] == (CKPT_BLOCKING_AT if case == "blocking" else CKPT_INTERLEAVED_AT)
        assert part["loaded"]["dho2_step"] == part["loaded"]["global_steps"]
        if case == "blocking":
            assert part["saved"]["refresh_count"] == 1 and part["final_refresh_count"] == 3
        else:
            assert part["final_refresh_count"] == 1  # the in-flight refresh finished after the resume
        assert torch.equal(part["resumed"], part["full"]), S.rel_err(part["resumed"], part["full"])


@pytest.fixture(scope="module")
def w1(w2: dict) -> dict:
    return run_ranks(w1_worker, 1, w2["ckpt"], timeout=300)[0]


@pytest.mark.timeout(480)
def test_w2_zero2_checkpoint_at_w1_fails_clearly(w1: dict) -> None:
    part = _ok(w1["zero2"])
    assert part["type"] == "CheckpointFormatError", part
    assert part["message"] == (
        "DHO2 cannot load this checkpoint at world size 1: it was saved at world size 2, and its optimizer state "
        "(base moments and curvature) is partitioned per rank. Convert it with 'ds-dho2 to-universal INPUT_FOLDER "
        "OUTPUT_FOLDER' and load the result with \"checkpoint\": {\"load_universal\": true}, or resume at world "
        "size 2.")


@pytest.mark.timeout(480)
def test_w2_zero0_checkpoint_resumes_at_w1(w1: dict, w2: dict) -> None:
    """ZeRO-0 state is replicated (bind_replicated, world_size 1 layout), so W=2 -> W=1 is valid and the
    W=1 continuation on the same global batches reproduces the W=2 run."""
    part = _ok(w1["zero0"])
    full = _ok(w2["ranks"][0]["checkpoint"])["zero0_full"]
    assert S.rel_err(part["params"], full) < 1e-5


# ------------------------------------------------------------------------------------- launcher tests
def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None)
    return env


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.timeout(300)
def test_two_simulated_nodes_torchrun() -> None:
    port = free_port()
    procs = [subprocess.Popen([*_torchrun(), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(SCRIPTS / "two_node_train.py")],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(out)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    lines = [next(line for line in out.splitlines() if line.startswith("CHECKSUM")) for out in outputs]
    fields = [dict(item.split("=", 1) for item in line.split()[1:]) for line in lines]
    assert sorted(f["rank"] for f in fields) == ["0", "1"]
    assert all(f["world"] == "2" and f["optimizer"] == "DHO2" and f["refreshes"] == "2" for f in fields)
    assert fields[0]["value"] == fields[1]["value"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_ds_dho2_run_unmodified_deepspeed_script(tmp_path: Path, launcher: str) -> None:
    from ds_dho2.integrations.deepspeed import load_config

    config = S.keep_curvature(load_config(ROOT / "ds_configs" / "dho2_zero2.json", train_micro_batch_size_per_gpu=4,
                                          lr=1e-2, rank=2, refresh_interval=2, warmup_steps=2))
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    exe = shutil.which("ds-dho2", path=os.path.dirname(sys.executable))
    assert exe, "the ds-dho2 console script must be installed next to the interpreter"
    if launcher == "torchrun":
        command = [*_torchrun(), "--nproc_per_node", "2", "--master_port", str(free_port()), "--no-python", exe]
    else:  # the deepspeed launcher adds --local_rank=N after the program; ds-dho2 hands it to the script
        deepspeed_launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
        command = [deepspeed_launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--no_python", exe]
    proc = subprocess.run([*command, "run", str(SCRIPTS / "plain_deepspeed_train.py"), str(path)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Both ranks print to the same pipe, so their lines may interleave: count reports, not lines.
    reports = re.findall(r"BASIC_OPTIMIZER=(\S+) rank=(\d) curvature=(\S+)", out)
    assert sorted(reports) == [("DHO2", "0", "True"), ("DHO2", "1", "True")], out[-4000:]


# ------------------------------------------------------------------------------------------ load_config
def test_ds_configs_are_complete_and_load() -> None:
    from ds_dho2.config import DHO2Config
    from ds_dho2.integrations.deepspeed import AUTO_DEFAULTS, load_config

    names = {"dho2_zero0.json": 0, "dho2_zero1.json": 1, "dho2_zero2.json": 2, "dho2_zero2_bf16.json": 2,
             "dho2_zero3.json": 3, "dho2_zero3_bf16.json": 3}
    hf_auto = {"lr", "betas", "eps", "weight_decay"}
    for name, stage in names.items():
        raw = json.loads((ROOT / "ds_configs" / name).read_text())
        assert raw["optimizer"]["type"] == "DHO2"
        params = raw["optimizer"]["params"]
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert raw[key] == "auto"
        assert {k for k, v in params.items() if v == "auto"} == hf_auto  # no "auto" in DHO2-specific keys
        # the shipped configs carry the library's measured defaults, so a user of either gets the same run
        defaults = DHO2Config()
        assert (params["rank"], params["refresh_interval"], params["warmup_steps"], params["alpha"]) == (
            defaults.rank, defaults.refresh_interval, defaults.warmup_steps, defaults.alpha) == (4, 50, 50, 0.1)
        assert params["curvature"]["batch_fraction"] == defaults.curvature.batch_fraction
        assert params["admm"]["enabled"] is defaults.admm.enabled is False
        assert params["admm"]["extrapolation"] == defaults.admm.extrapolation.value == "checked"
        assert raw["zero_optimization"]["stage"] == stage
        assert raw.get("bf16", {}).get("enabled", False) == name.endswith("bf16.json")
        resolved = load_config(ROOT / "ds_configs" / name)
        assert "train_batch_size" not in resolved
        assert resolved["train_micro_batch_size_per_gpu"] == AUTO_DEFAULTS["train_micro_batch_size_per_gpu"] == 8
        assert resolved["gradient_accumulation_steps"] == 1 and resolved["gradient_clipping"] == 1.0
        rp = resolved["optimizer"]["params"]
        assert (rp["lr"], rp["betas"], rp["eps"], rp["weight_decay"]) == (1e-3, [0.9, 0.999], 1e-8, 0.0)
        DHO2Config.from_dict(rp)  # every key valid
        assert "auto" not in json.dumps(resolved).replace('"hvp"', "")


def test_recommended_configs_carry_the_configuration_the_regime_map_measured_best() -> None:
    """``dho2_{autoencoder,classifier,lm_finetune}.json`` (docs/benchmarks.md, "Recommended configurations"):
    DHO2 at its defaults with the curvature back-off on, ZeRO-2; the LM fine-tune in bf16. Each resolves to
    a valid DHO2 configuration whose choices equal the library defaults the map raced."""
    from ds_dho2.config import DHO2Config
    from ds_dho2.integrations.deepspeed import load_config

    defaults = DHO2Config()
    for name, bf16 in (("dho2_autoencoder.json", False), ("dho2_classifier.json", False),
                       ("dho2_lm_finetune.json", True)):
        raw = json.loads((ROOT / "ds_configs" / name).read_text())
        assert raw["optimizer"]["type"] == "DHO2" and raw["zero_optimization"]["stage"] == 2
        assert raw.get("bf16", {}).get("enabled", False) is bf16
        resolved = DHO2Config.from_dict(load_config(ROOT / "ds_configs" / name)["optimizer"]["params"])
        assert resolved.curvature.back_off is True and resolved.curvature.payoff_share == defaults.curvature.payoff_share
        for key in ("base", "rank", "refresh_interval", "warmup_steps", "alpha", "lr_clip", "newton_max_ratio"):
            assert getattr(resolved, key) == getattr(defaults, key), (name, key)


def test_load_config_overrides_and_errors(tmp_path: Path) -> None:
    from ds_dho2.integrations.deepspeed import load_config

    cfg = load_config(ROOT / "ds_configs" / "dho2_zero2.json", lr=0.5, rank=3, gradient_clipping=0.0,
                      train_batch_size=32)
    assert cfg["optimizer"]["params"]["lr"] == 0.5 and cfg["optimizer"]["params"]["rank"] == 3
    assert cfg["gradient_clipping"] == 0.0 and cfg["train_batch_size"] == 32
    raw = json.loads((ROOT / "ds_configs" / "dho2_zero2.json").read_text())
    raw["optimizer"]["params"]["hvp"] = "auto"
    with pytest.raises(ValueError, match=r"optimizer\.params\.hvp.*omit the key"):
        load_config(raw)
    raw["optimizer"]["params"].pop("hvp")
    raw["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(ValueError, match=r"zero_optimization\.reduce_bucket_size"):
        load_config(raw)
    with pytest.raises(ValueError, match="no optimizer.params"):
        load_config({"zero_optimization": {"stage": 0}}, lr=1.0)
