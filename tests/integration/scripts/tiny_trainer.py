"""A plain Hugging Face Trainer script that knows nothing of ds_dho2: the ``train.py`` of the launch tests.

``python tiny_trainer.py --deepspeed CONFIG.json [--max-steps N] [--output-dir DIR]`` trains a linear
regression with the Trainer and whatever DeepSpeed config ``--deepspeed`` names. Every rank prints
``TRAINED rank=R world=W optimizer=NAME steps=S`` (NAME: the DeepSpeed engine's basic optimizer class).
"""

import argparse
import os

import torch
from transformers import Trainer, TrainingArguments


class Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--output-dir", default="outputs/tiny_trainer")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    args = parser.parse_args()
    cpu = not torch.cuda.is_available()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", deepspeed=args.deepspeed, use_cpu=cpu,
        ddp_backend="gloo" if cpu and several else None, disable_tqdm=True)
    trainer = Trainer(model=Regression(), args=training_args, train_dataset=Data())
    trainer.train()
    basic = getattr(trainer.model_wrapped, "basic_optimizer", None)
    print(f"TRAINED rank={training_args.process_index} world={training_args.world_size} "
          f"optimizer={type(basic).__name__} steps={trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main()
