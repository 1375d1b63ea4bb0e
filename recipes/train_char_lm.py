"""Train a small GPT-2 from scratch on tiny-shakespeare characters with the HF Trainer + DeepSpeed,
with DHO2 and/or AdamW, and report validation loss and perplexity.

The model is ``GPT2LMHeadModel(GPT2Config(vocab_size=65, n_layer=2, n_embd=64, ...))`` on non-overlapping
blocks of ``--block-size`` characters (first 90% of the text for training, last 10% for validation).
Data is read offline from ``../shared/data/tinyshakespeare`` (or ``$DS_DHO2_DATA_DIR``).

Launch commands (from the repository root; CPU needs ``DS_ACCELERATOR=cpu``)::

    # one process
    DS_ACCELERATOR=cpu python recipes/train_char_lm.py --optimizer both --max-steps 200
    # two processes on one machine
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 recipes/train_char_lm.py --optimizer both
    # the DeepSpeed launcher
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 recipes/train_char_lm.py --optimizer dho2   # GPUs
    DS_ACCELERATOR=cpu deepspeed --bind_cores_to_rank --num_accelerators 2 recipes/train_char_lm.py  # CPU
    # accelerate with a DeepSpeed plugin (the YAML points at recipes/configs/dho2_zero2.json)
    DS_ACCELERATOR=cpu accelerate launch --config_file recipes/configs/accelerate_deepspeed.yaml \
        recipes/train_char_lm.py --optimizer dho2
    # two nodes, two processes each (run on every node with its --node_rank)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 2 --master_addr HOST0 --master_port 29500 \
        recipes/train_char_lm.py --optimizer both
    torchrun --nnodes 2 --node_rank 1 --nproc_per_node 2 --master_addr HOST0 --master_port 29500 \
        recipes/train_char_lm.py --optimizer both
    # or with a hostfile: deepspeed --hostfile hosts --num_nodes 2 recipes/train_char_lm.py ...

Outputs in ``--output-dir``: ``<optimizer>/log_history.json``, ``summary.json`` and ``loss_curves.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


class Blocks:
    """A map-style dataset of ``{"input_ids", "labels"}`` (GPT-2 shifts the labels itself)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        row = self.blocks[index, :-1]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}


def build_task(args: argparse.Namespace) -> common.Task:
    from transformers import GPT2Config, GPT2LMHeadModel

    from ds_dho2.data import char_lm_blocks, load_tinyshakespeare

    text = load_tinyshakespeare()
    train_blocks, tokenizer = char_lm_blocks(text, args.block_size, split="train")
    val_blocks, _ = char_lm_blocks(text, args.block_size, split="val", tokenizer=tokenizer)
    if args.eval_samples:
        val_blocks = val_blocks[: args.eval_samples]
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=args.block_size, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=args.dropout,
                        embd_pdrop=args.dropout, attn_pdrop=args.dropout, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)

    def model_init():
        return GPT2LMHeadModel(config)

    return common.Task(name=f"char-LM GPT-2 ({args.n_layer} layers, n_embd {args.n_embd}) on tinyshakespeare",
                       model_init=model_init, train_dataset=Blocks(train_blocks), eval_dataset=Blocks(val_blocks),
                       headline_metric="eval_loss", extra_metrics=common.perplexity)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_common_arguments(parser, lr=3e-3, max_steps=300, batch_size=16, output_dir="outputs/char_lm")
    m = parser.add_argument_group("model and data")
    m.add_argument("--block-size", type=int, default=64, help="characters per training sequence")
    m.add_argument("--n-layer", type=int, default=2)
    m.add_argument("--n-embd", type=int, default=64)
    m.add_argument("--n-head", type=int, default=4)
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--eval-samples", type=int, default=512, help="validation blocks evaluated (0: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.run_recipe(build_task(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
