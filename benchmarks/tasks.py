"""Task definitions for the convergence benchmark (``python -m benchmarks convergence``).

A :class:`Task` is a small, offline training problem with everything a run needs: a model whose forward
returns a scalar loss (or a Hugging Face output with ``.loss``, so DHO2's hook-captured batch recomputes
it), a fixed data order (step ``s`` uses global rows ``order[s]``; rank ``r`` of ``W`` takes the ``r``-th
contiguous slice), a fixed validation subset (each rank evaluates its own share; the sums are
all-reduced), a step budget, the learning-rate grid (shared by every method) and the DHO2 settings
(shared by both DHO2 variants).

Tasks are built inside each rank (:func:`setup_task`), so only plain settings cross process boundaries.

* ``digits``: scikit-learn 8x8 digits, MLP 64-128-128-10 classifier (non-text);
* ``charlm``: character-level GPT-2 (2 layers, 64 wide, 4 heads, block 64, vocab 65) on tinyshakespeare;
* ``sst2``: fine-tuning the bundled all-MiniLM-L6-v2 (sequence classification, max_length 32) on an
  SST-2 train subset, validated on a subset of the labelled SST-2 test split (GLUE dev).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass
class Task:
    name: str
    description: str
    steps: int  # step budget (optimizer steps), the same for every method
    eval_every: int
    micro_batch: int  # per rank
    lrs: list[float]  # the grid every method is swept over
    dho2: dict[str, Any]  # rank, lanczos_order, refresh_interval, warmup_steps, alpha (both DHO2 variants)
    admm: dict[str, Any]  # ADMM settings (both ADMM variants)
    weight_decay: float = 0.0
    classifier: bool = True
    val_size: int = 256
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TaskData:
    """Rank-local data and model factory of a task."""

    build_model: Callable[[], torch.nn.Module]
    train_rows: int
    #: the rank's micro-batch for a list of global row indices -> (args, kwargs) of the model's forward
    train_batch: Callable[[torch.Tensor], tuple[tuple, dict]]
    #: the rank's validation micro-batches: list of (args, kwargs)
    val_batches: list[tuple[tuple, dict]]
    #: (module, args, kwargs) -> (summed loss, number correct, number of items)
    evaluate: Callable[[torch.nn.Module, tuple, dict], tuple[float, float, float]]


def epoch_order(rows: int, steps: int, global_batch: int, seed: int) -> torch.Tensor:
    """``[steps, global_batch]`` row indices: consecutive seeded permutations of ``range(rows)``."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * global_batch
    chunks, total = [], 0
    while total < needed:
        chunks.append(torch.randperm(rows, generator=generator))
        total += rows
    return torch.cat(chunks)[:needed].view(steps, global_batch)


def rank_slice(n: int, rank: int, world: int) -> slice:
    per = n // world
    return slice(rank * per, (rank + 1) * per)


# ------------------------------------------------------------------------------------------------ digits
class DigitsMLP(torch.nn.Module):
    """64-128-128-10 MLP; ``forward(x, y)`` returns the mean cross-entropy."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, 10))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype)).float()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(x), y)


def _setup_digits(task: Task, rank: int, world: int) -> TaskData:
    from ds_dho2.data import load_digits_split

    x_tr, y_tr, x_te, y_te = load_digits_split(seed=task.seed)
    val = slice(0, min(task.val_size, len(y_te)))
    xv, yv = x_te[val], y_te[val]
    mine = rank_slice(len(yv), rank, world)
    xv, yv = xv[mine], yv[mine]

    def build() -> torch.nn.Module:
        torch.manual_seed(task.seed)
        return DigitsMLP()

    def train_batch(rows: torch.Tensor) -> tuple[tuple, dict]:
        rows = rows[rank_slice(len(rows), rank, world)]
        return (x_tr[rows], y_tr[rows]), {}

    def evaluate(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[float, float, float]:
        x, y = args
        logits = module.logits(x)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        return float(loss), float((logits.argmax(-1) == y).sum()), float(len(y))

    val_batches = [((xv[i:i + 128], yv[i:i + 128]), {}) for i in range(0, len(yv), 128)]
    return TaskData(build, len(y_tr), train_batch, val_batches, evaluate)


# ------------------------------------------------------------------------------------------------ charlm
CHARLM_BLOCK = 64


def _setup_charlm(task: Task, rank: int, world: int) -> TaskData:
    from transformers import GPT2Config, GPT2LMHeadModel

    from ds_dho2.data import char_lm_blocks, load_tinyshakespeare

    text = load_tinyshakespeare()
    train, tokenizer = char_lm_blocks(text, CHARLM_BLOCK, split="train")
    val, _ = char_lm_blocks(text, CHARLM_BLOCK, split="val", tokenizer=tokenizer)
    # a fixed, evenly spread validation subset
    picks = torch.linspace(0, len(val) - 1, min(task.val_size, len(val))).long()
    val = val[picks][rank_slice(len(picks), rank, world)]
    vocab = tokenizer.vocab_size

    def build() -> torch.nn.Module:
        torch.manual_seed(task.seed)
        config = GPT2Config(vocab_size=vocab, n_positions=CHARLM_BLOCK, n_embd=64, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                            eos_token_id=None, attn_implementation="sdpa")
        return GPT2LMHeadModel(config)

    def train_batch(rows: torch.Tensor) -> tuple[tuple, dict]:
        block = train[rows[rank_slice(len(rows), rank, world)]]
        # GPT2LMHeadModel shifts labels internally: input = labels = the first block_size ids
        return (), {"input_ids": block[:, :-1], "labels": block[:, :-1]}

    def evaluate(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[float, float, float]:
        out = module(**kwargs)
        tokens = kwargs["labels"][:, 1:].numel()
        return float(out.loss) * tokens, 0.0, float(tokens)

    val_batches = [((), {"input_ids": val[i:i + 32, :-1], "labels": val[i:i + 32, :-1]})
                   for i in range(0, len(val), 32)]
    return TaskData(build, len(train), train_batch, val_batches, evaluate)


# -------------------------------------------------------------------------------------------------- sst2
SST2_MAX_LENGTH = 32


def _setup_sst2(task: Task, rank: int, world: int, train_rows: int = 4096) -> TaskData:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ds_dho2.data import load_sst2, minilm_path

    hf_logging.set_verbosity_error()  # "newly initialized classifier" notice, once per run
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train = load_sst2("train", limit=train_rows, seed=task.seed)
    test = load_sst2("test", limit=task.val_size, seed=task.seed)

    def encode(ds: Any) -> dict[str, torch.Tensor]:
        enc = tokenizer(list(ds["sentence"]), max_length=SST2_MAX_LENGTH, truncation=True,
                        padding="max_length", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(ds["label"], dtype=torch.long)}

    tr, te = encode(train), encode(test)
    mine = rank_slice(len(te["labels"]), rank, world)
    te = {k: v[mine] for k, v in te.items()}

    def build() -> torch.nn.Module:
        torch.manual_seed(task.seed)  # the classifier head's initialisation
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2,
                                                                   attn_implementation="sdpa")
        # The 30522 x 384 word-embedding table is half of MiniLM's 22.7M parameters; freezing it halves the
        # optimizer state and the ZeRO-2 gradient traffic, which keeps the CPU budget in reach.
        model.get_input_embeddings().weight.requires_grad_(False)
        return model.train()  # from_pretrained returns eval mode; DHO2 captures training-mode forwards only

    def train_batch(rows: torch.Tensor) -> tuple[tuple, dict]:
        rows = rows[rank_slice(len(rows), rank, world)]
        return (), {k: v[rows] for k, v in tr.items()}

    def evaluate(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[float, float, float]:
        out = module(**kwargs)
        n = len(kwargs["labels"])
        return float(out.loss) * n, float((out.logits.argmax(-1) == kwargs["labels"]).sum()), float(n)

    n = len(te["labels"])
    val_batches = [((), {k: v[i:i + 32] for k, v in te.items()}) for i in range(0, n, 32)]
    return TaskData(build, len(tr["labels"]), train_batch, val_batches, evaluate)


# ------------------------------------------------------------------------------------------------ registry
def _dho2(steps: int, order: int, alpha: float, rank: int = 8, refreshes: int = 6) -> dict[str, Any]:
    interval = max(1, steps // refreshes)
    return {"rank": rank, "lanczos_order": order, "alpha": alpha, "refresh_interval": interval,
            "warmup_steps": max(1, steps // 10)}


ADMM = {"enabled": True, "rho": 5e-9, "max_extrapolation_ratio": 0.05, "dual_decay": 1.0}


def make_tasks(quick: bool = False) -> dict[str, Task]:
    """The task set. ``quick``: digits only, one lr, a tiny budget (CI smoke test)."""
    if quick:
        steps = 40
        return {"digits": Task(
            name="digits", description="sklearn digits, MLP 64-128-128-10 (quick)", steps=steps,
            eval_every=10, micro_batch=32, lrs=[3e-3],
            dho2={**_dho2(steps, 8, 0.3, rank=4, refreshes=4), "warmup_steps": 8},
            admm=ADMM, val_size=128)}
    return {
        "digits": Task(name="digits", description="sklearn digits, MLP 64-128-128-10, 1437 train / 256 val",
                       steps=300, eval_every=15, micro_batch=32, lrs=[1e-3, 3e-3, 1e-2],
                       dho2=_dho2(300, 32, 0.3), admm=ADMM, val_size=256),
        "charlm": Task(name="charlm",
                       description="char-level GPT-2 (2x64, 4 heads, block 64) on tinyshakespeare",
                       steps=300, eval_every=20, micro_batch=16, lrs=[1e-3, 3e-3, 1e-2],
                       dho2=_dho2(300, 16, 0.3), admm=ADMM, classifier=False, val_size=128),
        # MiniLM on CPU: a step costs ~1-2 s and one HVP ~7x a step, so the budget is 32 steps, two lrs and a
        # single curvature refresh (rank 4, order 8) at step 8; ADMM windows of 8 steps.
        "sst2": Task(name="sst2", description="MiniLM-L6 fine-tuning (word embeddings frozen) on SST-2, 4096 "
                                              "train rows, 128 test rows, max_length 32",
                     steps=32, eval_every=4, micro_batch=8, lrs=[3e-5, 1e-4],
                     dho2={"rank": 4, "lanczos_order": 8, "alpha": 0.3, "refresh_interval": 32,
                           "warmup_steps": 8},
                     admm={**ADMM, "window": 8}, weight_decay=0.01, val_size=128),
    }


def setup_task(task: Task, rank: int, world: int) -> TaskData:
    fn = {"digits": _setup_digits, "charlm": _setup_charlm, "sst2": _setup_sst2}[task.name]
    return fn(task, rank, world)
