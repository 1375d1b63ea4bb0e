"""Train a few DHO2 steps with ds_configs/dho2_zero2.json (via load_config) under torchrun; print a checksum.

Used by tests/distributed/zero_test.py with ``torchrun --nnodes 2 --node_rank i --nproc_per_node 1``.
Prints ``CHECKSUM rank=R world=W refreshes=N value=V`` (V: repr of the float64 sum of |params| and params).
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

import deepspeed  # noqa: E402

import ds_dho2  # noqa: E402, F401 - registers "type": "DHO2"
from ds_dho2.cli import exit_without_native_teardown, shut_down_process_group  # noqa: E402
from ds_dho2.integrations.deepspeed import load_config  # noqa: E402
from tests.helpers import ds_setup as S  # noqa: E402


def main() -> None:
    world = int(os.environ["WORLD_SIZE"])
    config = S.keep_curvature(load_config(os.path.join(ROOT, "ds_configs", "dho2_zero2.json"),
                                          train_micro_batch_size_per_gpu=4, lr=1e-2, rank=4, refresh_interval=2,
                                          warmup_steps=2))
    model = S.LossModel()
    engine, *_ = deepspeed.initialize(model=model, config=config)
    rank = engine.global_rank
    for batch in S.batches(5, 4 * world):
        loss = engine(*S.shard(batch, rank, world))
        engine.backward(loss)
        engine.step()
    flat = S.flat_params(model).double()
    opt = engine.basic_optimizer
    refreshes = opt.tracker.state.refresh_count
    print(f"CHECKSUM rank={rank} world={world} refreshes={refreshes} optimizer={type(opt).__name__} "
          f"value={float(flat.sum())!r}/{float(flat.abs().sum())!r}", flush=True)
    if shut_down_process_group():  # an interpreter-exit teardown of gloo can abort a rank
        exit_without_native_teardown(0)


if __name__ == "__main__":
    main()
