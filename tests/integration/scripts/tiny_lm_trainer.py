"""A plain Hugging Face Trainer script that knows nothing of ds_dho2: a tiny GPT-2 language model.

``python tiny_lm_trainer.py --deepspeed CONFIG.json [--batch-size B] [--max-steps N] [--output-dir DIR]
[--report-to tensorboard]`` trains a one-layer GPT-2 on fixed random token sequences with whatever DeepSpeed
config ``--deepspeed`` names. Rank 0 writes the Trainer's ``state.log_history`` to ``DIR/log_history.json``;
every rank prints ``TRAINED rank=R world=W steps=S``.

Batches are taken in dataset order (``train_sampling_strategy="sequential"``), so a run at one process with
micro batch 2B and a run at two processes with micro batch B see the same global batch at every step
(accelerate hands consecutive micro batches to consecutive ranks). Dropout is off: its masks come from each
rank's own random stream, so they would differ between those two runs.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    """Random sequences where every odd token follows from the one before it (something to learn)."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.ids[:, 1::2] = (self.ids[:, 0::2] + 1) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--output-dir", default="outputs/tiny_lm_trainer")
    parser.add_argument("--report-to", default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    cpu = not torch.cuda.is_available()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=args.report_to,
        deepspeed=args.deepspeed, use_cpu=cpu,
        ddp_backend="gloo" if cpu and several else None, train_sampling_strategy="sequential",
        disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=Tokens())
    trainer.train()
    if training_args.process_index == 0:
        Path(args.output_dir, "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    print(f"TRAINED rank={training_args.process_index} world={training_args.world_size} "
          f"steps={trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main()
