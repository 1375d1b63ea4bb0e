"""Hugging Face integration: the recipes under torchrun / accelerate launch with DeepSpeed, the unmodified
script path (``ds-dho2 run``), and the plain Trainer path with ``optimizer_cls_and_kwargs``.

Every subprocess runs with ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` (the offline guarantee).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY_LM = ["--max-steps", "12", "--batch-size", "8", "--block-size", "32", "--rank", "2", "--lanczos-order", "6",
           "--warmup-steps", "4", "--refresh-interval", "4", "--logging-steps", "2", "--eval-samples", "32",
           "--lr", "3e-3", "--no-plot", "--no-back-off"]


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in [k for k in env if k.startswith(("ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))]:
        del env[key]
    return env


def run(command: list[str], timeout: float) -> str:
    result = subprocess.run(command, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output[-6000:]}"
    return output


def logged(history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in history if key in entry]


def check_dho2_run(output_dir: Path, min_refreshes: int) -> dict:
    history = json.loads((output_dir / "dho2" / "log_history.json").read_text())
    losses = logged(history, "loss")
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    eigen = logged(history, "dho2/eigenvalue_max")
    assert eigen and all(v == v for v in eigen), "curvature statistics missing from log_history"
    assert max(logged(history, "dho2/refresh_count")) >= min_refreshes
    assert logged(history, "dho2/subspace_grad_fraction") and logged(history, "dho2/refresh_seconds")
    summary = json.loads((output_dir / "dho2" / "summary.json").read_text())
    assert summary["optimizer_class"] == "DHO2" and summary["deepspeed"] is True
    return summary


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_trainer_deepspeed_logs_curvature(tmp_path):
    out = tmp_path / "lm"
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         "recipes/train_char_lm.py", "--optimizer", "dho2", *TINY_LM, "--output-dir", str(out)], timeout=280)
    summary = check_dho2_run(out, min_refreshes=2)
    assert summary["world_size"] == 2
    assert (out / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_accelerate_launch_with_deepspeed_plugin(tmp_path):
    out = tmp_path / "acc"
    text = run([str(BIN / "accelerate"), "launch", "--config_file", "recipes/configs/accelerate_deepspeed.yaml",
                "--main_process_port", str(free_port()), "recipes/train_char_lm.py", "--optimizer", "dho2",
                *TINY_LM, "--max-steps", "8", "--output-dir", str(out)], timeout=280)
    summary = check_dho2_run(out, min_refreshes=1)
    assert summary["world_size"] == 2, text[-2000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_unmodified_script_under_ds_dho2_run_trains_with_dho2(tmp_path):
    ds_dho2_bin = shutil.which("ds-dho2") or str(BIN / "ds-dho2")
    text = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), ds_dho2_bin, "run",
                "recipes/plain_trainer.py", "--deepspeed", "recipes/configs/dho2_zero2.json", "--max-steps", "40",
                "--output-dir", str(tmp_path / "plain")], timeout=220)
    assert "engine basic_optimizer: DHO2" in text, text[-3000:]
    assert "-> DHO2" in text
    losses = json.loads(next(line for line in text.splitlines() if line.startswith("train losses:")).split(":", 1)[1])
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_plain_trainer_default_param_groups_with_optimizer_cls_and_kwargs(tmp_path, monkeypatch):
    """No DeepSpeed, one process: HF's decay / no-decay groups reach DHO2, the callback attaches the model,
    curvature refreshes run and their statistics reach log_history."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from ds_dho2 import DHO2
    from ds_dho2.integrations.hf import DHO2CurvatureCallback, dho2_optimizer_cls_and_kwargs, find_dho2

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        ids = torch.randint(0, 20, (64, 16))
        ids[:, 1::2] = (ids[:, 0::2] + 1) % 20  # learnable: every odd token follows from the previous one
        data = [{"input_ids": row, "labels": row} for row in ids]
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                 learning_rate=3e-3, weight_decay=0.1, logging_steps=3, save_strategy="no",
                                 report_to="none", use_cpu=True, disable_tqdm=True)
        callback = DHO2CurvatureCallback()
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                          optimizer_cls_and_kwargs=dho2_optimizer_cls_and_kwargs(
                              lr=3e-3, weight_decay=0.1, rank=2, lanczos_order=6, warmup_steps=4, refresh_interval=4,
                              curvature={"back_off": False}))
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    dho2 = find_dho2(trainer.optimizer)
    assert isinstance(dho2, DHO2) and callback.optimizer is dho2
    assert dho2.model is model  # attached by the callback
    assert not dho2.weight_decay.uniform  # decay and no-decay groups were merged with per-element decay
    stats = dho2.curvature_stats()
    assert stats["refresh_count"] >= 2 and len(stats["eigenvalues"]) == 2
    history = trainer.state.log_history
    assert logged(history, "dho2/eigenvalue_max") and max(logged(history, "dho2/refresh_count")) >= 2
    assert 4 in {int(e["step"]) for e in history if "dho2/refresh_step" in e}  # logged at the refresh step
    losses = logged(history, "loss")
    assert losses[-1] < losses[0]


def test_find_dho2_unwraps_wrapper_chains():
    from ds_dho2 import DHO2
    from ds_dho2.integrations.hf import find_dho2

    dho2 = DHO2([torch.nn.Parameter(torch.zeros(3))], rank=1, lanczos_order=2)

    class Wrapper:
        def __init__(self, **attrs):
            self.__dict__.update(attrs)

    zero = Wrapper(optimizer=dho2)
    engine = Wrapper(optimizer=zero, basic_optimizer=dho2)
    accelerated = Wrapper(optimizer=zero, scheduler=None)
    assert find_dho2(dho2) is dho2
    assert find_dho2(engine) is dho2
    assert find_dho2(Wrapper(optimizer=accelerated)) is dho2
    assert find_dho2(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is None
    assert find_dho2(None) is None
    cyclic = Wrapper()
    cyclic.optimizer = cyclic
    assert find_dho2(cyclic) is None


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_unmodified_trainer_script_under_zero3_from_the_json_alone(tmp_path):
    """``ds_configs/dho2_zero3.json`` (with refreshes early enough for a short run) drives the Trainer at W=2:
    DHO2 binds to ZeRO-3's partitions and refreshes its curvature there."""
    config = json.loads((REPO / "ds_configs" / "dho2_zero3.json").read_text())
    config["optimizer"]["params"].update(warmup_steps=10, refresh_interval=10)
    config["optimizer"]["params"]["curvature"]["back_off"] = False  # a short run keeps its basis
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(config))
    ds_dho2_bin = shutil.which("ds-dho2") or str(BIN / "ds-dho2")
    text = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), ds_dho2_bin, "run",
                "recipes/plain_trainer.py", "--deepspeed", str(path), "--max-steps", "40",
                "--output-dir", str(tmp_path / "plain")], timeout=280)
    assert "engine basic_optimizer: DHO2" in text and "DHO2 bound to DeepSpeed engine (ZeRO stage 3)" in text
    assert text.count("DHO2 curvature refresh at step") >= 2, text[-3000:]
    losses = json.loads(next(line for line in text.splitlines() if line.startswith("train losses:")).split(":", 1)[1])
    assert losses[-1] < losses[0]
