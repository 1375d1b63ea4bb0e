"""The ``ds-dho2`` command: ``--version``, help, one-line start-up errors, argument forwarding, the single-process
environment of ``ds-dho2 run``, ``python -m ds_dho2`` and ``"type": "dho2"`` in any case.

Commands run as subprocesses (the console script and ``python -m ds_dho2``); the parser and the environment
checks are also called in-process, which costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ds_dho2
from ds_dho2 import cli
from tests.helpers.distributed import run_ranks

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DS_SCRIPT = REPO / "tests" / "distributed" / "scripts" / "plain_deepspeed_train.py"
#: what a launcher (or a previous test) may have left in os.environ; removed for every subprocess
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS")
ARGV_SCRIPT = """import json, os, sys
print("REPORT " + json.dumps({"argv": sys.argv, "name": __name__,
      "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                             "MASTER_ADDR", "MASTER_PORT")}}))
"""


def ds_dho2_exe() -> str:
    return shutil.which("ds-dho2", path=str(BIN)) or str(BIN / "ds-dho2")


def clean_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in [k for k in env if k in LAUNCH_VARIABLES or k.startswith(("ACCELERATE_", "OMPI_", "PMI"))]:
        del env[key]
    env.update(extra)
    return env


def run(command: list[str], cwd: Path = REPO, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=clean_env(**extra), capture_output=True, text=True,
                          timeout=timeout)


def report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


# ------------------------------------------------------------------------------------- version, help
@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", ["console_script", "python_m"])
def test_version(entry: str) -> None:
    command = [ds_dho2_exe()] if entry == "console_script" else [sys.executable, "-m", "ds_dho2"]
    proc = run([*command, "--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"ds-dho2 {ds_dho2.__version__}\n"


def test_run_help_is_its_own(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ds-dho2 run [-h] [-m] TARGET [ARGS ...]\n")
    assert "{run,bench}" not in out


@pytest.mark.timeout(120)
def test_benchmark_entry_point_lives_in_the_checkout_and_the_package_does_not_import_it() -> None:
    """``python -m benchmarks`` runs the suites from a source checkout; the installed package never imports
    ``benchmarks`` (it is not shipped), so ``ds-dho2`` has no ``bench`` command."""
    import ast

    for path in Path(ds_dho2.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any(name == "benchmarks" or name.startswith("benchmarks.") for name in imported), path
    proc = run([sys.executable, "-m", "benchmarks", "--help"], cwd=Path(ds_dho2.__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("usage: python -m benchmarks {overlap,scaling,convergence,curvature,stability,defaults_search,subspace,"
                           "zero3_memory,regimes,map_stability}"
                           " [--quick] [suite options]\n")


# -------------------------------------------------------------------------------- one-line errors
@pytest.mark.timeout(120)
def test_missing_script_is_one_line_without_traceback(tmp_path: Path) -> None:
    proc = run([ds_dho2_exe(), "run", "missing.py", "--deepspeed", "cfg.json"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (f"ds-dho2 run: error: script not found: missing.py (looked in {tmp_path}). Check the "
                           "path, or use 'ds-dho2 run -m MODULE' for a module.\n")


def test_missing_module_and_missing_target_are_one_line(capsys) -> None:
    assert cli.main(["run", "-m", "no_such_module_for_ds_dho2"]) == 1
    assert capsys.readouterr().err == ("ds-dho2 run: error: no module named 'no_such_module_for_ds_dho2'. Check the "
                                       "name and that its package is installed, or give a script path without -m.\n")
    assert cli.main(["run", "-m", "no_such_package_for_ds_dho2.sub"]) == 1
    assert capsys.readouterr().err.startswith("ds-dho2 run: error: no module named 'no_such_package_for_ds_dho2.sub'.")
    assert cli.main(["run"]) == 1
    assert capsys.readouterr().err == ("ds-dho2 run: error: no script given. Use 'ds-dho2 run SCRIPT [ARGS...]' or "
                                       "'ds-dho2 run -m MODULE [ARGS...]'.\n")


def test_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("ds-dho2: error: the following arguments are required: "
                                       "{run,probe,to-universal}. See 'ds-dho2 --help'.\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "x.py"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ds-dho2: error: argument {run,probe,to-universal}: invalid choice: ")
    assert err.count("\n") == 1
    assert err.endswith(". See 'ds-dho2 --help'.\n")


@pytest.mark.timeout(180)
def test_dho2_config_error_is_one_line(tmp_path: Path) -> None:
    """A bad DHO2 value in the DeepSpeed config stops ``ds-dho2 run`` with the validation message, no traceback."""
    import torch

    with pytest.raises(ds_dho2.ConfigError) as expected:
        ds_dho2.DHO2([torch.nn.Parameter(torch.zeros(2))], rank=0)
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
                                  "optimizer": {"type": "DHO2", "params": {"lr": 1e-2, "rank": 0}}}))
    proc = run([ds_dho2_exe(), "run", str(DS_SCRIPT), str(config)], cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = " ".join(str(expected.value).split())
    assert proc.stderr.splitlines()[-1] == f"ds-dho2 run: error: ConfigError: {message}"


@pytest.mark.timeout(180)
def test_unsupported_deepspeed_setup_is_one_line(tmp_path: Path) -> None:
    """ZeRO-3 parameter offload is refused inside deepspeed.initialize; ``ds-dho2 run`` reports it in one line,
    no traceback."""
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
                                  "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                                  "optimizer": {"type": "DHO2", "params": {"lr": 1e-2, "rank": 2}}}))
    proc = run([ds_dho2_exe(), "run", str(DS_SCRIPT), str(config)], cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("ds-dho2 run: error: UnsupportedDeepSpeedSetup: DHO2 does not support ZeRO-3 parameter "
                           "offload."), last
    assert "Remove zero_optimization.offload_param" in last


# ---------------------------------------------------------------------------- forwarding, environment
@pytest.mark.timeout(120)
def test_run_script_gets_its_arguments_and_a_single_process_environment(tmp_path: Path) -> None:
    script = tmp_path / "show.py"
    script.write_text(ARGV_SCRIPT)
    got = report(run([ds_dho2_exe(), "--local_rank=0", "run", "show.py", "--help", "-m", "x"], cwd=tmp_path))
    assert got["argv"] == ["show.py", "--local_rank=0", "--help", "-m", "x"]
    assert got["name"] == "__main__"
    env = got["env"]
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536


@pytest.mark.timeout(120)
def test_run_destroys_the_process_group_the_script_left_open(tmp_path: Path) -> None:
    """A script (like the Trainer) that never destroys its gloo group exits with it torn down by ``ds-dho2
    run``; left to the interpreter's exit, its threads now and then abort a rank after training."""
    script = tmp_path / "leave_open.py"
    script.write_text(
        "import atexit, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "atexit.register(lambda: print('REPORT {\"open_at_exit\": %s}' % str(dist.is_initialized()).lower()))\n")
    assert report(run([ds_dho2_exe(), "run", "leave_open.py"], cwd=tmp_path)) == {"open_at_exit": False}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", ["console_script", "python_m"])
def test_run_module_under_a_launcher_environment(tmp_path: Path, entry: str) -> None:
    """``ds-dho2 run -m MODULE`` / ``python -m ds_dho2 run -m MODULE``: the module is found from the working
    directory, as with ``python -m``, and the environment a launcher set is left as it is."""
    (tmp_path / "show_module.py").write_text(ARGV_SCRIPT)
    launcher = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}
    command = [ds_dho2_exe()] if entry == "console_script" else [sys.executable, "-m", "ds_dho2"]
    got = report(run([*command, "run", "-m", "show_module", "a", "--b"], cwd=tmp_path, **launcher))
    assert got["argv"] == [str(tmp_path / "show_module.py"), "a", "--b"]
    assert got["name"] == "__main__"
    assert {k: got["env"][k] for k in launcher} == launcher and got["env"]["LOCAL_WORLD_SIZE"] is None


def test_single_process_environment_only_without_a_launcher() -> None:
    added = cli.single_process_environment({})
    assert set(added) == {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    assert cli.single_process_environment({"MASTER_ADDR": "h", "MASTER_PORT": "1"}) == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    for launched in ({"RANK": "0"}, {"LOCAL_RANK": "1"}, {"WORLD_SIZE": "2"}, {"OMPI_COMM_WORLD_SIZE": "2"},
                     {"PMI_SIZE": "2"}, {"SLURM_NTASKS": "4"}):
        assert cli.single_process_environment(launched) == {}, launched


def test_accelerate_simple_launcher_asked_for_several_processes_is_refused() -> None:
    """accelerate's simple launcher (no GPU, no --use_deepspeed) starts one process for --num_processes 2."""
    with pytest.raises(cli.StartupError) as error:
        cli.check_launch({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert str(error.value) == (
        "accelerate launch started a single process although it was asked for several: without GPUs it starts "
        "several only with --use_deepspeed (or --multi_gpu), and not with --cpu. Use 'accelerate launch "
        "--use_deepspeed --num_processes N --no_python ds-dho2 run ...'.")
    cli.check_launch({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "RANK": "0"})  # torchrun-based


def test_accelerate_cpu_flag_warns_that_deepspeed_is_off(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ds_dho2.cli"):
        cli.check_launch({"ACCELERATE_USE_CPU": "True"})
        cli.check_launch({"ACCELERATE_USE_CPU": "False"})
    assert [record.getMessage() for record in caplog.records] == [
        "ds-dho2 run: warning: accelerate launch --cpu turns DeepSpeed off in accelerate and the Hugging Face "
        "Trainer, so their DeepSpeed config (and DHO2) is ignored. Without --cpu, use 'accelerate launch "
        "--use_deepspeed --num_processes N --no_python ds-dho2 run ...' (DS_ACCELERATOR=cpu selects the CPU)."]


@pytest.mark.timeout(120)
def test_accelerate_launch_num_processes_without_deepspeed_flag_is_refused_in_one_line(tmp_path: Path) -> None:
    script = tmp_path / "show.py"
    script.write_text(ARGV_SCRIPT)
    proc = run([str(BIN / "accelerate"), "launch", "--num_processes", "2", "--quiet", "--no_python", ds_dho2_exe(),
                "run", "show.py"], cwd=tmp_path)
    assert proc.returncode != 0 and "REPORT" not in proc.stdout
    assert ("ds-dho2 run: error: accelerate launch started a single process although it was asked for several: "
            "without GPUs it starts several only with --use_deepspeed (or --multi_gpu), and not with --cpu. Use "
            "'accelerate launch --use_deepspeed --num_processes N --no_python ds-dho2 run ...'.\n") in proc.stderr


# ------------------------------------------------------------------------------- "type" in any case
def _build_with_type(rank: int, world_size: int, names: list[str]) -> list[tuple[str, str, str]]:
    import deepspeed

    import ds_dho2  # noqa: F401 - registers DHO2 in this spawned rank
    from tests.helpers import ds_setup as S

    built = []
    for name in names:
        config = S.ds_config(2, S.EQ_PARAMS, 4)
        config["optimizer"]["type"] = name
        model = S.LossModel()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        built.append((name, type(engine.basic_optimizer).__name__, engine.optimizer_name()))
    return built


@pytest.mark.timeout(240)
def test_optimizer_type_is_case_insensitive() -> None:
    """DeepSpeed lower-cases its own optimizer names; "dho2" used to end in its bare assertion
    "dho2 is not a supported DeepSpeed Optimizer"."""
    names = ["dho2", "Dho2", "DHO2"]
    [built] = run_ranks(_build_with_type, 1, names, timeout=200)
    assert built == [(name, "DHO2", "DHO2") for name in names]
