"""Task definitions for the convergence benchmark (``python -m benchmarks convergence``).

A :class:`Task` is a small, offline training problem with everything a run needs: a model factory
(seeded: the seed fixes the initialisation), a seeded data order (step ``s`` uses global rows
``order[s]``; rank ``r`` of ``W`` takes the ``r``-th contiguous slice), a fixed validation set (each rank
evaluates its own share; the sums are all-reduced), a step budget and the initial learning-rate grid
(shared by every method; the race extends it per method when its best lr lands on an edge).

The train/validation split is fixed (``data_seed``); the run seed changes the model initialisation,
the data order, the dropout masks and DHO2's Lanczos start vectors.

Tasks are built inside each rank (:func:`setup_task`), so only plain settings cross process boundaries.

* ``digits``: scikit-learn 8x8 digits, MLP 64-128-128-10 classifier (non-text);
* ``charlm``: character-level GPT-2 (2 layers, 64 wide, 4 heads, block 64, vocab 65) on tinyshakespeare;
* ``sst2``: fine-tuning the top of the bundled all-MiniLM-L6-v2 on SST-2 (see :func:`_setup_sst2`);
* ``autoencoder``: the regime benchmark's deep tanh autoencoder 64-48-32-16-6-16-32-48-64 on the digits,
  (nearly) full batch: the curvature-limited task of the map (see :func:`_setup_autoencoder`).

Budgets and lr grids were chosen by a short calibration (``python -m benchmarks convergence
--calibrate``): each budget is long enough that AdamW's validation curve at its best lr has flattened
(the suite reports the relative improvement over the last 20% of the budget), and each grid is centred
on AdamW's best lr of the calibration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

LR_RATIO = 1.5  # spacing of every lr grid (the suite checks it is never exceeded)


def lr_grid(center: float, points: int, ratio: float = LR_RATIO) -> list[float]:
    """``points`` learning rates spaced by ``ratio`` around ``center`` (geometric)."""
    first = -(points - 1) // 2
    return [round_lr(center * ratio ** (first + i)) for i in range(points)]


def round_lr(lr: float) -> float:
    """10 significant digits: readable in the JSON, and grid ratios stay within 1e-9 of ``ratio``."""
    return float(f"{lr:.10g}")


@dataclasses.dataclass
class Task:
    name: str
    description: str
    steps: int  # step budget (optimizer steps), the same for every method
    eval_every: int  # regular evaluation interval (ADMM window ends are evaluated on top of it)
    micro_batch: int  # per rank
    lrs: list[float]  # the initial grid every method is swept over (ratio LR_RATIO)
    weight_decay: float = 0.0
    classifier: bool = True
    val_size: int = 256
    data_seed: int = 0  # fixes the train/validation split only
    #: "DHO2 tuned": DHO2 keys that replace the library defaults (a separate, labelled method; never the
    #: headline "DHO2", which always runs the library defaults)
    dho2_tuned: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: what was chosen for this task and why (budget, freezing, data slice), copied into the results
    notes: str = ""

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def scaled(self, factor: float) -> "Task":
        """The task with its step budget (and evaluation interval) scaled by ``factor``."""
        steps = max(4, int(round(self.steps * factor)))
        every = max(1, int(round(self.eval_every * factor)))
        return dataclasses.replace(self, steps=steps, eval_every=every)


@dataclasses.dataclass
class TaskData:
    """Rank-local data and model factory of a task."""

    #: seed -> a freshly initialised model (every parameter trainable)
    build_model: Callable[[int], torch.nn.Module]
    train_rows: int
    #: the rank's micro-batch for a list of global row indices -> (args, kwargs) of the model's forward
    train_batch: Callable[[torch.Tensor], tuple[tuple, dict]]
    #: the rank's validation micro-batches: list of (args, kwargs)
    val_batches: list[tuple[tuple, dict]]
    #: (module, args, kwargs) -> (summed loss, number correct, number of items)
    evaluate: Callable[[torch.nn.Module, tuple, dict], tuple[float, float, float]]
    val_items: int = 0  # validation items over all ranks (examples or predicted tokens)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. parameter counts


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


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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

    x_tr, y_tr, x_te, y_te = load_digits_split(seed=task.data_seed)
    val = slice(0, min(task.val_size, len(y_te)))
    xv, yv = x_te[val], y_te[val]
    mine = rank_slice(len(yv), rank, world)
    xv, yv = xv[mine], yv[mine]

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
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
    return TaskData(build, len(y_tr), train_batch, val_batches, evaluate, val_items=len(yv) * world,
                    info={"trainable_params": _count(DigitsMLP()), "train_rows": len(y_tr)})


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

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
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

    val_batches = [((), {"input_ids": val[i:i + 64, :-1], "labels": val[i:i + 64, :-1]})
                   for i in range(0, len(val), 64)]
    return TaskData(build, len(train), train_batch, val_batches, evaluate,
                    val_items=len(val) * (CHARLM_BLOCK - 1) * world,
                    info={"trainable_params": _count(build(0)), "train_rows": len(train)})


# -------------------------------------------------------------------------------------------------- sst2
SST2_MAX_LENGTH = 32  # covers 94% of the train slice and 76% of the validation sentences in full
SST2_TRAIN_ROWS = 2048


class MiniLMTop(torch.nn.Module):
    """The trainable top of a ``BertForSequenceClassification``: its last encoder layer, the pooler and the
    classifier, as a function of the frozen trunk's output (the hidden states entering the last layer).

    The pooler reads only the first ([CLS]) position of the last layer, so the last layer is evaluated
    only where its output is used: keys and values at every position, the query, attention output and
    feed-forward block at the first one. That is the same function (and the same gradients) as the full
    model's forward, without the work for outputs nothing reads; ``tests/benchmarks/tasks_test.py`` checks
    the logits against ``BertForSequenceClassification``. ``forward(hidden, attention_mask, labels)``
    returns the mean cross-entropy.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.layer = model.bert.encoder.layer[-1]
        self.pooler = model.bert.pooler
        self.dropout = model.dropout
        self.classifier = model.classifier

    def logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        layer, attn = self.layer, self.layer.attention.self
        batch, length, _ = hidden.shape
        heads, size = attn.num_attention_heads, attn.attention_head_size
        first = hidden[:, :1]
        query = attn.query(first).view(batch, 1, heads, size).transpose(1, 2)
        key = attn.key(hidden).view(batch, length, heads, size).transpose(1, 2)
        value = attn.value(hidden).view(batch, length, heads, size).transpose(1, 2)
        scores = (query @ key.transpose(-1, -2)) * attn.scaling
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        context = (attn.dropout(scores.softmax(-1)) @ value).transpose(1, 2).reshape(batch, 1, heads * size)
        attended = layer.attention.output(context, first)
        out = layer.output(layer.intermediate(attended), attended)
        return self.classifier(self.dropout(self.pooler(out)))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(hidden, attention_mask), labels)


def trunk_features(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, rank: int = 0,
                   world: int = 1) -> torch.Tensor:
    """The frozen trunk's output (embeddings and every encoder layer but the last, eval mode) for every
    row: each rank computes a share, then an all-gather gives every rank all rows."""
    import torch.distributed as dist
    from transformers.masking_utils import create_bidirectional_mask

    n = len(ids)
    per = math.ceil(n / world)
    mine = range(rank * per, min(n, (rank + 1) * per))
    out = torch.zeros(per, ids.shape[1], model.config.hidden_size)
    model.eval()
    with torch.no_grad():
        for start in range(mine.start, mine.stop, 64):
            stop = min(start + 64, mine.stop)
            hidden = model.bert.embeddings(input_ids=ids[start:stop])
            attn = create_bidirectional_mask(config=model.config, inputs_embeds=hidden,
                                             attention_mask=mask[start:stop])
            for layer in model.bert.encoder.layer[:-1]:
                hidden = layer(hidden, attn)
            out[start - mine.start:stop - mine.start] = hidden
    if world > 1 and dist.is_initialized():
        parts = [torch.zeros_like(out) for _ in range(world)]
        dist.all_gather(parts, out)
        out = torch.cat(parts)
    return out[:n].contiguous()


def minilm_classifier() -> torch.nn.Module:
    """The bundled all-MiniLM-L6-v2 with a fresh 2-label head (seeded by the caller's torch seed)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ds_dho2.data import minilm_path

    hf_logging.set_verbosity_error()  # "newly initialized classifier" notice
    hf_logging.disable_progress_bar()
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2,
                                                              attn_implementation="sdpa")


def _setup_sst2(task: Task, rank: int, world: int) -> TaskData:
    """Fine-tune the top of all-MiniLM-L6-v2 on SST-2.

    The embeddings and the first five of the six encoder layers are frozen (a common fine-tuning
    practice); the last encoder layer, the pooler and the classifier head (1.9M parameters) are trained.
    A frozen trunk in eval mode computes the same function at every step, so its output is computed
    once per rank, for the train slice and the validation rows, and the optimizers train
    :class:`MiniLMTop` on it. ``SST2_TRAIN_ROWS`` sentences of the GLUE train split (the first rows after
    a seeded shuffle) are the train slice; the validation rows are the first ``val_size`` rows of the
    labelled GLUE dev set (the ``test`` split) after a seeded shuffle.
    """
    from transformers import AutoTokenizer

    from ds_dho2.data import load_sst2, minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train = load_sst2("train", limit=SST2_TRAIN_ROWS, seed=task.data_seed)
    test = load_sst2("test", limit=task.val_size, seed=task.data_seed)

    def encode(ds: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = tokenizer(list(ds["sentence"]), max_length=SST2_MAX_LENGTH, truncation=True,
                        padding="max_length", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor(ds["label"], dtype=torch.long)

    trunk = minilm_classifier()
    tr_ids, tr_mask, tr_y = encode(train)
    te_ids, te_mask, te_y = encode(test)
    tr_h = trunk_features(trunk, tr_ids, tr_mask, rank, world)
    te_h = trunk_features(trunk, te_ids, te_mask, rank, world)
    layers = trunk.config.num_hidden_layers
    del trunk
    mine = rank_slice(len(te_y), rank, world)
    te_h, te_mask, te_y = te_h[mine], te_mask[mine], te_y[mine]

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # from_pretrained initialises the missing classifier head from it
        return MiniLMTop(minilm_classifier()).train()

    def train_batch(rows: torch.Tensor) -> tuple[tuple, dict]:
        rows = rows[rank_slice(len(rows), rank, world)]
        return (tr_h[rows], tr_mask[rows], tr_y[rows]), {}

    def evaluate(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[float, float, float]:
        hidden, mask, y = args
        logits = module.logits(hidden, mask)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        return float(loss), float((logits.argmax(-1) == y).sum()), float(len(y))

    val_batches = [((te_h[i:i + 64], te_mask[i:i + 64], te_y[i:i + 64]), {}) for i in range(0, len(te_y), 64)]
    return TaskData(build, len(tr_y), train_batch, val_batches, evaluate, val_items=len(te_y) * world,
                    info={"trainable_params": _count(build(0)), "train_rows": len(tr_y),
                          "frozen_layers": layers - 1, "trained": "last encoder layer + pooler + classifier",
                          "max_length": SST2_MAX_LENGTH})


# ------------------------------------------------------------------------------------------- autoencoder
def _setup_autoencoder(task: Task, rank: int, world: int) -> TaskData:
    """All 1,797 digits (pixels in [0, 1]) split once by ``data_seed`` into ``val_size`` validation rows and
    the rest for training; the model is ``benchmarks.regime_tasks``' autoencoder and the loss its mean squared
    reconstruction error per pixel. ``micro_batch`` rows per rank: at 770 and W=2 a step sees 1,540 of the
    1,541 training rows, a full batch in a fresh order every step."""
    from benchmarks.regime_tasks import MLP, digits_all

    x = digits_all().train[0]
    split = torch.randperm(len(x), generator=torch.Generator().manual_seed(task.data_seed))
    x_tr, x_val = x[split[task.val_size:]], x[split[:task.val_size]]
    x_val = x_val[rank_slice(len(x_val), rank, world)]

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return MLP([64, 48, 32, 16, 6, 16, 32, 48, 64], torch.nn.Tanh, reconstruct=True)

    def train_batch(rows: torch.Tensor) -> tuple[tuple, dict]:
        return (x_tr[rows[rank_slice(len(rows), rank, world)]],), {}

    def evaluate(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[float, float, float]:
        (batch,) = args
        squared = torch.nn.functional.mse_loss(module.net(batch), batch, reduction="sum")
        return float(squared), 0.0, float(batch.numel())

    val_batches = [((x_val,), {})]
    return TaskData(build, len(x_tr), train_batch, val_batches, evaluate, val_items=x_val.numel() * world,
                    info={"trainable_params": _count(build(0)), "train_rows": len(x_tr)})


# ------------------------------------------------------------------------------------------------ registry
def _tuned(steps: int, order: int, alpha: float, rank: int = 8, refreshes: int = 6) -> dict[str, Any]:
    """Per-task DHO2 overrides for the optional "DHO2 tuned" method (refreshes spread over the budget)."""
    interval = max(1, steps // refreshes)
    return {"rank": rank, "lanczos_order": order, "alpha": alpha, "refresh_interval": interval,
            "warmup_steps": max(1, steps // 10)}


def make_tasks(quick: bool = False) -> dict[str, Task]:
    """The task set. ``quick``: digits only, a 3-point grid, a tiny budget (CI smoke test)."""
    if quick:
        return {"digits": Task(
            name="digits", description="sklearn digits, MLP 64-128-128-10 (quick)", steps=8,
            eval_every=4, micro_batch=32, lrs=lr_grid(1.5e-2, 3), val_size=128,
            dho2_tuned={"rank": 4, "lanczos_order": 8, "alpha": 0.3, "refresh_interval": 3, "warmup_steps": 3},
            notes="CI smoke test: far too short for any conclusion")}
    return {
        "digits": Task(name="digits", description="sklearn digits, MLP 64-128-128-10, 1437 train / 360 val",
                       steps=600, eval_every=25, micro_batch=32, lrs=lr_grid(3e-3, 3), val_size=360,
                       dho2_tuned=_tuned(600, 32, 0.3),
                       notes="Budget: AdamW's validation loss stops improving after about 300-400 steps (27 "
                             "epochs at global batch 64) and then wanders in a 0.11-0.14 band."),
        "charlm": Task(name="charlm",
                       description="char-level GPT-2 (2x64, 4 heads, block 64) on tinyshakespeare, 128 val blocks",
                       steps=1000, eval_every=50, micro_batch=8, lrs=lr_grid(4.5e-3, 3), classifier=False,
                       val_size=128, dho2_tuned=_tuned(1000, 16, 0.3),
                       notes="Budget: 1000 steps at global batch 16 x 64 characters. AdamW is still improving "
                             "by about 2% over the last 20% of the budget: the least flat of the three curves, "
                             "a compromise with the runtime (char-level LMs keep improving for thousands of "
                             "steps at constant lr)."),
        "sst2": Task(name="sst2",
                     description=f"all-MiniLM-L6-v2 on SST-2: last encoder layer + pooler + head trained on the "
                                 f"frozen trunk's cached output, {SST2_TRAIN_ROWS} train rows, 384 val rows, "
                                 f"max_length {SST2_MAX_LENGTH}",
                     steps=250, eval_every=20, micro_batch=8, lrs=lr_grid(2e-4, 3), weight_decay=0.01,
                     val_size=384, dho2_tuned=_tuned(250, 16, 0.3),
                     notes="Frozen: embeddings and encoder layers 1-5 (their output is computed once); trained: "
                           "layer 6, pooler and head (1.9M parameters). Budget: AdamW's validation loss reaches "
                           "its minimum around 200-250 steps (2 epochs of the 2048-row slice) and rises after "
                           "(over-fitting), so the budget ends at the flat bottom."),
        "autoencoder": Task(name="autoencoder",
                            description="deep tanh autoencoder 64-48-32-16-6-16-32-48-64 on sklearn digits, "
                                        "1541 train / 256 val, full batch at W=2 (770 rows per rank)",
                            steps=3000, eval_every=100, micro_batch=770, lrs=lr_grid(1.5e-2, 3), classifier=False,
                            val_size=256, dho2_tuned=_tuned(3000, 16, 0.3),
                            notes="The curvature-limited task of the regime map (benchmarks/regime_tasks.py): "
                                  "no gradient noise at full batch, a 6-unit bottleneck behind three tanh layers. "
                                  "Validation loss = mean squared reconstruction error per pixel of 256 held-out "
                                  "digits; the budget is the regime benchmark's 3,000 steps."),
    }


def setup_task(task: Task, rank: int, world: int) -> TaskData:
    fn = {"digits": _setup_digits, "charlm": _setup_charlm, "sst2": _setup_sst2,
          "autoencoder": _setup_autoencoder}[task.name]
    return fn(task, rank, world)
