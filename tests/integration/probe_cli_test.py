"""``ds-dho2 probe`` end to end on unmodified scripts: a Hugging Face Trainer script and plain DeepSpeed loops
(ZeRO-2 with DeepSpeed's AdamW, ZeRO-0 with DHO2 heavy-ball), checking the printed report, the JSON and that
the script was stopped at the probe's step; plus the one-line errors.

Every subprocess runs offline on the CPU (``DS_ACCELERATOR=cpu``, ``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``;
the Trainer script sets ``use_cpu=True`` itself).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_dho2 import cli

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAINER_SCRIPT = REPO / "tests" / "integration" / "scripts" / "tiny_trainer.py"
DS_SCRIPT = REPO / "tests" / "distributed" / "scripts" / "plain_deepspeed_train.py"
REGIMES = {"noise-limited", "curvature-limited", "lr-limited", "undetermined"}


def probe_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in [k for k in env if k.startswith(("ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_",
                                                "LOCAL_WORLD_SIZE", "OMPI_", "PMI"))]:
        del env[key]
    return env


def probe(arguments: list[str], cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    exe = shutil.which("ds-dho2", path=str(BIN)) or str(BIN / "ds-dho2")
    return subprocess.run([exe, "probe", *arguments], cwd=cwd, env=probe_env(), capture_output=True, text=True,
                          timeout=timeout)


def check_report(proc: subprocess.CompletedProcess, output: Path, step: int) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"DHO2 probe at step {step}: "))
    body = lines[start:]
    assert any(line.startswith("  Hessian top eigenvalues") for line in body)
    assert any(line.startswith("  outliers above the bulk: ") for line in body)
    assert any(line.startswith("  lr x lambda_max in ") for line in body)
    assert any(line.startswith("  gradient noise scale B_noise") for line in body)
    verdict = next(line for line in body if line.startswith("verdict: "))
    data = json.loads(output.read_text())
    assert data["step"] == step and data["verdict"] == verdict[len("verdict: "):]
    assert data["regime"] in REGIMES and verdict.startswith(f"verdict: {data['regime']}")
    assert data["eigenvalues"] and data["lanczos_products"] >= 1
    assert 0.0 <= data["subspace_share"] <= 1.0 + 1e-6
    assert data["lr_lambda_max"] > 0 and data["stability_ratio"] == pytest.approx(
        data["lr_lambda_max"] / data["stability_limit"])
    assert data["noise_chunks"] == 4 and data["chunk_size"] == 1 and data["step_cost"] >= 0
    return data


@pytest.mark.timeout(180)
def test_probe_on_an_unmodified_hugging_face_trainer_script(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    proc = probe(["--steps", "4", "--max-rank", "4", "--output", str(output), str(TRAINER_SCRIPT), "--max-steps",
                  "30", "--output-dir", str(tmp_path / "trainer")], cwd=tmp_path)
    data = check_report(proc, output, step=4)
    assert data["optimizer"] == "AdamW" and data["base"] == "adamw" and data["lr"] > 0
    assert data["parameters"] == 5 and data["batch_size"] == 4
    assert data["dataset_size"] == 64  # len(trainer.train_dataset): the finite-population correction applies
    if data["noise_scale"] != "inf":
        assert data["batch_noise_scale"] == pytest.approx(data["noise_scale"] * (1 - 4 / 64))
    assert data["stability_limit"] == pytest.approx(38.0)
    assert "TRAINED" not in proc.stdout  # the script was stopped at the probe's step


@pytest.mark.timeout(180)
def test_probe_on_a_plain_deepspeed_loop_under_zero2(tmp_path: Path) -> None:
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
                                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
                                  "zero_optimization": {"stage": 2}}))
    output = tmp_path / "report.json"
    proc = probe(["--steps", "3", "--max-rank", "8", "--output", str(output), str(DS_SCRIPT), str(config)],
                 cwd=tmp_path)
    data = check_report(proc, output, step=3)
    assert data["optimizer"] == "FusedAdam" and data["base"] == "adamw"  # engine.basic_optimizer
    assert data["parameters"] == 161 and data["batch_size"] == 4 and data["max_rank"] == 8
    assert data["dataset_size"] is None  # a hand-written loop names no dataset size
    assert "BASIC_OPTIMIZER=" not in proc.stdout  # stopped after 3 of its 6 steps


@pytest.mark.timeout(180)
def test_probe_of_dho2_heavy_ball_on_a_script_that_ends_first(tmp_path: Path) -> None:
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 10 ** 9,
                                  "optimizer": {"type": "DHO2", "params": {"lr": 1e-2, "rank": 2,
                                                                           "base": "heavyball"}},
                                  "zero_optimization": {"stage": 0}}))
    output = tmp_path / "report.json"
    proc = probe(["--steps", "50", "--dataset-size", "24", "--output", str(output), str(DS_SCRIPT), str(config)],
                 cwd=tmp_path)
    data = check_report(proc, output, step=6)  # the script trains 6 steps: probed at its last
    assert data["dataset_size"] == 24 and "drawn from 24 examples" in proc.stdout
    assert "the script ended after 6 of 50 steps" in proc.stderr
    assert data["optimizer"] == "DHO2 (base heavyball)" and data["base"] == "heavyball"
    assert data["stability_limit"] == pytest.approx(2 * 1.9) and data["max_rank"] == 32


@pytest.mark.timeout(120)
def test_probe_errors_are_one_line(tmp_path: Path, capsys) -> None:
    script = tmp_path / "no_training.py"
    script.write_text("print('nothing to train')\n")
    proc = probe([str(script)], cwd=tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["ds-dho2 probe: error: no optimizer step seen: the script ended before its optimizer (or "
                      "DeepSpeed engine) took a step. Check that it trains, and pass --steps no larger than the "
                      "steps it runs."]
    assert cli.main(["probe", str(tmp_path / "missing.py")]) == 1
    assert capsys.readouterr().err.startswith("ds-dho2 probe: error: script not found: ")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["probe", "--steps", "0", "x.py"])
    assert exit_info.value.code == 2
    assert "argument --steps: expected a positive integer, got '0'" in capsys.readouterr().err


def test_probe_help_is_its_own(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["probe", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ds-dho2 probe [-h] [--steps N] [--max-rank K] [--dataset-size N] [--output FILE] "
                          "[-m] TARGET [ARGS ...]\n")
