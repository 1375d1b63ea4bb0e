"""The README's "Launching" lines that no other test runs, each with a few steps of a tiny model on CPU.

Already covered elsewhere:
- ``torchrun --nproc_per_node 2 recipes/train_char_lm.py`` and ``accelerate launch --config_file
  recipes/configs/accelerate_deepspeed.yaml recipes/train_char_lm.py``: ``hf_trainer_test.py``;
- ``torchrun ... $(which ds-dho2) run train.py``: ``hf_trainer_test.py`` and ``distributed/zero_test.py``;
- ``deepspeed --num_gpus 2 --no_python ds-dho2 run train.py``: ``distributed/zero_test.py``.

Here: one process (``python recipes/train_char_lm.py``, ``ds-dho2 run``, ``python -m ds_dho2 run``, all with
mpi4py made unimportable), ``deepspeed --num_gpus 2 recipes/train_char_lm.py`` (the launcher accepts
``--num_gpus`` on CPU), two nodes simulated on 127.0.0.1 with the recipe, and ``accelerate launch
--use_deepspeed --num_processes 2 --no_python ds-dho2 run train.py``. ``train.py`` is
``tests/integration/scripts/tiny_trainer.py``, a plain Trainer script that knows nothing of ds_dho2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAIN_PY = "tests/integration/scripts/tiny_trainer.py"
CONFIG = "ds_configs/dho2_zero2.json"
TINY_LM = ["--max-steps", "3", "--batch-size", "4", "--block-size", "16", "--n-layer", "1", "--n-embd", "16",
           "--n-head", "2", "--rank", "2", "--lanczos-order", "4", "--warmup-steps", "1", "--refresh-interval", "2",
           "--logging-steps", "1", "--eval-samples", "8", "--no-plot"]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS")


def launch_env(block_mpi4py: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in [k for k in env if k in LAUNCH_VARIABLES or k.startswith(("ACCELERATE_", "OMPI_", "PMI"))]:
        del env[key]
    if block_mpi4py is not None:
        # A sitecustomize that makes `import mpi4py` fail, as on a machine without it: one process must not
        # need MPI discovery.
        block_mpi4py.mkdir(exist_ok=True)
        (block_mpi4py / "sitecustomize.py").write_text("import sys\nsys.modules['mpi4py'] = None\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(block_mpi4py), env.get("PYTHONPATH")) if p)
    return env


def run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(command, cwd=REPO, env=env or launch_env(), capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(command)} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def trained(output: str) -> list[tuple[str, str, str, str]]:
    """Rank reports of tiny_trainer.py (ranks share one pipe, so match reports, not lines)."""
    return sorted(re.findall(r"TRAINED rank=(\d+) world=(\d+) optimizer=(\S+) steps=(\d+)", output))


def recipe_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def ds_dho2_exe() -> str:
    return shutil.which("ds-dho2", path=str(BIN)) or str(BIN / "ds-dho2")


# ------------------------------------------------------------------------------------------- one process
@pytest.mark.timeout(240)
def test_recipe_one_process_without_mpi4py(tmp_path: Path) -> None:
    """``python recipes/train_char_lm.py --optimizer both``: DeepSpeed at world size 1, DHO2 then AdamW."""
    out = tmp_path / "lm"
    run([sys.executable, "recipes/train_char_lm.py", "--optimizer", "both", *TINY_LM, "--output-dir", str(out)],
        timeout=220, env=launch_env(block_mpi4py=tmp_path / "no_mpi4py"))
    runs = recipe_summary(out)["runs"]
    assert [(r["optimizer"], r["optimizer_class"], r["deepspeed"], r["world_size"], r["steps"]) for r in runs] == [
        ("dho2", "DHO2", True, 1, 3), ("adamw", "AdamW", True, 1, 3)]
    assert runs[0]["curvature"]["refresh_count"] >= 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize("entry", ["ds-dho2", "python -m ds_dho2"])
def test_ds_dho2_run_alone_is_one_process_without_mpi4py(tmp_path: Path, entry: str) -> None:
    """``ds-dho2 run train.py --deepspeed ...`` and ``python -m ds_dho2 run ...`` without any launcher."""
    command = [ds_dho2_exe()] if entry == "ds-dho2" else [sys.executable, "-m", "ds_dho2"]
    output = run([*command, "run", TRAIN_PY, "--deepspeed", CONFIG, "--max-steps", "3", "--output-dir",
                  str(tmp_path / "out")], timeout=160, env=launch_env(block_mpi4py=tmp_path / "no_mpi4py"))
    assert trained(output) == [("0", "1", "DHO2", "3")], output[-3000:]


# -------------------------------------------------------------------------------------- several processes
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_recipe_under_deepspeed_launcher_num_gpus_2_on_cpu(tmp_path: Path) -> None:
    """``deepspeed --num_gpus 2 recipes/train_char_lm.py --optimizer dho2``."""
    out = tmp_path / "lm"
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "recipes/train_char_lm.py",
         "--optimizer", "dho2", *TINY_LM, "--output-dir", str(out)], timeout=220)
    [summary] = recipe_summary(out)["runs"]
    assert (summary["optimizer_class"], summary["deepspeed"], summary["world_size"]) == ("DHO2", True, 2)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_recipe_on_two_simulated_nodes(tmp_path: Path) -> None:
    """``torchrun --nnodes 2 --node_rank R ... --master_addr HOST0 --master_port 29500 recipes/train_char_lm.py``
    with HOST0 = 127.0.0.1 and one process per node (the README runs two per node)."""
    out, port = tmp_path / "lm", str(free_port())
    procs = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                               "1", "--master_addr", "127.0.0.1", "--master_port", port, "recipes/train_char_lm.py",
                               "--optimizer", "dho2", *TINY_LM, "--output-dir", str(out)],
                              cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=220)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    [summary] = recipe_summary(out)["runs"]
    assert (summary["optimizer_class"], summary["deepspeed"], summary["world_size"]) == ("DHO2", True, 2)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ds_dho2_run_under_accelerate_launch_two_processes(tmp_path: Path) -> None:
    """``accelerate launch --use_deepspeed --num_processes 2 --no_python ds-dho2 run train.py --deepspeed ...``:
    on CPU accelerate starts several processes only with --use_deepspeed (or --multi_gpu)."""
    output = run([str(BIN / "accelerate"), "launch", "--use_deepspeed", "--num_processes", "2", "--main_process_port",
                  str(free_port()), "--no_python", ds_dho2_exe(), "run", TRAIN_PY, "--deepspeed", CONFIG,
                  "--max-steps", "3", "--output-dir", str(tmp_path / "out")], timeout=220)
    assert trained(output) == [("0", "2", "DHO2", "3"), ("1", "2", "DHO2", "3")], output[-3000:]
