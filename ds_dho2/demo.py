"""The main demo: a short 2-process DeepSpeed run (ZeRO-2, CPU) of the char-level GPT-2 recipe with DHO2
and with AdamW from the same initial weights, printing both validation figures side by side.

``python -m ds_dho2.demo`` (``bash scripts/run_demo.sh``) launches
``torchrun --nproc_per_node 2 recipes/train_char_lm.py --optimizer both ...`` with ``DS_ACCELERATOR=cpu``
and offline Hugging Face settings. It needs the source checkout (the ``recipes/`` folder next to
``ds_dho2/``) and the shared data in ``../shared/data`` (or ``$DS_DHO2_DATA_DIR``). Outputs, including
``loss_curves.png``, go to ``--output-dir`` (default ``outputs/demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "recipes" / "train_char_lm.py"


def build_command(args: argparse.Namespace) -> list[str]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    launcher = [torchrun] if Path(torchrun).exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--nproc_per_node", str(args.nproc), "--master_port", str(args.master_port), str(RECIPE),
            "--optimizer", "both", "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--logging-steps", str(args.logging_steps),
            "--warmup-steps", str(args.refresh_warmup), "--refresh-interval", str(args.refresh_interval),
            "--rank", str(args.rank), "--eval-samples", str(args.eval_samples), "--output-dir", str(args.output_dir),
            "--eval-steps", str(args.eval_steps)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_dho2.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (data-parallel ranks)")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16, help="per-process micro batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--rank", type=int, default=4, help="DHO2 curvature rank k")
    parser.add_argument("--refresh-interval", type=int, default=30)
    parser.add_argument("--refresh-warmup", type=int, default=10, help="steps before DHO2's first refresh")
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--master-port", type=int, default=29517)
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "outputs" / "demo"))
    args = parser.parse_args(argv)
    if not RECIPE.is_file():
        print(f"recipe not found at {RECIPE}: run the demo from a source checkout", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    command = build_command(args)
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        print(f"demo failed (exit {result.returncode}) after {wall:.0f} s", file=sys.stderr)
        return result.returncode
    summary = json.loads((Path(args.output_dir) / "summary.json").read_text())
    runs = {run["optimizer"]: run for run in summary["runs"]}
    print(f"\n== demo: {args.nproc}-process DeepSpeed ZeRO-2 on CPU, {args.max_steps} steps each ==")
    print(f"{'':<22}{'DHO2':>12}{'AdamW':>12}")
    for label, key in (("validation loss", "eval_loss"), ("validation perplexity", "eval_perplexity")):
        print(f"{label:<22}" + "".join(f"{runs[name]['metrics'][key]:>12.4f}" for name in ("dho2", "adamw")))
    print(f"{'train seconds':<22}" + "".join(f"{runs[name]['train_seconds']:>12.1f}" for name in ("dho2", "adamw")))
    curvature = runs["dho2"].get("curvature") or {}
    print(f"DHO2 curvature refreshes: {curvature.get('refresh_count')}, top eigenvalues: "
          f"{[round(v, 3) for v in curvature.get('eigenvalues', [])]}")
    print(f"plot: {Path(args.output_dir) / 'loss_curves.png'}; total wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
