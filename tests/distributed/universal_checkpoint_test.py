"""Universal checkpoints (CPU, gloo, ZeRO-2): DHO2's state survives ``ds-dho2 to-universal`` and
``"checkpoint": {"load_universal": true}`` at another data-parallel world size, in both directions.

The model has 227 parameters, so the last partition ends in padding at W=1 (228) and W=2 (2 x 114). Two
runs are checkpointed mid-training:

* ``adamw``: blocking refreshes at steps 2, 5 and 8 and ADMM windows of 2 steps; saved at step 6, with an
  installed basis, Newton momentum and ADMM dual/anchor;
* ``heavyball``: a heavy-ball base, interleaved refreshes (one Lanczos iteration per step, float64 basis);
  saved at step 10, with an installed basis and the next refresh in flight.

Each is converted (the W=1 heavy-ball one through the ``ds-dho2 to-universal`` command), loaded at the
other world size into a differently initialised model, compared with the saved state (gathered over ranks)
and trained to the end, which must match the uninterrupted run. A checkpoint converted by DeepSpeed's own
converter is refused at load with a message naming ``ds-dho2 to-universal``; one rewritten in the nested
form of earlier ds_dho2 versions converts and loads like the current form.

Three launches: W=2 saves; W=1 loads the W=2 checkpoints and saves its own; W=2 loads the W=1 ones.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

import ds_dho2  # noqa: F401 - registers "type": "DHO2" with DeepSpeed, also in every spawned rank
from ds_dho2 import cli
from ds_dho2 import state_keys as K
from tests.helpers import ds_setup as S
from tests.helpers.distributed import run_ranks

pytestmark = pytest.mark.distributed

GBS = 8
ADAMW = {"lr": 1e-2, "rank": 4, "lanczos_order": 8, "refresh_interval": 3, "warmup_steps": 2, "weight_decay": 0.01,
         "hvp": "reverse", "curvature": {"batch_fraction": 1.0, "max_interval": 3},
         "admm": {"enabled": True, "rho": 0.2, "window": 2}}
HEAVYBALL = {"lr": 1e-2, "base": "heavyball", "rank": 3, "lanczos_order": 6, "refresh_interval": 6,
             "warmup_steps": 2, "hvp": "reverse", "lanczos_dtype": "float64",
             "curvature": {"mode": "interleaved", "iterations_per_step": 1, "batch_fraction": 1.0,
                           "tolerance": 1e-12, "max_interval": 6}}
#: name -> (DHO2 params, checkpoint step, total steps)
CASES = {"adamw": (ADAMW, 6, 10), "heavyball": (HEAVYBALL, 10, 14)}
COUNTERS = (K.REFRESH_COUNT, K.BASIS_VERSION, K.NEXT_REFRESH, K.INTERVAL, K.LAST_PRODUCTS_STEP,
            K.LANCZOS_STARTED_AT, K.HVP_STRATEGY, K.NEWTON_BASIS_VERSION)
STOCK_MESSAGE = (
    "DHO2 cannot resume from this universal checkpoint: it has no DHO2 curvature state (dho2_eigenvectors_0 and {} "
    "more entries are missing), which DeepSpeed's ds_to_universal drops. Convert the original DeepSpeed checkpoint "
    "with 'ds-dho2 to-universal INPUT_FOLDER OUTPUT_FOLDER' instead and load that.")


# ------------------------------------------------------------------------------------------- workers
def _engine(params: dict, world: int, *, universal: bool = False, stage: int = 2) -> tuple[Any, torch.nn.Module]:
    import deepspeed

    extra = {"checkpoint": {"load_universal": True}} if universal else {}
    model = S.LossModel(seed=123 if universal else 0)  # a loaded model must be overwritten by the checkpoint
    engine, *_ = deepspeed.initialize(model=model, config=S.ds_config(stage, params, GBS // world, **extra))
    return engine, model


def _train(engine: Any, rank: int, world: int, data: list, start: int, stop: int, at_step: Any = None) -> None:
    for step in range(start, stop):
        x, y = S.shard(data[step], rank, world)
        engine.backward(engine(x, y))
        engine.step()
        if at_step is not None:
            at_step(step + 1)


def _gather(local: torch.Tensor | None, world: int) -> torch.Tensor | None:
    """(..., P_r) slices of every rank -> (..., P): the unpadded global tensor."""
    import torch.distributed as dist

    if local is None:
        return None
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)[..., :S.NUM_PARAMS].clone()


def _snapshot(engine: Any, world: int) -> dict:
    opt = engine.basic_optimizer
    state = opt.state[opt.param_groups[0]["params"][0]]
    curvature = state[K.CURVATURE]
    run = curvature[K.LANCZOS]
    padding = int(engine.optimizer.groups_padding[0])
    base_key = K.EXP_AVG if K.EXP_AVG in state else K.MOMENTUM_BUFFER
    vectors = curvature[K.EIGENVECTORS]
    return {
        "eigenvectors": _gather(vectors, world), "eigenvalues": curvature[K.EIGENVALUES].clone(),
        "newton_momentum": curvature[K.NEWTON_MOMENTUM].clone(),
        "admm_dual": _gather(curvature[K.ADMM_DUAL], world), "admm_anchor": _gather(curvature[K.ADMM_ANCHOR], world),
        "base_moment": _gather(state[base_key], world),
        "lanczos_basis": None if run is None else _gather(run["basis"], world),
        "lanczos_dtype": None if run is None else str(run["basis"].dtype),
        "lanczos_scalars": None if run is None else copy.deepcopy({k: v for k, v in run.items()
                                                                   if not torch.is_tensor(v)}),
        "transition": None if curvature[K.TRANSITION] is None else curvature[K.TRANSITION].clone(),
        "counters": {key: curvature[key] for key in COUNTERS},
        "step": state[K.STEP], "applied_steps": float(state[K.APPLIED_STEPS]),
        "layout": (curvature[K.WORLD_SIZE], curvature[K.PARTITION_NUMEL], curvature[K.TOTAL_NUMEL]),
        "padding": padding,
        "padding_absmax": float(vectors[:, vectors.shape[1] - padding:].abs().max()) if padding else 0.0,
        "flat_keys_left": sorted(k for k in state if str(k).startswith("dho2_")),
        "group_keys": sorted(k for k in opt.param_groups[0] if k != "params"),
        "params": S.flat_params(engine.module),
    }


def _save_runs(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, (params, save_at, steps) in CASES.items():
        engine, model = _engine(params, world)
        saved: dict = {}

        def at_step(step: int, engine: Any = engine, name: str = name, save_at: int = save_at,
                    saved: dict = saved) -> None:
            if step == save_at:
                engine.save_checkpoint(os.path.join(root, f"w{world}", name), tag=f"step{save_at}")
                saved.update(_snapshot(engine, world))

        _train(engine, rank, world, S.batches(steps, GBS, seed=3), 0, steps, at_step)
        out[name] = {"saved": saved, "final": S.flat_params(model)}
    return out


def _load_run(rank: int, world: int, folder: str, name: str) -> dict:
    params, save_at, steps = CASES[name]
    engine, model = _engine(params, world, universal=True)
    engine.load_checkpoint(folder, tag=f"step{save_at}_universal")
    loaded = _snapshot(engine, world)
    _train(engine, rank, world, S.batches(steps, GBS, seed=3), save_at, steps)
    return {"loaded": loaded, "final": S.flat_params(model), "global_steps": engine.global_steps}


def _load_runs(rank: int, world: int, root: str, source_world: int) -> dict:
    return {name: _load_run(rank, world, os.path.join(root, f"w{source_world}", name), name) for name in CASES}


def _error(fn: Any) -> dict:
    try:
        fn()
    except Exception as error:  # noqa: BLE001
        return {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    return {"type": None}


def w2_save_worker(rank: int, world: int, root: str) -> dict:
    return _save_runs(rank, world, root)


def w1_worker(rank: int, world: int, root: str) -> dict:
    out = {"load": _load_runs(rank, world, root, source_world=2)}

    def stock_load() -> None:
        engine, _ = _engine(ADAMW, world, universal=True)
        engine.load_checkpoint(os.path.join(root, "stock"), tag="step6_universal")

    out["stock"] = _error(stock_load)
    out["nested"] = _load_run(rank, world, os.path.join(root, "nested"), "adamw")
    out["zero0"] = _error(lambda: _engine(ADAMW, world, universal=True, stage=0))
    out["save"] = _save_runs(rank, world, root)
    return out


def w2_load_worker(rank: int, world: int, root: str) -> dict:
    return _load_runs(rank, world, root, source_world=1)


# ------------------------------------------------------------------------------------------ fixtures
def _stock_convert(source: Path, target: Path) -> None:
    import deepspeed.checkpoint.ds_to_universal as converter

    converter.main(argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True))


def _to_nested_form(folder: Path) -> None:
    """Rewrite a checkpoint's optimizer files in the nested form earlier ds_dho2 versions saved."""
    from ds_dho2.checkpoint import GROUP_KEY, unpack_entry

    for path in folder.glob("*_optim_states.pt"):
        sd = torch.load(path, map_location="cpu", weights_only=False)
        base = sd["optimizer_state_dict"]["base_optimizer_state"]
        replicated = base["param_groups"][0].pop(GROUP_KEY)
        base["state"][0] = unpack_entry(base["state"][0], replicated, device=torch.device("cpu"))
        assert K.CURVATURE in base["state"][0] and K.APPLIED_STEPS in base["state"][0]
        torch.save(sd, path)


def _cli_convert(source: Path, target: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("ds-dho2", path=os.path.dirname(sys.executable)) or "ds-dho2"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([exe, "to-universal", str(source), str(target), "--extract-workers", "1",
                           "--merge-workers", "1"], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from ds_dho2.integrations.universal import to_universal

    root = tmp_path_factory.mktemp("universal")
    w2_saved = run_ranks(w2_save_worker, 2, str(root), timeout=300)
    summaries = {}
    for name, (_, save_at, _) in CASES.items():
        folder = root / "w2" / name
        summaries[name] = to_universal(folder / f"step{save_at}", folder / f"step{save_at}_universal",
                                       extract_workers=1, merge_workers=1)
    shutil.copytree(root / "w2" / "adamw" / "step6", root / "stock" / "step6")
    _stock_convert(root / "stock" / "step6", root / "stock" / "step6_universal")
    shutil.copytree(root / "w2" / "adamw" / "step6", root / "nested" / "step6")
    _to_nested_form(root / "nested" / "step6")
    to_universal(root / "nested" / "step6", root / "nested" / "step6_universal", extract_workers=1, merge_workers=1)
    w1 = run_ranks(w1_worker, 1, str(root), timeout=300)[0]
    cli_results = {}
    for name, (_, save_at, _) in CASES.items():  # the heavy-ball one through the command, the other in-process
        folder = root / "w1" / name
        source, target = folder / f"step{save_at}", folder / f"step{save_at}_universal"
        if name == "heavyball":
            cli_results[name] = _cli_convert(source, target)
        else:
            to_universal(source, target, extract_workers=1, merge_workers=1)
    w2_loaded = run_ranks(w2_load_worker, 2, str(root), timeout=300) if all(
        result.returncode == 0 for result in cli_results.values()) else None
    return {"root": root, "w2_saved": w2_saved, "w1": w1, "w2_loaded": w2_loaded, "summaries": summaries,
            "cli": cli_results}


# --------------------------------------------------------------------------------------------- tests
def _check_loaded(loaded: dict, saved: dict, world: int) -> None:
    assert loaded["layout"][0] == world and loaded["layout"][2] == S.NUM_PARAMS
    assert loaded["padding"] > 0 or world == 2  # rank 0 of W=2 has no padding; the last rank of each W has
    assert loaded["padding_absmax"] == 0.0
    for key in ("eigenvectors", "eigenvalues", "newton_momentum", "base_moment", "params"):
        assert torch.equal(loaded[key], saved[key]), key
    for key in ("admm_dual", "admm_anchor", "transition"):
        assert (loaded[key] is None) == (saved[key] is None), key
        if saved[key] is not None:
            assert torch.equal(loaded[key], saved[key]), key
    assert loaded["counters"] == saved["counters"]
    assert loaded["step"] == saved["step"] and loaded["applied_steps"] == saved["applied_steps"]
    assert loaded["lanczos_scalars"] == saved["lanczos_scalars"]
    assert (loaded["lanczos_basis"] is None) == (saved["lanczos_basis"] is None)
    if saved["lanczos_basis"] is not None:
        assert loaded["lanczos_dtype"] == saved["lanczos_dtype"] == "torch.float64"
        # float64 travels as two float32 halves: equal to within 2**-48 relative
        assert float((loaded["lanczos_basis"] - saved["lanczos_basis"]).abs().max()) <= 2.0 ** -46
    assert loaded["flat_keys_left"] == [] and "dho2_replicated" not in loaded["group_keys"]


def _check_direction(loads: list, saves: list, source_world: int, target_world: int) -> None:
    for name, (_, save_at, _) in CASES.items():
        saved = saves[0][name]["saved"]
        assert saved["eigenvalues"] is not None
        if name == "heavyball":
            assert saved["lanczos_basis"] is not None, "the heavy-ball run must be saved mid-refresh"
        if name == "adamw":
            assert saved["admm_dual"] is not None and bool(saved["newton_momentum"].abs().sum() > 0)
        reference = saves[0][name]["final"]
        for rank, load in enumerate(loads):
            part = load[name]
            _check_loaded(part["loaded"], saved, target_world)
            assert part["global_steps"] == CASES[name][2]
            error = S.rel_err(part["final"], reference)
            assert error < 1e-6, (name, source_world, target_world, rank, error)


@pytest.mark.timeout(420)
def test_w2_checkpoint_resumes_at_w1(runs: dict) -> None:
    _check_direction([runs["w1"]["load"]], runs["w2_saved"], 2, 1)
    adamw = runs["summaries"]["adamw"]
    assert adamw["source_world_size"] == 2
    expected = ["dho2_admm_anchor", "dho2_admm_dual"] + [f"dho2_eigenvectors_{i}" for i in range(ADAMW["rank"])]
    assert set(expected) <= set(adamw["dho2_entries"]), adamw
    heavyball = runs["summaries"]["heavyball"]
    assert "momentum_buffer" in heavyball["base_entries"] and "exp_avg" not in heavyball["base_entries"]
    assert "dho2_lanczos_basis_0__lo" in heavyball["dho2_entries"]


@pytest.mark.timeout(420)
def test_w1_checkpoint_resumes_at_w2_through_the_command(runs: dict) -> None:
    for name, result in runs["cli"].items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
        assert "ds-dho2 to-universal: wrote " in result.stdout and "load_universal" in result.stdout
    assert runs["w2_loaded"] is not None
    _check_direction(runs["w2_loaded"], [runs["w1"]["save"]], 1, 2)


@pytest.mark.timeout(420)
def test_checkpoint_in_the_earlier_nested_form_converts(runs: dict) -> None:
    nested, saved = runs["w1"]["nested"], runs["w2_saved"][0]["adamw"]
    _check_loaded(nested["loaded"], saved["saved"], 1)
    assert S.rel_err(nested["final"], saved["final"]) < 1e-6


@pytest.mark.timeout(420)
def test_stock_converted_checkpoint_is_refused_at_load(runs: dict) -> None:
    stock = runs["w1"]["stock"]
    assert stock["type"] == "CheckpointFormatError", stock
    # every DHO2 entry of the checkpoint is missing: the eigenvectors first, then the ADMM entries
    assert stock["message"] == STOCK_MESSAGE.format(len(runs["summaries"]["adamw"]["dho2_entries"]) - 1)
    assert "load_checkpoint" in stock["traceback"]  # raised by the load itself, not by a later step


@pytest.mark.timeout(420)
def test_zero0_with_load_universal_fails_at_initialize(runs: dict) -> None:
    zero0 = runs["w1"]["zero0"]
    assert zero0["type"] == "UnsupportedDeepSpeedSetup", zero0
    assert "universal checkpoints are for ZeRO stages 1 and 2" in zero0["message"]


def test_to_universal_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["to-universal", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ds-dho2 to-universal: error: checkpoint folder not found: ") and err.count("\n") == 1
    (tmp_path / "tag").mkdir()
    assert cli.main(["to-universal", str(tmp_path / "tag"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "is not a DeepSpeed ZeRO-1/2 checkpoint tag folder" in err and err.count("\n") == 1


def test_unsupported_deepspeed_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed

    from ds_dho2.integrations.universal import UniversalConversionError, check_deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.18.4")
    with pytest.raises(UniversalConversionError) as info:
        check_deepspeed()
    assert str(info.value) == (
        "ds-dho2 to-universal extends DeepSpeed's ds_to_universal through functions internal to it, and supports "
        "DeepSpeed 0.19.8 up to (not including) 0.20; found DeepSpeed 0.18.4. Install 'deepspeed>=0.19.8,<0.20' to "
        "convert.")
