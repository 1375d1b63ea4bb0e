"""Offline loaders for the shared data sets (see ``shared/data/SOURCES.md``).

All loaders read local files only and are deterministic given their arguments.
"""

from __future__ import annotations

import csv
import logging
import random
from typing import TYPE_CHECKING

from .paths import data_file

if TYPE_CHECKING:
    import datasets
    import torch

logger = logging.getLogger(__name__)

SST2_SPLITS = ("train", "dev", "test")
_SPLIT_ALIASES = {"validation": "dev", "valid": "dev"}


def _read_tsv(path, n_fields: int, header: bool) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        if header:
            next(reader)
        for lineno, row in enumerate(reader, start=2 if header else 1):
            if not row:
                continue
            if len(row) != n_fields:
                raise ValueError(f"{path}:{lineno}: expected {n_fields} tab-separated fields, got {len(row)}")
            rows.append(row)
    return rows


def load_sst2(split: str = "train", limit: int | None = None, seed: int | None = None) -> datasets.Dataset:
    """SST-2 sentiment: ``sentence`` (str, stripped) and ``label`` (int, 1 = positive).

    ``split`` is ``"train"`` (60,614 rows), ``"dev"`` (6,735) or ``"test"`` (872, the labelled GLUE dev
    set). With ``seed`` the rows are shuffled with that seed; ``limit`` then keeps the first ``limit`` rows.
    """
    import datasets as hf_datasets

    split = _SPLIT_ALIASES.get(split, split)
    if split not in SST2_SPLITS:
        raise ValueError(f"split must be one of {SST2_SPLITS}, got {split!r}")
    # Sentences contain literal quote characters: QUOTE_NONE is required.
    rows = _read_tsv(data_file("sst2", f"{split}.tsv"), 2, header=True)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    if limit is not None:
        rows = rows[:limit]
    features = hf_datasets.Features(
        {"sentence": hf_datasets.Value("string"), "label": hf_datasets.Value("int64")}
    )
    ds = hf_datasets.Dataset.from_dict(
        {"sentence": [s.strip() for s, _ in rows], "label": [int(y) for _, y in rows]}, features=features
    )
    logger.info("loaded SST-2 %s: %d rows", split, len(ds))
    return ds


def load_sms_spam(
    limit: int | None = None, seed: int = 0, test_fraction: float = 0.2
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """UCI SMS Spam Collection as ``(train, test)`` with ``text`` (str) and ``label`` (1 = spam).

    5,574 messages (747 spam). Rows are shuffled with ``seed``, optionally cut to ``limit``, then split
    ``1 - test_fraction`` / ``test_fraction``, stratified by label.
    """
    import datasets as hf_datasets
    from sklearn.model_selection import train_test_split

    rows = _read_tsv(data_file("sms_spam", "SMSSpamCollection"), 2, header=False)
    texts = [t for _, t in rows]
    labels = []
    for tag, _ in rows:
        if tag not in ("ham", "spam"):
            raise ValueError(f"unexpected SMS label {tag!r}")
        labels.append(int(tag == "spam"))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    sel_labels = [labels[i] for i in order]
    stratify = sel_labels if min(sel_labels.count(0), sel_labels.count(1)) >= 2 else None
    train_idx, test_idx = train_test_split(
        order, test_size=test_fraction, random_state=seed, shuffle=True, stratify=stratify
    )
    features = hf_datasets.Features(
        {"text": hf_datasets.Value("string"), "label": hf_datasets.Value("int64")}
    )

    def build(idx: list[int]) -> hf_datasets.Dataset:
        return hf_datasets.Dataset.from_dict(
            {"text": [texts[i] for i in idx], "label": [labels[i] for i in idx]}, features=features
        )

    train, test = build(train_idx), build(test_idx)
    logger.info("loaded SMS spam: %d train / %d test rows", len(train), len(test))
    return train, test


def load_tinyshakespeare() -> str:
    """The tiny-shakespeare corpus as one string (about 1.1 MB, 65 distinct characters)."""
    text = data_file("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    logger.info("loaded tinyshakespeare: %d characters", len(text))
    return text


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2, as_images: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1,797 images) as ``(x_train, y_train, x_test, y_test)``.

    Features are float32 in [0, 1], shaped ``[N, 64]`` (``[N, 1, 8, 8]`` with ``as_images``); labels are
    int64 in 0..9. The split is stratified and fixed by ``seed``.
    """
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, shuffle=True, stratify=y
    )
    out = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x_tr, y_tr, x_te, y_te)]
    if as_images:
        out[0] = out[0].view(-1, 1, 8, 8)
        out[2] = out[2].view(-1, 1, 8, 8)
    logger.info("loaded digits: %d train / %d test", len(out[1]), len(out[3]))
    return out[0], out[1], out[2], out[3]
