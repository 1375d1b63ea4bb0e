"""DHO2 under the Hugging Face Trainer with no change to the script: curvature statistics in the Trainer's
logs, eigenvalues that do not depend on the world size, the refresh line on rank 0, the short-run warning.

The launched script is ``tests/integration/scripts/tiny_lm_trainer.py`` (a plain Trainer script that knows
nothing of ds_dho2 and registers no callback). World-size runs train the same global batch of 8 sequences:
one process with micro batch 8 (``ds-dho2 run`` alone) and two gloo processes with micro batch 4
(``torchrun ... ds-dho2 run``), ZeRO-2, refreshes at steps 2 and 4.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCRIPT = "tests/integration/scripts/tiny_lm_trainer.py"
GLOBAL_BATCH = 8
REFRESH_STEPS = [2, 4]
REFRESH_LINE = re.compile(r"^DHO2 curvature refresh at step (\d+): [0-9.]+ s, top eigenvalues (.+), "
                          r"hvp (\w+), (\d+) Lanczos iterations, (warm|cold) start\.$", re.MULTILINE)


def dho2_config(hvp: str, **params) -> dict:
    """ZeRO-2 with DHO2; the values HF fills are "auto".

    The products are made deterministic across world sizes: ``hvp`` names an exact strategy ("auto" could
    pick finite differences, whose step depends on rounding, or another strategy at another W because it
    times them), and ``batch_fraction`` 1.0 gives the products every sample of each rank's micro batch.
    Dropout is off in the script's model, since each rank draws its own masks and the graph route
    differentiates the training forward itself."""
    return {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "optimizer": {"type": "DHO2", "params": {
            "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "rank": 2,
            "lanczos_order": 8,
            "warmup_steps": REFRESH_STEPS[0], "refresh_interval": REFRESH_STEPS[1] - REFRESH_STEPS[0],
            "hvp": hvp, "curvature": {"batch_fraction": 1.0, "back_off": False}, **params}},
        "zero_optimization": {"stage": 2}, "steps_per_print": 1000000,
    }


def launch_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    launcher = ("ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_",
                "TORCHELASTIC_", "DS_DHO2_LOG_LEVEL")
    for key in [k for k in env if k.startswith(launcher)]:
        del env[key]
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def ds_dho2_exe() -> str:
    return shutil.which("ds-dho2", path=str(BIN)) or str(BIN / "ds-dho2")


@dataclasses.dataclass
class Launch:
    history: list[dict]
    stdout: str
    stderr_by_rank: dict[int, str]
    output_dir: Path


def execute(command: list[str], out: Path, env: dict[str, str] | None = None,
            timeout: float = 150) -> tuple[str, str]:
    proc = subprocess.run(command, cwd=REPO, env=env or launch_env(), capture_output=True, text=True,
                          timeout=timeout)
    output = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"{' '.join(command)} failed ({proc.returncode}):\n{output}"
    assert (out / "log_history.json").is_file(), proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def launch(tmp: Path, world: int, config: dict, *script_args: str) -> Launch:
    """The script with ``config`` under ``ds-dho2 run``: alone (world 1) or under torchrun (world 2, each
    rank's stderr in its own file)."""
    tmp.mkdir(parents=True, exist_ok=True)
    config_path, out = tmp / "ds_config.json", tmp / "out"
    config_path.write_text(json.dumps(config))
    args = [SCRIPT, "--deepspeed", str(config_path), "--batch-size", str(GLOBAL_BATCH // world),
            "--max-steps", str(REFRESH_STEPS[-1]), "--output-dir", str(out), *script_args]
    if world == 1:
        stdout, stderr = execute([ds_dho2_exe(), "run", *args], out)
        stderr_by_rank = {0: stderr}
    else:
        logs = tmp / "rank_logs"
        stdout, _ = execute([str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port",
                             str(free_port()), "--log-dir", str(logs), "--redirects", "2", ds_dho2_exe(),
                             "run", *args], out)
        stderr_by_rank = {rank: next(logs.rglob(f"{rank}/stderr.log")).read_text() for rank in range(world)}
    return Launch(json.loads((out / "log_history.json").read_text()), stdout, stderr_by_rank, out)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """``launches(hvp, world)``: the runs at world sizes 1 and 2 for ``hvp``, started together the first time
    either is asked for and shared by the tests of this module."""
    done: dict[tuple[str, int], Launch] = {}

    def get(hvp: str, world: int) -> Launch:
        if (hvp, world) not in done:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                started = {w: pool.submit(launch, tmp_path_factory.mktemp(f"{hvp}_w{w}"), w, dho2_config(hvp),
                                          *(["--report-to", "tensorboard"] if w == 1 else []))
                           for w in (1, 2)}
                done.update({(hvp, w): future.result() for w, future in started.items()})
        return done[hvp, world]

    return get


def refreshes(history: list[dict]) -> dict[int, tuple[float, float]]:
    """refresh step -> (largest, smallest) of the k=2 eigenvalues, from the Trainer's log history."""
    return {int(e["dho2/refresh_step"]): (e["dho2/eigenvalue_max"], e["dho2/eigenvalue_min"])
            for e in history if "dho2/refresh_step" in e}


# --------------------------------------------------------------------------------- world-size invariance
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("hvp", ["graph", "reverse"])
def test_eigenvalues_do_not_depend_on_world_size(launches, hvp: str) -> None:
    """graph: products on the loss the Trainer hands to engine.backward (multiplied by W under token
    averaging); reverse: replays of each rank's micro batch without num_items_in_batch. Both average the
    ranks' products, so W=1 and W=2 estimate the Hessian of the same global-batch loss."""
    one, two = launches(hvp, 1), launches(hvp, 2)
    assert re.findall(r"TRAINED rank=(\d) world=2", two.stdout) and "TRAINED rank=0 world=1" in one.stdout
    at_one, at_two = refreshes(one.history), refreshes(two.history)
    assert sorted(at_one) == sorted(at_two) == REFRESH_STEPS, (at_one, at_two)
    for step in REFRESH_STEPS:
        assert abs(at_one[step][0]) > 1e-3, at_one
        for w1, w2 in zip(at_one[step], at_two[step]):
            assert w2 == pytest.approx(w1, rel=0.01), f"step {step}: W=1 {at_one[step]}, W=2 {at_two[step]}"
    assert all(f"dho2/hvp_strategy_{hvp}" in e for e in one.history + two.history if "dho2/refresh_step" in e)


# ---------------------------------------------------------------------------- statistics in the logs
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unmodified_script_under_ds_dho2_run_logs_curvature_everywhere(launches) -> None:
    """No callback in the script: log_history, the console and TensorBoard all get the dho2/* entries."""
    run = launches("graph", 1)
    logged = [e for e in run.history if "dho2/eigenvalue_max" in e]
    assert {int(e["step"]) for e in logged} == {2, 3, 4}  # from the first refresh on, every training log
    entry = logged[-1]
    for key in ("dho2/eigenvalue_min", "dho2/rank", "dho2/hvp_strategy_graph", "dho2/refresh_interval",
                "dho2/subspace_rotation", "dho2/newton_trust_scale", "dho2/subspace_grad_fraction",
                "dho2/refresh_seconds", "dho2/refresh_count", "dho2/lanczos_iterations", "dho2/warm_start"):
        assert isinstance(entry.get(key), float), (key, entry)
    assert (entry["dho2/refresh_count"], entry["dho2/warm_start"], entry["dho2/rank"]) == (2.0, 1.0, 2.0)
    assert not [e for e in run.history if "dho2/eigenvalue_max" in e and "loss" not in e]  # training logs
    assert "'dho2/eigenvalue_max'" in run.stdout  # the console printer ran after the callback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.output_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert any(tag.endswith("dho2/eigenvalue_max") for tag in tags), tags
    assert any(tag.endswith("dho2/hvp_strategy_graph") for tag in tags), tags


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_plain_deepspeed_flag_after_import_ds_dho2_logs_curvature(tmp_path: Path) -> None:
    """`--deepspeed` without ds-dho2 run, in a process that imported transformers' Trainer and then ds_dho2
    (the other import order is the one ds-dho2 run takes)."""
    (tmp_path / "ds_config.json").write_text(json.dumps(dho2_config("graph")))
    out = tmp_path / "out"
    program = ("import runpy, sys; import transformers.trainer; import ds_dho2; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = launch_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()))
    execute([sys.executable, "-c", program, SCRIPT, "--deepspeed", str(tmp_path / "ds_config.json"),
             "--max-steps", "2", "--output-dir", str(out)], out, env=env)
    history = json.loads((out / "log_history.json").read_text())
    assert refreshes(history).keys() == {2}, history


# ------------------------------------------------------------------------------------- refresh line
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_refresh_line_once_per_refresh_on_rank_zero_only(launches) -> None:
    run = launches("graph", 2)
    lines = REFRESH_LINE.findall(run.stderr_by_rank[0])
    assert [int(step) for step, *_ in lines] == REFRESH_STEPS, run.stderr_by_rank[0][-3000:]
    assert [(hvp, iterations, start) for _, _, hvp, iterations, start in lines] == [
        ("graph", "8", "cold"), ("graph", "8", "warm")]
    for (_, values, *_), step in zip(lines, REFRESH_STEPS):
        logged = refreshes(run.history)[step]
        assert sorted(float(v) for v in values.split(", ")) == pytest.approx(sorted(logged), rel=1e-3)
    assert "DHO2 curvature refresh" not in run.stderr_by_rank[1], run.stderr_by_rank[1][-3000:]


# ------------------------------------------------------------------------ in-process Trainer behaviour
class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def _data(n: int = 32) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


@pytest.fixture
def one_process(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)


def _trainer(tmp_path: Path, max_steps: int = 2, **kwargs):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True)
    return Trainer(model=_Regression(), args=args, train_dataset=_data(), **kwargs)


def test_every_trainer_gets_one_curvature_callback_first(tmp_path: Path, one_process) -> None:
    import ds_dho2  # noqa: F401 - the import installs the callback into every Trainer
    from ds_dho2.integrations.hf import DHO2CurvatureCallback, add_curvature_callback

    def curvature_callbacks(trainer):
        return [c for c in trainer.callback_handler.callbacks if isinstance(c, DHO2CurvatureCallback)]

    trainer = _trainer(tmp_path)
    assert isinstance(trainer.callback_handler.callbacks[0], DHO2CurvatureCallback)
    assert len(curvature_callbacks(trainer)) == 1 and curvature_callbacks(trainer)[0].automatic
    added = add_curvature_callback(trainer)  # a script that adds it itself still has exactly one
    assert curvature_callbacks(trainer) == [added] and trainer.callback_handler.callbacks[0] is added
    mine = DHO2CurvatureCallback()
    trainer = _trainer(tmp_path, callbacks=[mine])  # given to the Trainer: kept, and moved first
    assert curvature_callbacks(trainer) == [mine] and trainer.callback_handler.callbacks[0] is mine


def test_trainer_without_dho2_logs_no_curvature_and_says_nothing(tmp_path: Path, caplog, one_process) -> None:
    trainer = _trainer(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="ds_dho2"):
        trainer.train()
    assert not [e for e in trainer.state.log_history if any(k.startswith("dho2/") for k in e)]
    assert not [r for r in caplog.records if r.name.startswith("ds_dho2") and r.levelno >= logging.INFO]


def test_short_run_warning_names_both_numbers_and_the_fix(tmp_path: Path, caplog, one_process) -> None:
    """max_steps=2 with warmup_steps=5: no refresh will happen; the callback (not added by this test) warns
    once at the start of training, and attaches the model on this non-DeepSpeed path."""
    from ds_dho2.integrations.hf import dho2_optimizer_cls_and_kwargs

    trainer = _trainer(tmp_path, optimizer_cls_and_kwargs=dho2_optimizer_cls_and_kwargs(
        lr=1e-2, rank=1, lanczos_order=2, warmup_steps=5, refresh_interval=5))
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.name == "ds_dho2.integrations.hf"]
    assert warnings == [
        "DHO2 will not refresh its curvature in this run: max_steps=2 is less than its warmup_steps=5, so it "
        "trains as its base optimizer (adamw) throughout. Set warmup_steps to at most 2 in the DHO2 params "
        "(optimizer.params.warmup_steps in a DeepSpeed config)."]
    caplog.clear()
    trainer = _trainer(tmp_path, max_steps=5, optimizer_cls_and_kwargs=dho2_optimizer_cls_and_kwargs(
        lr=1e-2, rank=1, lanczos_order=2, warmup_steps=5, refresh_interval=5))
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        trainer.train()
    assert not [r for r in caplog.records if "will not refresh" in r.getMessage()]
    assert refreshes(trainer.state.log_history).keys() == {5}  # the callback attached the model: it refreshed


def test_curvature_log_entries_are_numeric_and_include_the_measured_hvp_cost() -> None:
    from ds_dho2 import DHO2
    from ds_dho2.integrations.hf import curvature_log_entries

    optimizer = DHO2([torch.nn.Parameter(torch.zeros(3))], rank=1, lanczos_order=2)
    assert curvature_log_entries(optimizer) == {}  # nothing before the first refresh
    optimizer.tracker.stats.update(
        eigenvalues=[4.0, 1.0], rank=2, hvp_strategy="reverse", lanczos_stop="converged", warm_start=True,
        refresh_interval=8, subspace_rotation=0.1, admm_extrapolation_norm=torch.tensor(0.5),
        admm_accepted=True, next_refresh=float("nan"))
    optimizer.tracker.chooser.report = {"chosen": "reverse", "candidates": {
        "reverse": {"available": True, "gradients_per_product": 2.5}, "forward": {"available": False}}}
    entries = curvature_log_entries(optimizer)
    assert entries == {"dho2/eigenvalue_max": 4.0, "dho2/eigenvalue_min": 1.0, "dho2/rank": 2.0,
                       "dho2/hvp_strategy_reverse": 1.0, "dho2/hvp_gradients_per_product": 2.5,
                       "dho2/warm_start": 1.0, "dho2/refresh_interval": 8.0, "dho2/subspace_rotation": 0.1,
                       "dho2/admm_extrapolation_norm": 0.5, "dho2/admm_accepted": 1.0}
    assert all(type(v) is float for v in entries.values())


# ------------------------------------------------------------------------------------------ logging
def test_import_leaves_logging_to_the_application_and_patches_trainer_lazily() -> None:
    """``import ds_dho2`` adds only a NullHandler: the root logger and the handlers an application gave the
    ``ds_dho2`` logger stay as they were, records propagate, and a standard ``setLevel`` silences them.
    The command line's own set-up (one stderr handler at DS_DHO2_LOG_LEVEL) is opt-in. transformers'
    Trainer is patched when first imported."""
    program = (
        "import logging, sys\n"
        "root_handler = logging.StreamHandler(sys.stdout)\n"
        "root_handler.setFormatter(logging.Formatter('root: %(message)s'))\n"
        "logging.basicConfig(level=logging.INFO, handlers=[root_handler])\n"
        "app_handler = logging.StreamHandler(sys.stderr)\n"
        "logging.getLogger('ds_dho2').addHandler(app_handler)\n"
        "before = (list(logging.getLogger().handlers), logging.getLogger().level)\n"
        "import ds_dho2\n"
        "library = logging.getLogger('ds_dho2')\n"
        "print('root unchanged', (list(logging.getLogger().handlers), logging.getLogger().level) == before)\n"
        "print('handlers', [type(h).__name__ for h in library.handlers], 'propagate', library.propagate)\n"
        "print('trainer imported', 'transformers.trainer' in sys.modules)\n"
        "from transformers import Trainer\n"
        "print('patched', getattr(Trainer.__init__, '_ds_dho2_curvature_callback', False))\n"
        "logging.getLogger('ds_dho2.somewhere').info('shown at info')\n"
        "library.setLevel(logging.WARNING)\n"
        "logging.getLogger('ds_dho2.somewhere').info('silenced')\n"
        "from ds_dho2.logging_utils import configure_cli_logging\n"
        "configure_cli_logging(); configure_cli_logging()\n"
        "print('cli handlers', len([h for h in library.handlers if getattr(h, '_ds_dho2_cli', False)]), "
        "'level', library.level)\n")
    env = launch_env(DS_DHO2_LOG_LEVEL="Warning")
    proc = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("root: ") or "shown" in line
             or "silenced" in line]
    assert lines == ["root unchanged True", "handlers ['StreamHandler', 'NullHandler'] propagate True",
                     "trainer imported False", "patched True", "root: shown at info",
                     f"cli handlers 1 level {logging.WARNING}"]
    assert "shown at info" in proc.stderr and "silenced" not in proc.stderr + proc.stdout


def test_log_level_variable(monkeypatch, caplog) -> None:
    from ds_dho2.logging_utils import level_from_environment

    monkeypatch.delenv("DS_DHO2_LOG_LEVEL", raising=False)
    assert level_from_environment() == logging.INFO
    monkeypatch.setenv("DS_DHO2_LOG_LEVEL", "debug")
    assert level_from_environment() == logging.DEBUG
    monkeypatch.setenv("DS_DHO2_LOG_LEVEL", "loud")
    with caplog.at_level(logging.WARNING, logger="ds_dho2"):
        assert level_from_environment() == logging.INFO
    assert [r.getMessage() for r in caplog.records] == [
        "Unknown DS_DHO2_LOG_LEVEL=loud; use one of debug, info, warning, error, critical. Logging at info."]
