"""Shared pytest setup: CPU accelerator and no network access for Hugging Face libraries."""

import logging
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _ds_dho2_records_reach_caplog():
    """``import ds_dho2`` gives the ``ds_dho2`` logger its own stderr handler and stops propagation (like
    transformers' logger); pytest's ``caplog`` listens on the root logger, so let records through in tests."""
    from ds_dho2.logging_utils import LIBRARY_LOGGER, configure_library_logger

    configure_library_logger()  # first, so a later `import ds_dho2` finds it done and keeps the setting below
    library = logging.getLogger(LIBRARY_LOGGER)
    previous, library.propagate = library.propagate, True
    yield
    library.propagate = previous
