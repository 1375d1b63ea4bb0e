"""A plain Hugging Face Trainer script that knows nothing of ds_dho2: a small MLP classifier on
scikit-learn's bundled 8x8 digits, trained with whatever DeepSpeed config ``--deepspeed`` names.

It exists to show (and test) the unmodified-script path: ``ds-dho2 run`` registers ``"type": "DHO2"``
with DeepSpeed and then runs this file as ``__main__``::

    DS_ACCELERATOR=cpu ds-dho2 run recipes/plain_trainer.py --deepspeed recipes/configs/dho2_zero2.json
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 $(which ds-dho2) run recipes/plain_trainer.py \
        --deepspeed recipes/configs/dho2_zero2.json
    DS_ACCELERATOR=cpu accelerate launch --config_file recipes/configs/accelerate_deepspeed.yaml \
        -m ds_dho2.cli run recipes/plain_trainer.py
    # two nodes: torchrun --nnodes 2 --node_rank R --nproc_per_node 2 --master_addr HOST0 \
    #     $(which ds-dho2) run recipes/plain_trainer.py --deepspeed ...

Without ``ds-dho2 run`` the DHO2 config fails in DeepSpeed with an unknown-optimizer error. On rank 0 the
script prints the optimizer class chain (``optimizer chain: ...``), the evaluation loss and accuracy.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainingArguments


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def forward(self, pixels, labels=None):
        logits = self.net(pixels)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits} if loss is not None else {"logits": logits}


class Digits(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixels": self.x[i], "labels": self.y[i]}


def optimizer_chain(obj, depth: int = 6) -> list[str]:
    """Class names found by following .optimizer / .basic_optimizer (generic, no ds_dho2 knowledge)."""
    names, seen = [], set()
    while obj is not None and id(obj) not in seen and depth > 0:
        seen.add(id(obj))
        names.append(type(obj).__name__)
        obj = getattr(obj, "basic_optimizer", None) or getattr(obj, "optimizer", None)
        depth -= 1
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-dir", default="outputs/plain_trainer")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data / 16.0, digits.target, test_size=0.2, random_state=0,
                                              stratify=digits.target)
    torch.manual_seed(0)
    cpu = not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128, learning_rate=args.lr, logging_steps=10, save_strategy="no",
        report_to="none", deepspeed=args.deepspeed, use_cpu=cpu, ddp_backend="gloo" if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = Trainer(model=DigitsMLP(), args=training_args, train_dataset=Digits(x_tr, y_tr),
                      eval_dataset=Digits(x_te, y_te), compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    if int(os.environ.get("RANK", "0")) == 0:
        print("optimizer chain:", " -> ".join(optimizer_chain(trainer.optimizer)), flush=True)
        print("engine basic_optimizer:", type(getattr(trainer.model_wrapped, "basic_optimizer", None)).__name__)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        print("train losses:", json.dumps([round(v, 4) for v in losses]))
        print(f"eval_loss {metrics['eval_loss']:.4f} eval_accuracy {metrics['eval_accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
