"""The library's root logger ``ds_dho2``: visible by default, the way transformers sets up its own.

:func:`configure_library_logger` (called once by ``import ds_dho2``) gives the ``ds_dho2`` logger one
``StreamHandler`` on stderr that writes the bare message, sets its level from the environment variable
``DS_DHO2_LOG_LEVEL`` (``debug``, ``info``, ``warning``, ``error`` or ``critical``, any case; default
``info``) and stops propagation, so messages appear once whatever the application does with the root
logger. Every module logs through ``logging.getLogger(__name__)`` below it. Change the level at run
time with ``logging.getLogger("ds_dho2").setLevel(...)`` or :func:`set_level`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

LIBRARY_LOGGER = "ds_dho2"
LEVEL_VARIABLE = "DS_DHO2_LOG_LEVEL"
DEFAULT_LEVEL = logging.INFO
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}

_lock = threading.Lock()
_handler: logging.Handler | None = None


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


def configure_library_logger() -> logging.Logger:
    """Install the stderr handler on the ``ds_dho2`` logger (once) and return that logger."""
    global _handler
    logger = logging.getLogger(LIBRARY_LOGGER)
    with _lock:
        if _handler is not None:
            return logger
        _handler = logging.StreamHandler(sys.stderr)
        logger.addHandler(_handler)
        logger.propagate = False
        logger.setLevel(level_from_environment())  # after the handler: a bad value's warning shows once
    return logger


def set_level(level: int | str) -> None:
    """Set the ``ds_dho2`` logger's level (a ``logging`` level or one of the names of :data:`LEVELS`)."""
    logging.getLogger(LIBRARY_LOGGER).setLevel(LEVELS[level.lower()] if isinstance(level, str) else level)


__all__ = ["LEVEL_VARIABLE", "configure_library_logger", "level_from_environment", "set_level"]
