"""First-order base optimizers on flat tensors; each returns the step ``d`` (already negated).

The AdamW arithmetic follows ``torch.optim.AdamW`` operation for operation, so that before the first
curvature refresh DHO2 reproduces it to rounding.
"""

from __future__ import annotations

import math

import torch


def adamw_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, step: int,
                    lr: float, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Update the Adam moments in place and return ``-lr * m_hat / (sqrt(v_hat) + eps)``."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    return exp_avg.div(denom).mul_(-lr / bias_correction1)


def heavyball_direction(grad: torch.Tensor, buffer: torch.Tensor, *, lr: float, momentum: float) -> torch.Tensor:
    """Update the momentum buffer (``b <- momentum*b + g``) in place and return ``-lr * b``."""
    buffer.mul_(momentum).add_(grad)
    return buffer.mul(-lr)
