"""The ``ds-dho2`` command.

``ds-dho2 run SCRIPT [ARGS...]`` (or ``ds-dho2 run -m MODULE [ARGS...]``) imports ds_dho2, which registers
``"type": "DHO2"`` with DeepSpeed, and then runs an unmodified training script as ``__main__`` with its own
arguments. It works as the program under ``torchrun``, the ``deepspeed`` launcher and ``accelerate launch``
(``accelerate launch --no_python ds-dho2 run train.py ...``, ``deepspeed --no_python ds-dho2 run train.py ...``
or ``python -m ds_dho2.cli run ...``).
``ds-dho2 bench ...`` runs the benchmark suites (see ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import runpy
import sys


def run_script(target: str, args: list[str], as_module: bool = False) -> None:
    """Register DHO2, then execute ``target`` exactly as ``python target args...`` would."""
    import ds_dho2  # noqa: F401 - registers the optimizer with DeepSpeed

    sys.argv = [target, *args]
    if as_module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, _script_dir(target))
        runpy.run_path(target, run_name="__main__")


def _script_dir(path: str) -> str:
    import os

    return os.path.dirname(os.path.abspath(path))


def _split_launcher_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take out the ``--local_rank`` flag the ``deepspeed`` launcher puts right after the program.

    ``deepspeed --no_python ds-dho2 run train.py ...`` starts ``ds-dho2 --local_rank=N run train.py ...``;
    the flag belongs to the script, exactly where ``python train.py --local_rank=N ...`` would have it.
    """
    forwarded = []
    while argv and argv[0].startswith("--local_rank"):
        flag = argv.pop(0)
        forwarded.append(flag)
        if "=" not in flag and argv:
            forwarded.append(argv.pop(0))
    return argv, forwarded


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, launcher_flags = _split_launcher_flags(argv)
    parser = argparse.ArgumentParser(prog="ds-dho2", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an unmodified training script with DHO2 registered in DeepSpeed")
    run.add_argument("-m", dest="module", action="store_true", help="TARGET is a module name, as in python -m")
    run.add_argument("target", help="script path (or module name with -m)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script unchanged")
    bench = sub.add_parser("bench", help="run a benchmark suite (python -m benchmarks --help)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    if options.command == "run":
        run_script(options.target, [*launcher_flags, *options.args], as_module=options.module)
        return 0
    sys.argv = ["benchmarks", *options.args]
    runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
