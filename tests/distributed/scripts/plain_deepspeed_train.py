"""An ordinary DeepSpeed training script that knows nothing of ds_dho2.

Usage: ``python plain_deepspeed_train.py CONFIG.json [--local_rank N]`` under a launcher (the ``deepspeed``
launcher passes ``--local_rank``, as DeepSpeed scripts expect). It builds a small MLP, calls
``deepspeed.initialize(model=..., model_parameters=..., config=CONFIG.json)`` and trains a few steps.
"""

import argparse

import deepspeed
import torch


class Regressor(torch.nn.Module):
    """Returns its loss, like Hugging Face models given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.net(x), target)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--local_rank", type=int, default=-1)
    config_path = parser.parse_args().config
    torch.manual_seed(0)
    model = Regressor()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=config_path)
    generator = torch.Generator().manual_seed(100 + engine.global_rank)
    losses = []
    for _ in range(6):
        x = torch.randn(4, 8, generator=generator)
        loss = engine(x, x.sum(dim=1, keepdim=True))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    print(f"BASIC_OPTIMIZER={type(engine.basic_optimizer).__name__} rank={engine.global_rank} "
          f"curvature={getattr(engine.basic_optimizer, 'eigenvalues', None) is not None} losses={losses}",
          flush=True)


if __name__ == "__main__":
    main()
