"""The ``ds-dho2`` command (also ``python -m ds_dho2``).

``ds-dho2 run SCRIPT [ARGS...]`` (or ``ds-dho2 run -m MODULE [ARGS...]``) registers ``"type": "DHO2"`` with
DeepSpeed and then runs an unmodified training script as ``__main__`` with its own arguments. It runs alone
as one process, or as the program of a launcher: ``torchrun ... $(which ds-dho2) run train.py ...``,
``deepspeed --no_python ds-dho2 run train.py ...``, ``accelerate launch --no_python ds-dho2 run train.py ...``.
``ds-dho2 probe [--steps N] [--max-rank K] [--output FILE] SCRIPT [ARGS...]`` runs a script the same way with
hooks that find its model, loss and optimizer, stops it after N optimizer steps and reports whether DHO2 can
help it (:mod:`ds_dho2.probe`).
``ds-dho2 to-universal INPUT_FOLDER OUTPUT_FOLDER`` converts a DeepSpeed ZeRO-1/2/3 checkpoint with DHO2 state
into a universal checkpoint, which loads at any data-parallel world size
(:mod:`ds_dho2.integrations.universal`).

Alone (no launcher variables such as ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and no MPI launcher),
``ds-dho2 run`` gives the script the environment of a one-process ``torchrun``: ``RANK=0``, ``LOCAL_RANK=0``,
``WORLD_SIZE=1``, ``LOCAL_WORLD_SIZE=1``, ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT`` (values
already set are kept). Without it ``deepspeed.init_distributed`` would fall back to MPI discovery and stop
asking for ``mpi4py``.

Start-up problems (a missing script or module, bad arguments, a DHO2 config value or a DeepSpeed set-up
DHO2 does not support) end with one line on stderr naming the problem and the fix, and a non-zero status.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import runpy
import socket
import sys
from pathlib import Path
from typing import NoReturn

import ds_dho2
from ds_dho2.logging_utils import configure_cli_logging

logger = logging.getLogger(__name__)

PROG = "ds-dho2"
#: Variables any launcher (torchrun, the deepspeed launcher, accelerate, run_ranks-style spawners) sets.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: Variables of an MPI launcher (or of a platform DeepSpeed discovers itself): DeepSpeed's own discovery
#: applies there, so ``ds-dho2 run`` leaves the environment alone.
DISCOVERY_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE",
                       "AZUREML_EXPERIMENT_ID", "SM_TRAINING_ENV")
USAGE_ERROR = 2
START_ERROR = 1


class StartupError(Exception):
    """A problem found before the training script runs; reported as one line."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (problem and where to look) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}. See '{self.prog} --help'.\n")


# ----------------------------------------------------------------------------------------------- run
def single_process_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables ``ds-dho2 run`` adds when no launcher has set any (empty under a launcher)."""
    env = os.environ if environ is None else environ
    if any(name in env for name in LAUNCHER_VARIABLES + DISCOVERY_VARIABLES):
        return {}
    if env.get("SLURM_NTASKS", "1").strip() not in ("", "1"):  # several tasks without ranks: not ours to decide
        return {}
    added = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    if not env.get("MASTER_ADDR"):
        added["MASTER_ADDR"] = "127.0.0.1"
    if not env.get("MASTER_PORT"):
        added["MASTER_PORT"] = str(_free_port())
    return added


def check_launch(environ: dict[str, str] | None = None) -> None:
    """Refuse (:class:`StartupError`) or warn about ``accelerate launch`` set-ups that would not train with DHO2.

    accelerate's simple launcher (used when it has no GPUs, no ``--use_deepspeed`` and no ``--multi_gpu``) sets
    ``ACCELERATE_USE_CPU`` and starts one process. Asked for several (``--num_processes N`` or
    ``--num_machines N``), it adds ``MASTER_ADDR`` but no ranks, expecting ``mpirun``: that is refused. With
    ``--cpu``, accelerate (and so the Hugging Face Trainer) leaves DeepSpeed off, so a DeepSpeed config given to
    them is ignored: that is warned about.
    """
    env = os.environ if environ is None else environ
    if "ACCELERATE_USE_CPU" not in env or any(name in env for name in LAUNCHER_VARIABLES + DISCOVERY_VARIABLES):
        return
    fix = f"accelerate launch --use_deepspeed --num_processes N --no_python {PROG} run ..."
    if env.get("MASTER_ADDR"):
        raise StartupError("accelerate launch started a single process although it was asked for several: "
                           "without GPUs it starts several only with --use_deepspeed (or --multi_gpu), and not "
                           f"with --cpu. Use '{fix}'.")
    if env["ACCELERATE_USE_CPU"].strip().lower() in ("1", "true", "yes", "y", "on"):
        logger.warning("%s run: warning: accelerate launch --cpu turns DeepSpeed off in accelerate and the Hugging "
                       "Face Trainer, so their DeepSpeed config (and DHO2) is ignored. Without --cpu, use '%s' "
                       "(DS_ACCELERATOR=cpu selects the CPU).", PROG, fix)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_target(target: str, as_module: bool) -> None:
    """Raise :class:`StartupError` when ``target`` cannot be run (before anything else happens)."""
    if as_module:
        try:
            found = importlib.util.find_spec(target) is not None
        except (ImportError, ValueError):  # a parent package is missing, or an empty/relative name
            found = False
        if not found:
            raise StartupError(f"no module named '{target}'. Check the name and that its package is installed, "
                               "or give a script path without -m.")
        return
    path = Path(target)
    if path.is_dir() and not (path / "__main__.py").is_file():
        raise StartupError(f"{target} is a directory without __main__.py. Give the path of a Python script.")
    if not path.exists():
        raise StartupError(f"script not found: {target} (looked in {os.getcwd()}). Check the path, or use "
                           f"'{PROG} run -m MODULE' for a module.")


def run_script(target: str, args: list[str], as_module: bool = False) -> bool:
    """Register DHO2, then execute ``target`` as ``python target args...`` (``python -m target``) would;
    whether it left a process group (destroyed here) behind."""
    if as_module and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as python -m does
    check_target(target, as_module)  # `import ds_dho2` above has registered DHO2 with DeepSpeed
    check_launch()
    added = single_process_environment()
    if added:
        os.environ.update(added)
        logger.info("No launcher environment found: running as a single process (%s).",
                    " ".join(f"{k}={v}" for k, v in added.items()))
    if as_module:
        sys.argv = [target, *args]  # runpy replaces argv[0] with the module's file
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")
    return shut_down_process_group()


def shut_down_process_group() -> bool:
    """Destroy the default process group the script left open, as a script should before it exits;
    whether there was one.

    Scripts (and the Trainer) rarely do; the gloo process group's threads are then torn down by the
    interpreter's exit, which now and then aborts a rank ("terminate called without an active exception")
    after training finished and fails the launch.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def exit_without_native_teardown(code: int) -> NoReturn:
    """End a finished distributed rank: the script's ``atexit`` handlers, a garbage collection (closing
    the files it no longer references), flushed streams and logs, then ``os._exit(code)``.

    Even with the process group destroyed, the interpreter's finalisation still destroys native threads
    of the communication libraries, and on CPU (gloo, DeepSpeed's shared-memory collectives) that aborts
    one rank now and then after training finished ("terminate called without an active exception"),
    which fails the whole launch. Skipping only that finalisation keeps the run's result.
    """
    import atexit
    import gc

    gc.collect()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to flush
            pass
    os._exit(code)


def _split_launcher_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take out the ``--local_rank`` flag the ``deepspeed`` launcher puts right after the program.

    ``deepspeed --no_python ds-dho2 run train.py ...`` starts ``ds-dho2 --local_rank=N run train.py ...``;
    the flag belongs to the script, exactly where ``python train.py --local_rank=N ...`` would have it.
    """
    forwarded = []
    while argv and argv[0].startswith(("--local_rank", "--local-rank")):
        flag = argv.pop(0)
        forwarded.append(flag)
        if "=" not in flag and argv:
            forwarded.append(argv.pop(0))
    return argv, forwarded


# --------------------------------------------------------------------------------------- to-universal
def run_to_universal(options: argparse.Namespace) -> int:
    """``ds-dho2 to-universal``: convert, then say how to load the result."""
    from ds_dho2.integrations.universal import UniversalConversionError, to_universal

    try:
        summary = to_universal(options.input_folder, options.output_folder, extract_workers=options.extract_workers,
                               merge_workers=options.merge_workers, keep_temp_folder=options.keep_temp_folder)
    except UniversalConversionError as error:
        raise StartupError(str(error)) from error
    output = os.path.abspath(options.output_folder)
    print(f"{PROG} to-universal: wrote {output} ({summary['parameters']} parameters, world size "
          f"{summary['source_world_size']}, {len(summary['dho2_entries'])} DHO2 entries per parameter). Load it "
          f"with \"checkpoint\": {{\"load_universal\": true}} and engine.load_checkpoint("
          f"{os.path.dirname(output)!r}, tag={os.path.basename(output)!r}).")
    return 0


# ---------------------------------------------------------------------------------------------- probe
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run_probe(options: argparse.Namespace, launcher_flags: list[str]) -> int:
    """``ds-dho2 probe``: run the script under :class:`ds_dho2.probe.hooks.TrainingCapture`, stop it after
    ``--steps`` optimizer steps, print the report (and write ``--output``). A script that ends earlier is
    probed at its last step. Problems are one line on stderr and status 1."""
    from ds_dho2.config import ConfigError
    from ds_dho2.integrations.deepspeed import UnsupportedDeepSpeedSetup
    from ds_dho2.probe import probe_training
    from ds_dho2.probe.hooks import ProbeDue, ProbeError, TrainingCapture

    def fail(message: object) -> int:
        print(f"{PROG} probe: error: {' '.join(str(message).split())}", file=sys.stderr)
        return START_ERROR

    if options.target is None:
        return fail(f"no script given. Use '{PROG} probe [--steps N] SCRIPT [ARGS...]' or "
                    f"'{PROG} probe [--steps N] -m MODULE [ARGS...]'.")
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        return fail("the probe runs one process, but a launcher started several (WORLD_SIZE="
                    f"{os.environ['WORLD_SIZE']}). Run '{PROG} probe SCRIPT ...' without a launcher.")
    capture = TrainingCapture(options.steps).install()
    try:
        run_script(options.target, [*launcher_flags, *options.args], as_module=options.module)
    except ProbeDue:
        pass
    except SystemExit as stop:  # the script called sys.exit: probe what it trained, unless it failed
        if stop.code not in (None, 0):
            shut_down_process_group()
            return stop.code if isinstance(stop.code, int) else START_ERROR
    except StartupError as error:
        return fail(error)
    except (ConfigError, UnsupportedDeepSpeedSetup) as error:
        return fail(f"{type(error).__name__}: {error}")
    finally:
        capture.remove()
    if 0 < capture.steps < options.steps:
        logger.warning("%s probe: the script ended after %d of %d steps; probing at its last step.", PROG,
                       capture.steps, options.steps)
    try:
        arguments = capture.probe_arguments()
        if options.dataset_size is not None:
            arguments["dataset_size"] = options.dataset_size
        report = probe_training(**arguments, max_rank=options.max_rank)
    except ProbeError as error:
        return fail(error)
    finally:
        shut_down_process_group()
    print(report, flush=True)
    if options.output:
        with open(options.output, "w", encoding="utf-8") as handle:
            json.dump(report.as_dict(), handle, indent=2)
            handle.write("\n")
        print(f"{PROG} probe: wrote {os.path.abspath(options.output)}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="DHO2 for DeepSpeed: run an unmodified training script with "
                     "\"type\": \"DHO2\" registered, or convert a checkpoint into a universal one.")
    parser.add_argument("--version", action="version", version=f"{PROG} {ds_dho2.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{run,probe,to-universal}", parser_class=_Parser)
    sub.required = True
    run = sub.add_parser(
        "run", help="run an unmodified training script with DHO2 registered in DeepSpeed",
        description="Register \"type\": \"DHO2\" with DeepSpeed, then run SCRIPT (or -m MODULE) as __main__ "
                    "with ARGS, as python would. Alone it runs as a single process; it also runs as the "
                    "program of torchrun, the deepspeed launcher (--no_python) and accelerate launch "
                    "(--no_python).",
        usage=f"{PROG} run [-h] [-m] TARGET [ARGS ...]")
    run.add_argument("-m", dest="module", action="store_true", help="TARGET is a module name, as in python -m")
    run.add_argument("target", metavar="TARGET", nargs="?", help="script path (or module name with -m)")
    run.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER,
                     help="arguments passed to the script unchanged (including --help)")
    probe = sub.add_parser(
        "probe", help="run an unmodified training script for N steps and report whether DHO2 can help it",
        description="Run SCRIPT (or -m MODULE) with ARGS as 'ds-dho2 run' does, with hooks that find its model, "
                    "loss and optimizer (plain PyTorch, the Hugging Face Trainer, a DeepSpeed engine under ZeRO "
                    "0-2). After N optimizer steps, stop the script and print the top of the Hessian spectrum "
                    "and its outliers, the share of the last step in their subspace, lr x lambda_max against the "
                    "base optimizer's stability limit, the gradient noise scale against the batch size, and a "
                    "verdict. One process only.",
        usage=f"{PROG} probe [-h] [--steps N] [--max-rank K] [--dataset-size N] [--output FILE] [-m] TARGET "
              "[ARGS ...]")
    probe.add_argument("--steps", type=_positive, default=200, metavar="N",
                       help="optimizer steps to train before probing (default 200)")
    probe.add_argument("--max-rank", type=_positive, default=32, metavar="K",
                       help="largest subspace considered; choose it above the number of classes (default 32)")
    probe.add_argument("--dataset-size", type=_positive, default=None, metavar="N",
                       help="training examples the batches are drawn from (default: the Trainer's train_dataset or "
                            "the DeepSpeed engine's training_data, when the script has one); a batch near N meets "
                            "less gradient noise, none at full batch")
    probe.add_argument("--output", metavar="FILE", help="also write the report as JSON to FILE")
    probe.add_argument("-m", dest="module", action="store_true", help="TARGET is a module name, as in python -m")
    probe.add_argument("target", metavar="TARGET", nargs="?", help="script path (or module name with -m)")
    probe.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER,
                       help="arguments passed to the script unchanged")
    universal = sub.add_parser(
        "to-universal", help="convert a DeepSpeed checkpoint with DHO2 state into a universal checkpoint",
        description="Convert one tag folder of a DeepSpeed ZeRO-1/2/3 checkpoint with DHO2 state (AdamW or "
                    "heavy-ball base) into a universal checkpoint that loads at any data-parallel world size with "
                    "\"checkpoint\": {\"load_universal\": true}. DeepSpeed's own ds_to_universal drops DHO2's "
                    "curvature state. OUTPUT_FOLDER is usually INPUT_FOLDER's sibling, e.g. "
                    "checkpoints/global_step100_universal; latest_universal is written next to it.",
        usage=f"{PROG} to-universal [-h] [--extract-workers N] [--merge-workers N] [--keep-temp-folder] "
              "INPUT_FOLDER OUTPUT_FOLDER")
    universal.add_argument("input_folder", metavar="INPUT_FOLDER", help="the folder of one saved tag")
    universal.add_argument("output_folder", metavar="OUTPUT_FOLDER", help="a new folder for the universal checkpoint")
    universal.add_argument("--extract-workers", type=int, default=4, metavar="N",
                           help="processes extracting the ranks' shards (default 4)")
    universal.add_argument("--merge-workers", type=int, default=2, metavar="N",
                           help="processes merging shards per parameter (default 2)")
    universal.add_argument("--keep-temp-folder", action="store_true",
                           help="keep OUTPUT_FOLDER/tmp with the intermediate fragments")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, launcher_flags = _split_launcher_flags(argv)
    configure_cli_logging()
    try:
        options = build_parser().parse_args(argv)
        if options.command == "to-universal":
            return run_to_universal(options)
        if options.command == "probe":
            return run_probe(options, launcher_flags)
        if options.target is None:
            raise StartupError(f"no script given. Use '{PROG} run SCRIPT [ARGS...]' or "
                               f"'{PROG} run -m MODULE [ARGS...]'.")
        return _run(options.target, [*launcher_flags, *options.args], options.module)
    except StartupError as error:
        command = argv[0] if argv and argv[0] == "to-universal" else "run"
        print(f"{PROG} {command}: error: {error}", file=sys.stderr)
        return START_ERROR


def _run(target: str, args: list[str], as_module: bool) -> int:
    from ds_dho2.config import ConfigError
    from ds_dho2.integrations.deepspeed import UnsupportedDeepSpeedSetup

    try:
        distributed = run_script(target, args, as_module=as_module)
    except (ConfigError, UnsupportedDeepSpeedSetup) as error:
        message = " ".join(str(error).split())
        print(f"{PROG} run: error: {type(error).__name__}: {message}", file=sys.stderr)
        return START_ERROR
    if distributed:
        exit_without_native_teardown(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
