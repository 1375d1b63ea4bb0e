"""Logging as a library does it: ``import ds_dho2`` adds only a ``NullHandler``; applications decide.

Every module logs through ``logging.getLogger(__name__)``, below the ``ds_dho2`` logger, which keeps
propagating to the root logger: ``logging.basicConfig(level=logging.INFO)`` in a script shows DHO2's
per-refresh lines, ``logging.getLogger("ds_dho2").setLevel(logging.WARNING)`` silences them. Messages
about the whole run (a refresh, a dropped basis, a failed refresh) are logged on the main rank only
(:func:`log_on_main_rank`), so W ranks do not print them W times. The ``ds-dho2`` command line and the
demo configure a stderr handler themselves (:func:`configure_cli_logging`), with the level from
``DS_DHO2_LOG_LEVEL``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

LIBRARY_LOGGER = "ds_dho2"
LEVEL_VARIABLE = "DS_DHO2_LOG_LEVEL"
DEFAULT_LEVEL = logging.INFO
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}


def add_null_handler() -> None:
    """What ``import ds_dho2`` does to logging: one ``NullHandler`` on the ``ds_dho2`` logger, nothing else."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())


def level_from_environment() -> int:
    """The level named by ``DS_DHO2_LOG_LEVEL`` (default INFO); an unknown name warns and gives INFO."""
    name = os.environ.get(LEVEL_VARIABLE, "").strip()
    if not name:
        return DEFAULT_LEVEL
    if name.lower() in LEVELS:
        return LEVELS[name.lower()]
    logging.getLogger(LIBRARY_LOGGER).warning(
        "Unknown %s=%s; use one of %s. Logging at info.", LEVEL_VARIABLE, name, ", ".join(LEVELS))
    return DEFAULT_LEVEL


def configure_cli_logging() -> logging.Logger:
    """For the command line and the demo: the ``ds_dho2`` logger writes bare messages to stderr at the
    ``DS_DHO2_LOG_LEVEL`` level, once (its records do not also reach a root handler)."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    if not any(getattr(handler, "_ds_dho2_cli", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._ds_dho2_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level_from_environment())
    return logger


def main_rank() -> bool:
    """Whether this process is global rank 0: DeepSpeed's communicator where DeepSpeed runs, else
    ``torch.distributed``, else True (a single process)."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and getattr(deepspeed_comm, "is_initialized", lambda: False)():
        return deepspeed_comm.get_rank() == 0
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


def log_on_main_rank(logger: logging.Logger, level: int, message: str, *args: Any) -> None:
    """``logger.log(level, message, *args)`` on global rank 0 only."""
    if logger.isEnabledFor(level) and main_rank():
        logger.log(level, message, *args)


__all__ = ["LEVEL_VARIABLE", "add_null_handler", "configure_cli_logging", "level_from_environment",
           "log_on_main_rank", "main_rank"]
