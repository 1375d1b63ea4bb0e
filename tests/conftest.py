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
    """``ds_dho2`` propagates to the root logger, where pytest's ``caplog`` listens; a test that ran the
    command line in-process (which stops propagation for its own stderr handler) must not hide records
    from the next test."""
    library = logging.getLogger("ds_dho2")
    previous, library.propagate = library.propagate, True
    yield
    library.propagate = previous
    for handler in [h for h in library.handlers if getattr(h, "_ds_dho2_cli", False)]:
        library.removeHandler(handler)  # its stream was pytest's capture of that test
    library.propagate = True
