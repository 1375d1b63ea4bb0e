"""DHO2 on a CUDA device: the single-process optimizer and a one-GPU DeepSpeed ZeRO-2 bf16 engine through
several curvature refreshes. Every tensor DHO2 creates must live on the parameters' device, and the
non-refresh steps must not synchronise with the host (``torch.cuda.set_sync_debug_mode("error")`` turns
any synchronising call into an error). Skipped without CUDA; run with ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model(device: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=65, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).to(device)


def _batches(steps: int, size: int, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 65, (size, 64), generator=generator).to(device) for _ in range(steps)]


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def test_single_process_refreshes_on_cuda_without_host_syncs() -> None:
    from ds_dho2 import DHO2

    model = _model("cuda")
    opt = DHO2(model.parameters(), lr=1e-3, rank=4, refresh_interval=5, warmup_steps=3, max_nonfinite_steps=1000,
               curvature={"max_interval": 5}).attach(model)
    checked = 0
    for step, ids in enumerate(_batches(20, 8, "cuda"), start=1):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if opt.tracker.wants_products(step) or step == 1:
            opt.step()
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked += 1
    assert opt.eigenvalues is not None and opt.curvature_stats()["refresh_count"] >= 3
    assert checked >= 10
    state = opt.state[opt.param_groups[0]["params"][0]]
    for tensor in _tensors(state):
        assert tensor.device.type == "cuda", tensor.shape
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_gpu_deepspeed_zero2_bf16_refreshes() -> None:
    deepspeed = pytest.importorskip("deepspeed")
    import ds_dho2  # noqa: F401 - registers DHO2

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    model = _model("cuda")
    config = {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "DHO2", "params": {"lr": 1e-3, "rank": 4, "refresh_interval": 5,
                                                       "warmup_steps": 3}},
              "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    for ids in _batches(20, 8, "cuda"):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    opt = engine.basic_optimizer
    assert opt.eigenvalues is not None and opt.eigenvalues.device.type == "cuda"
    assert opt.curvature_stats()["refresh_count"] >= 3
    for tensor in _tensors(opt.state[opt.param_groups[0]["params"][0]]):
        assert tensor.device.type == "cuda", tensor.shape
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
