"""Step-time spikes of blocking vs interleaved curvature refresh, and HVP cost relative to a gradient.

Trains a small character-level GPT-2 on tinyshakespeare in one process with AdamW (DHO2 with curvature
off, which is exactly AdamW), DHO2 with blocking refreshes and DHO2 with interleaved refreshes, and
records every step's wall time (forward + backward + optimizer step). Figures: median step, slowest step,
slowest/median ratio and total time per mode; HVP time per strategy / gradient time on the same batch.

    python -m benchmarks overlap [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import RESULTS_DIR, pyplot, write_results
from ds_dho2 import DHO2
from ds_dho2.config import HVPMethod
from ds_dho2.data import char_lm_blocks, load_tinyshakespeare
from ds_dho2.hvp.strategies import HessianVectorProduct


def build_model(vocab_size: int, block_size: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=128, n_layer=2, n_head=4,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def time_steps(mode: str, blocks: torch.Tensor, args: argparse.Namespace, vocab: int) -> dict:
    model = build_model(vocab, blocks.shape[1] - 1)
    curvature = {"enabled": mode != "adamw", "mode": "interleaved" if mode == "interleaved" else "blocking"}
    opt = DHO2(model.parameters(), lr=1e-3, rank=args.rank, lanczos_order=args.order,
               refresh_interval=args.interval, warmup_steps=args.interval, curvature=curvature).attach(model)
    generator = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(args.steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (args.batch,), generator=generator)]
        started = time.perf_counter()
        opt.zero_grad()
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    measured = times[args.interval // 2:]  # skip start-up steps, keep several full windows
    median = statistics.median(measured)
    return {"mode": mode, "step_seconds": times, "loss": losses, "median_step_s": median,
            "slowest_step_s": max(measured), "slowest_over_median": max(measured) / median,
            "mean_step_s": statistics.fmean(measured), "total_s": sum(times),
            "refreshes": opt.curvature_stats().get("refresh_count", 0)}


def hvp_cost(blocks: torch.Tensor, args: argparse.Namespace, vocab: int, repeats: int) -> dict:
    """Seconds per HVP for each strategy divided by seconds per gradient (forward + backward)."""
    model = build_model(vocab, blocks.shape[1] - 1)
    batch = blocks[: args.batch]
    params = [p for p in model.parameters() if p.requires_grad]

    def closure() -> torch.Tensor:
        return model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss

    def timed(fn) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats

    gradient = timed(lambda: torch.autograd.grad(closure(), params))
    vectors = [torch.randn_like(p) for p in params]
    result = {"gradient_s": gradient}
    for method in (HVPMethod.FORWARD, HVPMethod.REVERSE, HVPMethod.FINITE_DIFFERENCE):
        hvp = HessianVectorProduct(method)
        seconds = timed(lambda: hvp(model, params, closure, vectors))
        result[method.value] = {"seconds": seconds, "relative_to_gradient": seconds / gradient}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (CI smoke test)")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--interval", type=int, default=32, help="refresh interval (and warm-up)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--order", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.interval, args.order, args.rank = 24, 8, 8, 2
    blocks, tokenizer = char_lm_blocks(load_tinyshakespeare(), args.block_size, split="train")
    vocab = tokenizer.vocab_size
    runs = [time_steps(mode, blocks, args, vocab) for mode in ("adamw", "blocking", "interleaved")]
    costs = hvp_cost(blocks, args, vocab, repeats=2 if args.quick else 5)
    summary = {r["mode"]: {k: r[k] for k in ("median_step_s", "slowest_step_s", "slowest_over_median",
                                             "mean_step_s", "total_s", "refreshes")} for r in runs}
    path = write_results("overlap_quick" if args.quick else "overlap", {
        "settings": vars(args), "summary": summary, "hvp_cost": costs,
        "runs": [{k: r[k] for k in ("mode", "step_seconds", "loss")} for r in runs]})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in runs:
        ax.plot([1000 * t for t in r["step_seconds"]], label=f"{r['mode']} (slowest/median {r['slowest_over_median']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("step wall time (ms)")
    ax.set_yscale("log")
    ax.set_title(f"Refresh every {args.interval} steps, Lanczos order {args.order}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / ("overlap_quick.png" if args.quick else "overlap.png"), dpi=110)
    print(f"{'mode':<12}{'median ms':>10}{'slowest ms':>11}{'slowest/median':>16}{'total s':>9}")
    for mode, s in summary.items():
        print(f"{mode:<12}{1000 * s['median_step_s']:>10.1f}{1000 * s['slowest_step_s']:>11.1f}"
              f"{s['slowest_over_median']:>16.2f}{s['total_s']:>9.2f}")
    print("HVP cost / gradient:", {k: round(v["relative_to_gradient"], 2) for k, v in costs.items() if isinstance(v, dict)})
    print("results:", path)
    return summary


if __name__ == "__main__":
    main()
