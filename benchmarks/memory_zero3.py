"""Memory per rank of DHO2 under DeepSpeed ZeRO-3: parameters, gradients, optimizer and curvature.

Run: ``python -m benchmarks zero3_memory [--quick]`` (CPU, gloo; DS_ACCELERATOR=cpu is set here).

For W = 1, 2, 4 ranks, a ZeRO-3 fp32 engine trains an MLP (25.2M parameters; ``--quick``: about 2M)
with DHO2 at its defaults (k = 4, Lanczos order 8, float32 basis) on an interleaved schedule (4 Lanczos
iterations per step), so that after the measured step a refresh is in flight. Per rank it counts the bytes
of the tensors each part holds at that moment:

* parameters: this rank's slices (``ds_tensor``) plus the small parameters ZeRO-3 keeps whole;
* gradients: ZeRO-3's gradient partition buffers and the fp32 gradient partition;
* optimizer: the fp32 master partition and AdamW's two moments;
* curvature: eigenvectors, Newton momentum, the Lanczos basis in flight, and the largest set of tensors a
  finite-difference products session held (its base gradient and the saved slices), recorded while it ran.

Writes ``benchmarks/results/memory_zero3.json`` and ``.png`` and prints a table. The claims it checks:
the total divides by W (W=1 / W=4 >= 3.8) and, during a refresh, the curvature state is k eigenvectors +
the m = 2k Lanczos basis + 2 partition-length vectors per rank (3k + 2), nothing full-length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info
from benchmarks.memory_scaling import MLP, count, widths
from ds_dho2.config import DHO2Config

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = DHO2Config()
ITERS_PER_STEP, WARMUP, INTERVAL = 4, 2, 2
#: refresh 1 runs on steps 2-3 (order 8, 4 iterations a step); refresh 2 starts at step 4, so after step 4 a
#: rank holds the eigenvectors, the Lanczos basis in flight and what a products session keeps
STEPS = WARMUP + 2


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def rank_worker(rank: int, world: int, quick: bool, micro: int) -> dict:
    import deepspeed

    import ds_dho2  # noqa: F401 - registers "type": "DHO2"
    import ds_dho2.hvp.partitioned as partitioned

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    held: dict[str, int] = {"session": 0}
    open_session = partitioned.PartitionedFiniteDifference.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        open_session(self, *args, **kwargs)
        slices = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.layout.params)
        held["session"] = max(held["session"], _bytes([self._base]) + slices)  # base + shifted-slice backups

    partitioned.PartitionedFiniteDifference.__init__ = counting
    params = {"lr": 1e-4, "warmup_steps": WARMUP, "refresh_interval": INTERVAL,
              "curvature": {"mode": "interleaved", "iterations_per_step": ITERS_PER_STEP,
                            "back_off": False}}  # the memory of a curvature in use, not of a dormant one
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "DHO2", "params": params}, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 3, "sub_group_size": 10 ** 12, "stage3_param_persistence_threshold": 0}}
    torch.manual_seed(0)
    model = MLP(widths(quick))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    w = widths(quick)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x, y = torch.randn(micro, w[0], generator=generator), torch.randn(micro, w[-1], generator=generator)
        engine.backward(engine(x, y))
        engine.step()
    zero, opt = engine.optimizer, engine.basic_optimizer
    fp32 = zero.fp32_partitioned_groups_flat[0]
    buffers = zero._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
    params_bytes = sum(_bytes([p.ds_tensor]) + (_bytes([p.data]) if p.data.numel() == p.ds_numel else 0)
                       for p in zero.fp16_groups[0])
    curvature = opt.tracker.state
    out = {
        "partition_numel": fp32.numel(),
        "parameters": params_bytes,
        "gradients": _bytes(buffers.values()) + _bytes([fp32.grad]),
        "optimizer": _bytes([fp32]) + _bytes(opt.base.state.tensors()),
        "eigenvectors": _bytes([curvature.eigenvectors]),
        "newton_momentum": _bytes([opt.newton.state.momentum]),
        "lanczos_basis": 0 if curvature.lanczos is None else _bytes([curvature.lanczos.basis]),
        "products_session": held["session"],
        "refresh_in_flight": curvature.lanczos is not None,
    }
    out["curvature"] = out["eigenvectors"] + out["newton_momentum"] + out["lanczos_basis"] + out["products_session"]
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"] + out["curvature"]
    return out


def summarise(per_world: dict[int, list[dict]], num_params: int) -> dict:
    rows = []
    for world, ranks in sorted(per_world.items()):
        row = {key: max(r[key] for r in ranks) for key in ranks[0] if key != "refresh_in_flight"}
        row["world_size"] = world
        row["refresh_in_flight"] = all(r["refresh_in_flight"] for r in ranks)
        vector = 4 * row["partition_numel"]
        row["curvature_vectors_during_refresh"] = row["curvature"] / vector
        rows.append(row)
    by_world = {row["world_size"]: row for row in rows}
    top = max(by_world)
    return {"num_params": num_params, "rank": DEFAULTS.rank, "lanczos_order": DEFAULTS.lanczos_order,
            "zero_stage": 3, "dtype": "fp32", "rows": rows,
            f"total_bytes_ratio_w1_over_w{top}": by_world[1]["total"] / by_world[top]["total"] if 1 in by_world else None,
            "target_total_ratio": 3.8,
            "target_curvature_vectors_during_refresh": 3 * DEFAULTS.rank + 2,
            "target_note": "k eigenvectors + the m = 2k Lanczos basis rows in flight + 2 vectors a products "
                           "session keeps (its base gradient and the saved slices)"}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    ws = [r["world_size"] for r in rows]
    mib = 2 ** 20
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bottom = [0.0] * len(rows)
    for key in ("parameters", "gradients", "optimizer", "curvature"):
        values = [r[key] / mib for r in rows]
        ax.bar([str(w) for w in ws], values, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.plot([str(w) for w in ws], [rows[0]["total"] / mib / w for w in ws], "k--", label="ideal total / W")
    ax.set(xlabel="data-parallel ranks W", ylabel="MiB per rank (max over ranks)",
           title=f"DHO2 under ZeRO-3, P={summary['num_params'] / 1e6:.1f}M, refresh in flight")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~2M-parameter model (a smoke run)")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--output-name", default="memory_zero3")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ds_dho2.dist.local_ranks import run_ranks

    per_world = {w: run_ranks(rank_worker, w, args.quick, args.micro_batch, timeout=900)
                 for w in (int(v) for v in args.worlds.split(","))}
    summary = summarise(per_world, count(args.quick))
    summary.update(quick=args.quick, machine=machine_info(),
                   command=" ".join(["python -m benchmarks zero3_memory", *(argv if argv is not None else sys.argv[1:])]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.output_name}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / f"{args.output_name}.png")
    mib = 2 ** 20
    print(f"P = {summary['num_params']:,}; ZeRO-3 fp32; per-rank MiB (max over ranks), refresh in flight")
    print(f"{'W':>2} {'params':>8} {'grads':>8} {'optim':>8} {'curv':>8} {'total':>8} {'curv/P_r vec':>12}")
    for r in summary["rows"]:
        print(f"{r['world_size']:>2} {r['parameters'] / mib:>8.1f} {r['gradients'] / mib:>8.1f} "
              f"{r['optimizer'] / mib:>8.1f} {r['curvature'] / mib:>8.1f} {r['total'] / mib:>8.1f} "
              f"{r['curvature_vectors_during_refresh']:>12.2f}")
    key = next(k for k in summary if k.startswith("total_bytes_ratio"))
    print(f"{key} = {summary[key]:.2f} (target >= 3.8); curvature during a refresh: "
          f"{summary['rows'][0]['curvature_vectors_during_refresh']:.2f} P_r-vectors "
          f"(target <= {summary['target_curvature_vectors_during_refresh']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
