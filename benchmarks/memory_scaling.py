"""Memory scaling of DHO2's sharded curvature state under DeepSpeed ZeRO-2 (docs/design.md, "Curvature").

Run: ``python -m benchmarks.memory_scaling [--quick]`` (CPU, gloo; DS_ACCELERATOR=cpu is set here).

For W = 1, 2, 4 data-parallel ranks, one ZeRO-2 fp32 engine per W trains an MLP (>= 20M parameters;
``--quick``: ~2M) with DHO2 at its defaults (rank k = 4, Lanczos order 2k = 8, float32 basis, warm starts) on an
interleaved schedule of 4 Lanczos iterations per step. Schedule: warm-up 2 steps; refresh 1 runs on steps
2-3; steps 4-9 are plain hybrid steps (the eigenbasis in use, no Lanczos in flight); refresh 2 starts at
step 10, so after step 10 a rank holds eigenvectors, Newton momentum *and* a Lanczos basis. Reported per
rank:

* curvature-state bytes: eigenvectors (k x P_r), Newton momentum (k), Lanczos run state (m x P_r basis)
  — also in units of one float32 vector of the partition's length (target: at most 3k during a refresh,
  k at rest) — and, separately, the base optimizer's AdamW moments (2 x P_r);
* peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``);
* ``engine.step()`` time: DHO2 median over the non-refresh hybrid steps vs DeepSpeed's AdamW
  (``torch_adam``) median on the same engine config; amortised refresh cost = the first refresh's total
  time (DHO2's ``refresh_seconds``) / ``refresh_interval``.

Writes ``benchmarks/results/memory_scaling.json`` and ``memory_scaling.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info
from ds_dho2.config import DHO2Config

_DEFAULTS = DHO2Config()

RESULTS = Path(__file__).resolve().parent / "results"
RANK, ORDER = _DEFAULTS.rank, _DEFAULTS.lanczos_order  # the library defaults: k = 4, order 2k = 8
ITERS_PER_STEP, WARMUP, REFRESH_INTERVAL = 4, 2, 8
DHO2_STEPS = WARMUP + REFRESH_INTERVAL  # 10: refresh 2 starts on the last step
HYBRID_STEPS = range(WARMUP + ORDER // ITERS_PER_STEP, WARMUP + REFRESH_INTERVAL)  # steps 4..9
ADAMW_STEPS = 6


class MLP(torch.nn.Module):
    """A deep MLP regression model whose forward returns the loss (so DHO2 finds it)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.net(x), y)


def widths(quick: bool) -> list[int]:
    return [256, 1024, 1024, 256, 16] if quick else [1024, 2048, 4096, 2048, 2048, 1024, 16]


def count(quick: bool) -> int:
    w = widths(quick)
    return sum(a * b + b for a, b in zip(w[:-1], w[1:]))


def engine_config(optimizer: dict, micro_batch: int) -> dict:
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "optimizer": optimizer,
            "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                  "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def _bytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


def _data(step: int, rank: int, micro: int, w: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(micro, w[0], generator=g), torch.randn(micro, w[-1], generator=g)


def _timed_steps(engine: Any, rank: int, micro: int, w: list[int], steps: int, after_step: Any = None) -> list[float]:
    times = []
    for step in range(steps):
        loss = engine(*_data(step, rank, micro, w))
        engine.backward(loss)
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
        if after_step is not None:
            after_step(step + 1)
    return times


def rank_worker(rank: int, world: int, quick: bool, micro: int) -> dict:
    import deepspeed

    import ds_dho2  # noqa: F401 - registers DHO2

    w = widths(quick)
    torch.manual_seed(0)
    model = MLP(w)
    # the library defaults (float32 basis, order 2k, warm starts) on an interleaved schedule that keeps a
    # refresh in flight at the measured step; exact products and a fixed interval keep the schedule fixed
    dho2 = {"lr": 1e-4, "rank": RANK, "refresh_interval": REFRESH_INTERVAL, "warmup_steps": WARMUP, "hvp": "reverse",
            "curvature": {"mode": "interleaved", "iterations_per_step": ITERS_PER_STEP,
                          "max_interval": REFRESH_INTERVAL}}
    engine, *_ = deepspeed.initialize(model=model, config=engine_config({"type": "DHO2", "params": dho2}, micro))
    opt = engine.basic_optimizer
    out: dict[str, Any] = {"partition_numel": opt.param_groups[0]["params"][0].numel()}

    def after(step: int) -> None:
        if step == WARMUP + ORDER // ITERS_PER_STEP - 1:
            out["refresh_seconds"] = float(opt.curvature_stats().get("refresh_seconds", float("nan")))
        if step == DHO2_STEPS:
            curvature = opt.tracker.state
            lanczos = curvature.lanczos
            out["bytes"] = {
                "eigenvectors": _bytes(curvature.eigenvectors),
                "newton_momentum": _bytes(opt.newton.state.momentum),
                "lanczos": 0 if lanczos is None else sum(_bytes(t) for t in lanczos.tensors()),
                "lanczos_basis": _bytes(None if lanczos is None else lanczos.basis),
                "base_moments": sum(_bytes(t) for t in opt.base.state.tensors() if t.dim() > 0),
            }

    times = _timed_steps(engine, rank, micro, w, DHO2_STEPS, after)
    out["dho2_step_times"] = times
    out["dho2_hybrid_median"] = statistics.median(times[s - 1] for s in HYBRID_STEPS)
    out["peak_rss_dho2_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del engine, opt
    torch.manual_seed(0)
    model = MLP(w)
    adamw = {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}
    engine, *_ = deepspeed.initialize(model=model, config=engine_config(adamw, micro))
    adam_times = _timed_steps(engine, rank, micro, w, ADAMW_STEPS)
    out["adamw_step_times"] = adam_times
    out["adamw_median"] = statistics.median(adam_times[1:])
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ------------------------------------------------------------------------------------------ launcher
def launch(world: int, quick: bool, micro: int, timeout: float = 900) -> list[dict]:
    from ds_dho2.dist.local_ranks import run_ranks

    return run_ranks(rank_worker, world, quick, micro, timeout=timeout)


# ------------------------------------------------------------------------------------------- report
def summarise(per_world: dict[int, list[dict]], num_params: int) -> dict:
    rows = []
    for world, ranks in sorted(per_world.items()):
        r0 = ranks[0]
        curvature = [r["bytes"]["eigenvectors"] + r["bytes"]["newton_momentum"] + r["bytes"]["lanczos"] for r in ranks]
        rows.append({
            "world_size": world, "partition_numel": r0["partition_numel"],
            "curvature_bytes_per_rank_max": max(curvature),
            "eigenvector_bytes": r0["bytes"]["eigenvectors"], "newton_momentum_bytes": r0["bytes"]["newton_momentum"],
            "lanczos_state_bytes": r0["bytes"]["lanczos"], "lanczos_basis_bytes": r0["bytes"]["lanczos_basis"],
            "base_moment_bytes": r0["bytes"]["base_moments"],
            "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in ranks),
            "peak_rss_dho2_phase_bytes_max": max(r["peak_rss_dho2_bytes"] for r in ranks),
            "dho2_step_median_s": max(r["dho2_hybrid_median"] for r in ranks),
            "adamw_step_median_s": max(r["adamw_median"] for r in ranks),
            "refresh_seconds": max(r["refresh_seconds"] for r in ranks),
        })
        row = rows[-1]
        vector = 4 * row["partition_numel"]  # one float32 vector the length of this rank's partition
        row["curvature_vectors_during_refresh"] = row["curvature_bytes_per_rank_max"] / vector
        row["curvature_vectors_at_rest"] = (row["eigenvector_bytes"] + row["newton_momentum_bytes"]) / vector
        row["step_time_ratio"] = row["dho2_step_median_s"] / row["adamw_step_median_s"]
        row["amortised_refresh_s_per_step"] = row["refresh_seconds"] / REFRESH_INTERVAL
        row["amortised_total_ratio"] = (row["dho2_step_median_s"] + row["amortised_refresh_s_per_step"]) / \
            row["adamw_step_median_s"]
    by_world = {row["world_size"]: row for row in rows}
    ratio = None
    if 1 in by_world and max(by_world) > 1:
        ratio = by_world[1]["curvature_bytes_per_rank_max"] / by_world[max(by_world)]["curvature_bytes_per_rank_max"]
    return {"num_params": num_params, "rank": RANK, "lanczos_order": ORDER, "refresh_interval": REFRESH_INTERVAL,
            "iterations_per_step": ITERS_PER_STEP, "zero_stage": 2, "dtype": "fp32", "lanczos_dtype": "float32",
            "target_vectors_during_refresh": 3 * RANK, "target_vectors_at_rest": RANK,
            "cpu_cores": os.cpu_count(), "rows": rows,
            f"curvature_bytes_ratio_w1_over_w{max(by_world)}": ratio, "ideal_ratio": float(max(by_world))}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    ws = [r["world_size"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mib = 2 ** 20
    axes[0].plot(ws, [r["curvature_bytes_per_rank_max"] / mib for r in rows], "o-", label="curvature (V, u, Lanczos)")
    axes[0].plot(ws, [rows[0]["curvature_bytes_per_rank_max"] / mib / w for w in ws], "k--", label="ideal 1/W")
    axes[0].plot(ws, [r["base_moment_bytes"] / mib for r in rows], "s-", label="AdamW moments")
    axes[0].plot(ws, [r["peak_rss_dho2_phase_bytes_max"] / mib for r in rows], "^-", label="peak RSS (max rank)")
    axes[0].set(xlabel="data-parallel ranks W", ylabel="MiB per rank", xscale="log", yscale="log",
                title=f"DHO2 ZeRO-2, P={summary['num_params'] / 1e6:.1f}M, k={RANK}, m={ORDER}")
    axes[0].set_xticks(ws, [str(w) for w in ws])
    axes[0].legend(fontsize=8)
    axes[1].bar([w - 0.15 for w in ws], [r["adamw_step_median_s"] for r in rows], width=0.3, label="AdamW step")
    axes[1].bar([w + 0.15 for w in ws], [r["dho2_step_median_s"] for r in rows], width=0.3, label="DHO2 hybrid step")
    axes[1].bar([w + 0.15 for w in ws], [r["amortised_refresh_s_per_step"] for r in rows], width=0.3,
                bottom=[r["dho2_step_median_s"] for r in rows], label="+ amortised refresh")
    axes[1].set(xlabel="W", ylabel="seconds (engine.step)", title=f"{summary['cpu_cores']} CPU cores, gloo")
    axes[1].set_xticks(ws)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~2M-parameter model (a smoke run)")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_world = {}
    for world in [int(w) for w in args.worlds.split(",")]:
        started = time.perf_counter()
        per_world[world] = launch(world, args.quick, args.micro_batch)
        print(f"W={world}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    summary = summarise(per_world, count(args.quick))
    summary["quick"] = args.quick
    summary["raw"] = {str(w): [{k: v for k, v in r.items()} for r in ranks] for w, ranks in per_world.items()}
    summary["command"] = " ".join(["python -m benchmarks scaling", *(argv if argv is not None else sys.argv[1:])])
    summary["machine"] = machine_info()
    (out / "memory_scaling.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "memory_scaling.png")
    mib = 2 ** 20
    print(f"P = {summary['num_params']:,} params; DHO2 k={RANK}, m={ORDER}; ZeRO-2 fp32; per-rank figures (max over ranks)")
    print(f"{'W':>2} {'P_r':>10} {'curv MiB':>9} {'V MiB':>7} {'basis MiB':>9} {'Adam MiB':>8} {'RSS MiB':>8} "
          f"{'AdamW s':>8} {'DHO2 s':>8} {'ratio':>6} {'refresh s':>9} {'amort s':>8}")
    for r in summary["rows"]:
        print(f"{r['world_size']:>2} {r['partition_numel']:>10,} {r['curvature_bytes_per_rank_max'] / mib:>9.1f} "
              f"{r['eigenvector_bytes'] / mib:>7.1f} {r['lanczos_basis_bytes'] / mib:>9.1f} "
              f"{r['base_moment_bytes'] / mib:>8.1f} {r['peak_rss_bytes_max'] / mib:>8.0f} "
              f"{r['adamw_step_median_s']:>8.3f} {r['dho2_step_median_s']:>8.3f} {r['step_time_ratio']:>6.2f} "
              f"{r['refresh_seconds']:>9.2f} {r['amortised_refresh_s_per_step']:>8.3f}")
    key = next(k for k in summary if k.startswith("curvature_bytes_ratio"))
    print(f"{key} = {summary[key]} (ideal {summary['ideal_ratio']})")
    for r in summary["rows"]:
        print(f"W={r['world_size']}: curvature state = {r['curvature_vectors_during_refresh']:.2f} float32 P_r-vectors "
              f"during a refresh (target <= {3 * RANK}), {r['curvature_vectors_at_rest']:.2f} at rest (target {RANK})")
    print(f"wrote {out / 'memory_scaling.json'} and {out / 'memory_scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
