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
converter is refused at load with a message naming ``ds-dho2 to-universal``; one rewritten in the saved forms
of earlier ds_dho2 versions is refused by the converter with a message saying what to do.

Three launches: W=2 saves; W=1 loads the W=2 checkpoints and saves its own; W=2 loads the W=1 ones.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from ds_dho2.core.state import ComponentState, replicated, sharded
from tests.helpers import ds_setup as S
from tests.helpers.distributed import run_ranks

pytestmark = pytest.mark.distributed

GBS = 8
ADAMW = {"lr": 1e-2, "rank": 4, "lanczos_order": 8, "refresh_interval": 3, "warmup_steps": 2, "weight_decay": 0.01,
         "hvp": "reverse", "curvature": {"batch_fraction": 1.0, "max_interval": 3, "back_off": False},
         "admm": {"enabled": True, "rho": 0.2, "window": 2}}
HEAVYBALL = {"lr": 1e-2, "base": "heavyball", "rank": 3, "lanczos_order": 6, "refresh_interval": 6,
             "warmup_steps": 2, "hvp": "reverse", "lanczos_dtype": "float64",
             "curvature": {"mode": "interleaved", "iterations_per_step": 1, "batch_fraction": 1.0,
                           "tolerance": 1e-12, "max_interval": 6, "back_off": False}}
#: name -> (DHO2 params, checkpoint step, total steps)
CASES = {"adamw": (ADAMW, 6, 10), "heavyball": (HEAVYBALL, 10, 14)}
COUNTERS = ("refresh_count", "basis_version", "next_refresh", "interval", "last_products_step", "lanczos_started_at",
            "hvp_strategy")
STOCK_MESSAGE = (
    "DHO2 cannot resume from this universal checkpoint: it has no DHO2 curvature state (dho2_curvature_eigenvectors_0 and {} "
    "more entries are missing), which DeepSpeed's ds_to_universal drops. Convert the original DeepSpeed checkpoint "
    "with 'ds-dho2 to-universal INPUT_FOLDER OUTPUT_FOLDER' instead and load that.")


# ------------------------------------------------------------------------------------------- workers
@dataclasses.dataclass
class ProbeState(ComponentState):
    """A component the checkpoint code has never heard of: it must survive W=2 -> W=1 from this alone."""

    vector: torch.Tensor | None = sharded()
    rows: torch.Tensor | None = sharded(rows_in_use="rows_in_use")
    note: str = replicated("")
    counts: list = replicated(default_factory=list)
    scale: torch.Tensor | None = replicated(None)

    def rows_in_use(self) -> int:
        return 2


class Probe:
    """Anything with a ``state`` declaration can be one of DHO2's components."""

    def __init__(self) -> None:
        self.state = ProbeState()


def _fill_probe(opt: Any) -> None:
    """Values that depend on the global element index only, so any layout knows what to expect."""
    layout = opt.flat_parameters().layout
    index = layout.local_slice(torch.arange(1, S.NUM_PARAMS + 1, dtype=torch.float64))
    opt.components["probe"].state = ProbeState(
        vector=index.clone(), rows=torch.stack([index * (i + 1) for i in range(3)]).float(), note="probe",
        counts=[1, 2, 3], scale=torch.tensor([0.5, 2.0], dtype=torch.float64))


def _engine(params: dict, world: int, *, universal: bool = False, stage: int = 2) -> tuple[Any, torch.nn.Module]:
    import deepspeed

    extra = {"checkpoint": {"load_universal": True}} if universal else {}
    model = S.LossModel(seed=123 if universal else 0)  # a loaded model must be overwritten by the checkpoint
    engine, *_ = deepspeed.initialize(model=model, config=S.ds_config(stage, params, GBS // world, **extra))
    if stage > 0:
        engine.basic_optimizer.components["probe"] = Probe()
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
    curvature = opt.tracker.state
    run = curvature.lanczos
    padding = int(engine.optimizer.groups_padding[0])
    base = opt.base.state
    base_moment = getattr(base, "exp_avg", None)
    if base_moment is None:
        base_moment = base.momentum_buffer
    vectors = curvature.eigenvectors
    admm = opt.admm.state
    layout = opt.flat_parameters().layout
    return {
        "eigenvectors": _gather(vectors, world), "eigenvalues": curvature.eigenvalues.clone(),
        "newton_momentum": opt.newton.state.momentum.clone(),
        "admm_dual": _gather(admm.dual, world), "admm_anchor": _gather(admm.anchor, world),
        "base_moment": _gather(base_moment, world),
        "lanczos_basis": None if run is None else _gather(run.basis, world),
        "lanczos_dtype": None if run is None else str(run.basis.dtype),
        "lanczos_scalars": None if run is None else copy.deepcopy({k: v for k, v in vars(run).items()
                                                                   if not torch.is_tensor(v)}),
        "transition": None if curvature.transition is None else curvature.transition.clone(),
        "counters": {**{key: getattr(curvature, key) for key in COUNTERS},
                     "newton_basis_version": opt.newton.state.basis_version},
        "step": opt.steps, "applied_steps": float(base.applied_steps),
        "layout": (layout.world_size, layout.partition_numel, layout.total_numel),
        "padding": padding,
        "padding_absmax": float(vectors[:, vectors.shape[1] - padding:].abs().max()) if padding else 0.0,
        "flat_keys_left": sorted(k for k in state if str(k).startswith("dho2_")),
        "group_keys": sorted(k for k in opt.param_groups[0] if k != "params"),
        "params": S.flat_params(engine.module),
        "probe": _probe_snapshot(opt.components["probe"].state, world),
    }


def _probe_snapshot(probe: ProbeState, world: int) -> dict:
    return {"vector": _gather(probe.vector, world), "rows": _gather(probe.rows, world), "note": probe.note,
            "counts": probe.counts, "scale": probe.scale}


def _save_runs(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, (params, save_at, steps) in CASES.items():
        engine, model = _engine(params, world)
        _fill_probe(engine.basic_optimizer)
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


def _to_earlier_form(folder: Path, form: str) -> None:
    """Rewrite a checkpoint's optimizer files as earlier ds_dho2 versions saved them: ``format1`` (the same
    layout, version 1) or ``nested`` (everything in one nested ``dho2`` dict, no replicated group entry)."""
    from ds_dho2.checkpoint import GROUP_KEY

    for path in folder.glob("*_optim_states.pt"):
        sd = torch.load(path, map_location="cpu", weights_only=False)
        base = sd["optimizer_state_dict"]["base_optimizer_state"]
        if form == "format1":
            base["param_groups"][0][GROUP_KEY]["format"] = 1
        else:
            base["param_groups"][0].pop(GROUP_KEY)
            base["state"][0] = {"step": 6, "exp_avg": base["state"][0]["exp_avg"], "dho2": {"refresh_count": 2}}
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
    earlier = {}
    for form in ("format1", "nested"):
        shutil.copytree(root / "w2" / "adamw" / "step6", root / form / "step6")
        _to_earlier_form(root / form / "step6", form)
        earlier[form] = _error(lambda form=form: to_universal(root / form / "step6", root / form / "step6_universal",
                                                             extract_workers=1, merge_workers=1))
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
            "cli": cli_results, "earlier": earlier}


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
    probe, index = loaded["probe"], torch.arange(1, S.NUM_PARAMS + 1, dtype=torch.float64)
    assert torch.equal(probe["vector"], index) and probe["vector"].dtype == torch.float64
    assert torch.equal(probe["rows"][:2], torch.stack([index, 2 * index]).float())
    assert probe["rows"].shape == (3, S.NUM_PARAMS) and not probe["rows"][2].any()  # only the rows in use travel
    assert probe["note"] == "probe" and probe["counts"] == [1, 2, 3]
    assert torch.equal(probe["scale"], torch.tensor([0.5, 2.0], dtype=torch.float64))


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
    expected = ["dho2_admm_anchor", "dho2_admm_dual"] + [f"dho2_curvature_eigenvectors_{i}"
                                                         for i in range(ADAMW["rank"])]
    assert set(expected) <= set(adamw["dho2_entries"]), adamw
    heavyball = runs["summaries"]["heavyball"]
    assert "momentum_buffer" in heavyball["base_entries"] and "exp_avg" not in heavyball["base_entries"]
    assert "dho2_curvature_lanczos_basis_0__lo" in heavyball["dho2_entries"]


@pytest.mark.timeout(420)
def test_w1_checkpoint_resumes_at_w2_through_the_command(runs: dict) -> None:
    for name, result in runs["cli"].items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
        assert "ds-dho2 to-universal: wrote " in result.stdout and "load_universal" in result.stdout
    assert runs["w2_loaded"] is not None
    _check_direction(runs["w2_loaded"], [runs["w1"]["save"]], 1, 2)


@pytest.mark.timeout(420)
def test_checkpoints_in_earlier_saved_forms_are_refused_with_the_way_out(runs: dict) -> None:
    for form in ("format1", "nested"):
        refused = runs["earlier"][form]
        assert refused["type"] == "UniversalConversionError", (form, refused)
        assert refused["message"].startswith(f"DHO2 checkpoint format {1 if form == 'format1' else None!r} was written "
                                             "by an earlier ds_dho2 and is no longer read"), refused["message"]
        assert "load_optimizer_states=False" in refused["message"]


@pytest.mark.timeout(420)
def test_stock_converted_checkpoint_is_refused_at_load(runs: dict) -> None:
    stock = runs["w1"]["stock"]
    assert stock["type"] == "CheckpointFormatError", stock
    # every DHO2 entry of the checkpoint is missing: the eigenvectors first, then the ADMM entries
    entries = [e for e in runs["summaries"]["adamw"]["dho2_entries"] if not e.endswith("__lo")]  # halves of one
    assert stock["message"] == STOCK_MESSAGE.format(len(entries) - 1)
    assert "load_checkpoint" in stock["traceback"]  # raised by the load itself, not by a later step


@pytest.mark.timeout(420)
def test_zero0_with_load_universal_fails_at_initialize(runs: dict) -> None:
    zero0 = runs["w1"]["zero0"]
    assert zero0["type"] == "UnsupportedDeepSpeedSetup", zero0
    assert "universal checkpoints are for ZeRO stages 1, 2 and 3" in zero0["message"]


def test_to_universal_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["to-universal", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ds-dho2 to-universal: error: checkpoint folder not found: ") and err.count("\n") == 1
    (tmp_path / "tag").mkdir()
    assert cli.main(["to-universal", str(tmp_path / "tag"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "is not a DeepSpeed ZeRO checkpoint tag folder" in err and err.count("\n") == 1


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
