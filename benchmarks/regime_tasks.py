"""Task definitions for the regime benchmark (``python -m benchmarks regimes``).

Each :class:`RegimeTask` is a small, offline, single-process training problem chosen to sit somewhere on
the noise-limited / curvature-limited axis of docs/design.md ("Where hybrid order pays"), at several batch
sizes: the smaller the batch, the more gradient noise limits the steps; full batch removes the noise.

* ``autoencoder``: the deep tanh autoencoder 64-48-32-16-6-16-32-48-64 on all 1,797 scikit-learn digits,
  mean squared error per pixel: a narrow, deep bottleneck, the classic badly conditioned problem;
* ``mnist1d``: an MLP 40-128-128-10 classifier on MNIST-1D, generated locally (4,000 training examples);
* ``digits``: the 64-128-128-10 MLP of the convergence suite on the 1,437 digits of its training split;
* ``sst2``: an MLP head 384-256-2 on frozen, mean-pooled all-MiniLM-L6-v2 sentence features of 4,000
  SST-2 training sentences (the features are computed once and cached under ``outputs/``);
* ``charlm``: the char-level GPT-2 of ``benchmarks/tasks.py`` (2 layers, 64 wide) on a fixed set of 1,024
  tinyshakespeare blocks of 64 characters, at the convergence suite's batch (16) and at 128.

Every model's ``forward(*batch)`` returns the batch's mean loss, so DHO2 can replay the captured batch
without a ``loss_fn``. The *training loss* reported by the benchmark is that loss over the whole training
set (all rows, evaluated in chunks, eval mode, no gradient) at a fixed grid of steps.

Each task carries a per-method centre of its initial lr grid, derived from two anchors (AdamW's and
SGD-momentum's best lr in a short calibration on the task) and a per-method factor
(:data:`LR_FACTORS`); the runner extends each grid while the best lr sits on an edge, so a centre only has
to be roughly right.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_DIR = Path(__file__).resolve().parent.parent / "outputs" / "regimes_cache"

#: the lr centre of each method relative to the task's AdamW anchor ("adamw") or SGD anchor ("sgd")
LR_FACTORS: dict[str, tuple[str, float]] = {
    "adamw": ("adamw", 1.0),
    "sgd": ("sgd", 1.0),
    "dho2": ("adamw", 1.0),
    "dho2_hb_auto": ("sgd", 1.0),
    "dho2_adamw_auto": ("adamw", 1.0),
    "soap": ("adamw", 1.0),
    "shampoo": ("adamw", 3.0),
    "kron": ("adamw", 0.5),
    "sophiah": ("adamw", 30.0),
    "adahessian": ("adamw", 10.0),
    "sf_adamw": ("adamw", 2.0),
}


@dataclasses.dataclass
class RegimeData:
    """A task's data: the whole training set as tensors with a common leading dimension (rows), and
    optionally a held-out set of the same layout. ``model(*[t[rows] for t in train])`` is the mean loss."""

    train: tuple[torch.Tensor, ...]
    test: tuple[torch.Tensor, ...] | None = None
    eval_chunk: int = 4096  # rows per forward when the whole set is evaluated
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.train[0].shape[0])

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The model inputs for these training rows."""
        return tuple(t[rows] for t in self.train)


@dataclasses.dataclass
class RegimeTask:
    """One training problem and the batches it is raced at.

    ``budgets`` maps each batch size to its step budget (the same for every method); ``lr_centers`` maps a
    method name to the centre of its initial lr grid (methods without an entry use
    :meth:`lr_center`'s anchor rule); ``eval_points`` evaluations of the whole-training-set loss are spread
    evenly over each budget (plus step 0).
    """

    name: str
    description: str
    build_model: Callable[[int], torch.nn.Module]  # seed -> freshly initialised model
    load_data: Callable[[], RegimeData]
    loss: str  # what the loss is, in words
    budgets: dict[int, int]
    anchors: dict[str, float]  # {"adamw": lr, "sgd": lr}
    lr_centers: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_points: int = 25
    notes: str = ""

    @property
    def batches(self) -> list[int]:
        return sorted(self.budgets)

    def lr_center(self, method: str, anchor: str | None = None) -> float:
        """The centre of ``method``'s initial grid: the task's own entry, else the method's factor times its
        anchor (:data:`LR_FACTORS`; an unknown method uses ``anchor``, default AdamW's, with factor 1)."""
        if method in self.lr_centers:
            return self.lr_centers[method]
        kind, factor = LR_FACTORS.get(method, (anchor or "adamw", 1.0))
        return self.anchors[kind] * factor

    def eval_steps(self, batch: int) -> list[int]:
        """The fixed evaluation grid of a batch's budget: step 0 and ``eval_points`` evenly spaced steps."""
        steps = self.budgets[batch]
        return sorted({0, *(max(1, round(steps * (i + 1) / self.eval_points)) for i in range(self.eval_points))})

    def settings(self) -> dict[str, Any]:
        """The task as plain values (for the JSON)."""
        return {"name": self.name, "description": self.description, "loss": self.loss,
                "budgets": {str(b): s for b, s in self.budgets.items()}, "anchors": self.anchors,
                "lr_centers": {m: self.lr_center(m) for m in LR_FACTORS}, "eval_points": self.eval_points,
                "notes": self.notes}


# ------------------------------------------------------------------------------------------ models
class MLP(torch.nn.Module):
    """A plain MLP; ``forward(x, y)`` returns the mean loss (cross-entropy for labels, else MSE to ``x``)."""

    def __init__(self, widths: list[int], activation: type[torch.nn.Module], reconstruct: bool = False) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(activation())
        self.net = torch.nn.Sequential(*layers)
        self.reconstruct = reconstruct

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.net(x)
        if self.reconstruct:
            return torch.nn.functional.mse_loss(out, x)
        return torch.nn.functional.cross_entropy(out, y)


class CharLM(torch.nn.Module):
    """The convergence suite's char-level GPT-2 with ``forward(input_ids)`` returning its mean loss (the
    model shifts the labels internally, as in ``benchmarks/tasks.py``)."""

    def __init__(self, gpt: torch.nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=input_ids, labels=input_ids).loss


def seeded(factory: Callable[[], torch.nn.Module]) -> Callable[[int], torch.nn.Module]:
    """``seed -> model``: the factory called right after ``torch.manual_seed(seed)``."""
    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return factory()
    return build


# -------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def digits_all() -> RegimeData:
    """All 1,797 scikit-learn digits, pixels scaled to [0, 1] (the autoencoder reconstructs them)."""
    import numpy as np
    from sklearn.datasets import load_digits

    x = torch.from_numpy((load_digits().data / 16.0).astype(np.float32))
    return RegimeData(train=(x,), info={"train_rows": len(x)})


@functools.lru_cache(maxsize=None)
def digits_split() -> RegimeData:
    """The convergence suite's digits split (1,437 train / 360 test, ``load_digits_split(seed=0)``)."""
    from ds_dho2.data import load_digits_split

    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    return RegimeData(train=(x_tr, y_tr), test=(x_te, y_te), info={"train_rows": len(y_tr), "test_rows": len(y_te)})


MNIST1D_SAMPLES = 5000  # mnist1d's own default: 4,000 train / 1,000 test


@functools.lru_cache(maxsize=None)
def mnist1d(samples: int = MNIST1D_SAMPLES) -> RegimeData:
    """MNIST-1D generated locally from its default arguments (seed 42) with ``samples`` examples; never its
    download path. The generator reseeds numpy and ``random`` globally, so their states are restored."""
    import random

    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = samples
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return RegimeData(train=(as_x(data["x"]), as_y(data["y"])), test=(as_x(data["x_test"]), as_y(data["y_test"])),
                      info={"train_rows": len(data["y"]), "test_rows": len(data["y_test"]),
                            "generator": "mnist1d.data.make_dataset(get_dataset_args())", "num_samples": samples,
                            "seed": args.seed})


SST2_TRAIN_ROWS = 4000
SST2_TEST_ROWS = 872
SST2_MAX_LENGTH = 64


def _sst2_key(sentences: list[str], max_length: int, model_dir: Path) -> str:
    """A hash of everything the cached features depend on: the sentences, the length cut, the pooling, the
    encoder's config and weights file sizes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"max_length": max_length, "pooling": "mean", "sentences": sentences}).encode())
    for name in sorted(p.name for p in model_dir.iterdir() if p.is_file()):
        digest.update(f"{name}:{(model_dir / name).stat().st_size}".encode())
    digest.update((model_dir / "config.json").read_bytes())
    return digest.hexdigest()[:16]


def encode_sentences(sentences: list[str], max_length: int = SST2_MAX_LENGTH, chunk: int = 128) -> torch.Tensor:
    """Mean-pooled (over real tokens) last hidden states of the frozen bundled all-MiniLM-L6-v2, cached
    under ``outputs/regimes_cache/`` by a hash of the inputs, so only the first run pays for the encoder."""
    from ds_dho2.data import minilm_path

    model_dir = minilm_path()
    path = CACHE_DIR / f"sst2_minilm_mean_{_sst2_key(sentences, max_length, model_dir)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir).eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(sentences), chunk):
            enc = tokenizer(sentences[start:start + chunk], max_length=max_length, truncation=True, padding=True,
                            return_tensors="pt")
            hidden = encoder(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            parts.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    features = torch.cat(parts).contiguous()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(features, path)
    return features


@functools.lru_cache(maxsize=None)
def sst2_features(train_rows: int = SST2_TRAIN_ROWS, test_rows: int = SST2_TEST_ROWS) -> RegimeData:
    """SST-2 sentence features: the first ``train_rows`` GLUE-train sentences after a seed-0 shuffle and the
    first ``test_rows`` of the labelled GLUE dev set (``test.tsv``), encoded once by MiniLM."""
    from ds_dho2.data import load_sst2

    train = load_sst2("train", limit=train_rows, seed=0)
    test = load_sst2("test", limit=test_rows, seed=0)
    x_tr = encode_sentences(list(train["sentence"]))
    x_te = encode_sentences(list(test["sentence"]))
    return RegimeData(train=(x_tr, torch.tensor(train["label"], dtype=torch.long)),
                      test=(x_te, torch.tensor(test["label"], dtype=torch.long)),
                      info={"train_rows": len(train), "test_rows": len(test), "encoder": "all-MiniLM-L6-v2 (frozen)",
                            "pooling": "mean over real tokens", "max_length": SST2_MAX_LENGTH})


CHARLM_TRAIN_BLOCKS = 1024


@functools.lru_cache(maxsize=None)
def _charlm_source() -> Any:
    """The convergence suite's char-LM task data (model factory and tokenised blocks)."""
    from benchmarks.tasks import make_tasks, setup_task

    return setup_task(make_tasks()["charlm"], 0, 1)


@functools.lru_cache(maxsize=None)
def charlm_blocks(blocks: int = CHARLM_TRAIN_BLOCKS) -> RegimeData:
    """``blocks`` training blocks of 64 characters, evenly spread over the tinyshakespeare train split (a fixed
    subset, so the whole training set can be evaluated), and the suite's 128 validation blocks."""
    source = _charlm_source()
    picks = torch.linspace(0, source.train_rows - 1, min(blocks, source.train_rows)).long()
    ids = source.train_batch(picks)[1]["input_ids"].contiguous()
    val = torch.cat([kwargs["input_ids"] for _, kwargs in source.val_batches])
    return RegimeData(train=(ids,), test=(val,), eval_chunk=64,
                      info={"train_rows": len(ids), "test_rows": len(val), "block": ids.shape[1],
                            "train_characters": ids.numel(), "of_split_blocks": source.train_rows})


def charlm_model(seed: int) -> torch.nn.Module:
    """The suite's GPT-2 (``benchmarks/tasks.py``), seeded, wrapped to return its loss."""
    return CharLM(_charlm_source().build_model(seed))


# ------------------------------------------------------------------------------------------ registry
_INTERPOLATES = ("The model can fit its training set: the training loss falls towards zero like a power law, so "
                 "its relative improvement over the last 20% of any budget stays large (about 35%) while the "
                 "absolute one, as a share of the initial loss, is below 0.1% (both are in the JSON).")

def make_regime_tasks(quick: bool = False) -> dict[str, RegimeTask]:
    """The task set. ``quick``: two cheap tasks at two batches each with tiny budgets (CI smoke test)."""
    autoencoder = RegimeTask(
        name="autoencoder", description="deep tanh autoencoder 64-48-32-16-6-16-32-48-64 on all 1,797 digits",
        build_model=seeded(lambda: MLP([64, 48, 32, 16, 6, 16, 32, 48, 64], torch.nn.Tanh, reconstruct=True)),
        load_data=digits_all, loss="mean squared reconstruction error per pixel (pixels in [0, 1])",
        budgets={128: 3000, 1797: 3000}, anchors={"adamw": 1e-2, "sgd": 2.0}, eval_points=30,
        notes="A 6-unit bottleneck behind three tanh layers: the deep-autoencoder benchmark of the second-order "
              "literature, at a size that runs on 2 cores. Its loss falls in plateaus and steps: in calibration tuned "
              "AdamW still improved 4-6% over the last 20% of a 3,000-step budget (1.6-8% at 4,000).")
    mnist = RegimeTask(
        name="mnist1d", description="MLP 40-128-128-10 (ReLU) on MNIST-1D, 4,000 train examples",
        build_model=seeded(lambda: MLP([40, 128, 128, 10], torch.nn.ReLU)), load_data=mnist1d,
        loss="mean cross-entropy", budgets={32: 4000, 256: 1500, 4000: 800}, anchors={"adamw": 4e-3, "sgd": 0.07},
        notes=_INTERPOLATES)
    digits = RegimeTask(
        name="digits", description="MLP 64-128-128-10 (GELU, the convergence suite's) on 1,437 digits",
        build_model=seeded(_digits_mlp), load_data=digits_split, loss="mean cross-entropy",
        budgets={32: 1000, 256: 600, 1437: 600}, anchors={"adamw": 5e-3, "sgd": 0.15}, notes=_INTERPOLATES)
    sst2 = RegimeTask(
        name="sst2", description="MLP head 384-256-2 (GELU) on frozen mean-pooled MiniLM features, 4,000 SST-2 "
                                 "train sentences",
        build_model=seeded(lambda: MLP([384, 256, 2], torch.nn.GELU)), load_data=sst2_features,
        loss="mean cross-entropy", budgets={32: 2000, 4000: 500}, anchors={"adamw": 3e-3, "sgd": 0.5},
        notes=_INTERPOLATES)
    charlm = RegimeTask(
        name="charlm", description="char-level GPT-2 (2x64, 4 heads, block 64) on 1,024 tinyshakespeare blocks",
        build_model=charlm_model, load_data=charlm_blocks, loss="mean next-character cross-entropy (nats)",
        budgets={16: 400, 128: 250}, anchors={"adamw": 6e-3, "sgd": 0.5}, eval_points=16,
        notes="The expensive task (one full-batch evaluation of the 1,024 blocks costs about 25 steps at batch 16), "
              "so budgets are short: in calibration AdamW still improved 2.5% (batch 16) and 6% (batch 128) over "
              "the last 20% of the budget.")
    if quick:
        return {"autoencoder": dataclasses.replace(autoencoder, budgets={128: 60, 1797: 60}, eval_points=6),
                "digits": dataclasses.replace(digits, budgets={32: 60, 1437: 60}, eval_points=6)}
    return {t.name: t for t in (autoencoder, mnist, digits, sst2, charlm)}


def _digits_mlp() -> torch.nn.Module:
    """The convergence suite's digits MLP, which already returns its mean cross-entropy."""
    from benchmarks.tasks import DigitsMLP

    return DigitsMLP()


def epoch_order(rows: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """``[steps, batch]`` row indices: consecutive seeded permutations (``benchmarks.tasks.epoch_order``);
    a batch of every row is the whole set in order at every step."""
    if batch >= rows:
        return torch.arange(rows).expand(steps, rows)
    from benchmarks.tasks import epoch_order as suite_order

    return suite_order(rows, steps, batch, seed)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["LR_FACTORS", "RegimeData", "RegimeTask", "count_parameters", "epoch_order", "make_regime_tasks"]
