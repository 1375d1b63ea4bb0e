"""Heavy-ball stability on the regime map: wherever SGD-momentum trains, DHO2's heavy-ball configuration
trains too.

Reads a recorded regime map (``benchmarks/results/regimes.json``, ``python -m benchmarks regimes``), and at
every (task, batch) runs a DHO2 configuration (default: the map's ``dho2_hb_auto``, heavy-ball base with
``rank="auto"``; ``--dho2-kwargs`` for another) at each lr of SGD-momentum's recorded seed-0 grid where
SGD-momentum ended below half its initial training loss (``--lrs grid``), or only at SGD-momentum's tuned
lr (``--lrs tuned``: the comparison of configurations, e.g. a sweep of ``lr_clip`` and ``alpha``). Each
run is the map's own runner (``benchmarks.regimes.train_run``): the same initial weights per seed, batch
order, budget and whole-training-set loss. A run *trains* when it ends below half its initial loss; at
seeds other than 0 SGD-momentum is run too, and an lr *passes* when DHO2 trains on every seed where
SGD-momentum trains.

Outputs ``benchmarks/results/<output-name>.json`` and ``.md``: per setting and lr, SGD-momentum's final
loss and the configuration's (per seed), pass or fail, rollbacks and guard events.

    python -m benchmarks map_stability [--map results/regimes.json] [--tasks autoencoder,...] [--seeds 0,1,2]
                                       [--dho2-kwargs JSON] [--lrs grid|tuned] [--output-name map_stability]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, write_results
from benchmarks.regime_tasks import make_regime_tasks
from benchmarks.regimes import dho2_method, method_registry, train_run

HALF = 0.5  # a run trains when it ends below this share of its initial loss


def sgd_lrs(setting: dict[str, Any], which: str) -> list[tuple[float, float, float]]:
    """``(lr, SGD-momentum's seed-0 final loss, initial loss)`` at the lrs to check: every lr of its grid
    where it ended below half the initial loss (``grid``), or its tuned lr (``tuned``)."""
    runs = [r for r in setting["runs"]["sgd"] if r["seed"] == 0]
    out = []
    for run in sorted(runs, key=lambda r: r["lr"]):
        initial = run["curve"][0][1]
        final = run["final_loss"] if run["final_loss"] is not None else math.inf
        if which == "tuned" and not math.isclose(run["lr"], setting["race"]["sgd"]["lr"], rel_tol=1e-9):
            continue
        if which == "grid" and not final < HALF * initial:
            continue
        out.append((run["lr"], final, initial))
    return out


def check_setting(task, data, batch: int, setting: dict[str, Any], method, seeds: list[int],
                  which: str) -> list[dict[str, Any]]:
    """Every check of one (task, batch): the configuration at each lr, per seed, next to SGD-momentum on the
    same seed (the map's own seed-0 run; other seeds are run here). A seed where SGD-momentum does not
    train either makes no claim (``applies`` false); the lr passes when every seed where it trains passes."""
    sgd = method_registry()["sgd"]
    rows = []
    for lr, sgd_final, initial in sgd_lrs(setting, which):
        row = {"lr": lr, "sgd_final_loss": sgd_final, "initial_loss": initial, "runs": []}
        for seed in seeds:
            if seed == 0:
                reference = {"final_loss": sgd_final, "initial": initial}
            else:
                record = train_run(task, data, batch, sgd, lr, seed)
                reference = {"final_loss": record["final_loss"], "initial": record["curve"][0][1]}
            sgd_trains = bool(reference["final_loss"] < HALF * reference["initial"])
            record = train_run(task, data, batch, method, lr, seed)
            final = record["final_loss"]
            trains = bool(final < HALF * record["curve"][0][1]) if record["curve"] else False
            row["runs"].append({"seed": seed, "final_loss": final if math.isfinite(final) else None,
                                "initial_loss": record["curve"][0][1] if record["curve"] else None,
                                "sgd_final_loss": reference["final_loss"] if math.isfinite(reference["final_loss"])
                                else None, "applies": sgd_trains, "passes": trains or not sgd_trains,
                                "diverged": record["diverged"], "error": record["error"],
                                "seconds": record["seconds"], "curvature": record.get("curvature") or {}})
            verdict = "passes" if trains else ("FAILS" if sgd_trains else "SGD-momentum fails too")
            print(f"[map_stability] {task.name} B={batch} lr {lr:.4g} seed {seed}: final {final:.5g} "
                  f"(SGD-momentum {reference['final_loss']:.5g}; {verdict})", flush=True)
        row["passes"] = all(r["passes"] for r in row["runs"])
        rows.append(row)
    return rows


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# Heavy-ball stability on the regime map", "",
             f"Command: `{payload.get('command', '')}`; git {payload.get('git', {}).get('commit', '?')[:12]}. "
             f"Configuration: `{json.dumps(payload['configuration'])}`; map: `{payload['map']}`; seeds "
             f"{payload['seeds']}. A run trains when it ends below half its initial training loss; an lr passes when "
             "DHO2 trains on every seed where SGD-momentum (same seed, same lr) trains.", "",
             f"**{payload['passed']} of {payload['checks']} lrs pass** (every seed).", "",
             "| task | batch | lr | SGD-momentum final (per seed) | DHO2 final (per seed) | passes | rollbacks |",
             "|---|---|---|---|---|---|---|"]
    for task, batches in payload["tasks"].items():
        for batch, rows in batches.items():
            for row in rows:
                finals = ", ".join("diverged" if r["final_loss"] is None else f"{r['final_loss']:.4g}" for r in row["runs"])
                sgd = ", ".join("diverged" if r["sgd_final_loss"] is None else f"{r['sgd_final_loss']:.4g}"
                                for r in row["runs"])
                rollbacks = ", ".join(str((r["curvature"] or {}).get("rollbacks", 0)) for r in row["runs"])
                lines.append(f"| {task} | {batch} | {row['lr']:.4g} | {sgd} | {finals} | "
                             f"{'yes' if row['passes'] else '**no**'} | {rollbacks} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks map_stability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--map", default=str(RESULTS_DIR / "regimes.json"), help="a recorded regimes result")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the map's tasks")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes to keep (default: all)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0, SGD-momentum's grid seed)")
    parser.add_argument("--dho2-kwargs", default=None,
                        help="DHO2 keyword arguments as JSON (default: the map's dho2_hb_auto configuration)")
    parser.add_argument("--lrs", choices=("grid", "tuned"), default="grid")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-name", default="map_stability")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    recorded = json.loads(Path(args.map).read_text())
    if args.dho2_kwargs:
        kwargs = json.loads(args.dho2_kwargs)
        method = dho2_method("dho2_checked", kwargs, "DHO2 (checked configuration)")
    else:
        method = method_registry()["dho2_hb_auto"]
        kwargs = method.kwargs
    seeds = [int(s) for s in args.seeds.split(",")]
    keep = None if not args.batches else set(args.batches.split(","))
    quick = bool((recorded.get("settings") or {}).get("quick")) or any(
        (s.get("settings") or {}).get("quick") for s in recorded.get("sources", []))
    tasks = make_regime_tasks(quick=quick)
    wanted = args.tasks.split(",") if args.tasks else list(recorded["tasks"])
    from benchmarks.convergence import _git_state

    payload: dict[str, Any] = {"benchmark": "map_stability", "git": _git_state(), "map": args.map, "seeds": seeds,
                               "configuration": kwargs, "lrs": args.lrs, "tasks": {}}
    started = time.perf_counter()
    for name in wanted:
        task = tasks[name]
        data = task.load_data()
        for batch, setting in recorded["tasks"][name]["batches"].items():
            if keep is not None and batch not in keep:
                continue
            rows = check_setting(task, data, int(batch), setting, method, seeds, args.lrs)
            payload["tasks"].setdefault(name, {})[batch] = rows
            payload["checks"] = sum(len(r) for b in payload["tasks"].values() for r in b.values())
            payload["passed"] = sum(row["passes"] for b in payload["tasks"].values() for r in b.values() for row in r)
            payload["wall_seconds"] = time.perf_counter() - started
            path = write_results(args.output_name, payload)
            path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
    print(f"[map_stability] {payload.get('passed', 0)} of {payload.get('checks', 0)} lrs pass "
          f"({payload.get('wall_seconds', 0):.0f} s)")
    return payload


if __name__ == "__main__":
    main()
