"""First-order base optimizers on flat tensors; each returns the step ``d`` (already negated).

Both take ``keep``, a 0-dim 0/1 tensor on the device: 0 leaves the moments, the step count and the
returned step untouched/zero (a skipped step) without reading the flag on the host, so a GPU never
waits for it. With ``keep == 1`` the AdamW arithmetic is ``torch.optim.AdamW``'s up to rounding, so that
before the first curvature refresh DHO2 reproduces it.
"""

from __future__ import annotations

import torch


def fused_adamw_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                          step: torch.Tensor, keep: torch.Tensor, out: torch.Tensor, *, lr: float,
                          betas: tuple[float, float], eps: float) -> torch.Tensor | None:
    """:func:`adamw_direction` in one ``torch._fused_adamw_`` kernel (``found_inf`` skips a masked step),
    written into ``out``; None where the kernel is missing or refuses these tensors (then use the
    unfused function)."""
    fused = getattr(torch, "_fused_adamw_", None)
    if fused is None:
        return None
    step.add_(keep)
    out.zero_()
    try:
        fused([out], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=lr, beta1=betas[0], beta2=betas[1],
              weight_decay=0.0, eps=eps, amsgrad=False, maximize=False, grad_scale=None,
              found_inf=(1 - keep).to(torch.float32))
    except (RuntimeError, NotImplementedError):
        step.sub_(keep)
        return None
    return out


def adamw_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: torch.Tensor,
                    keep: torch.Tensor, *, lr: float, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Update the Adam moments and the step count in place; return ``-lr * m_hat / (sqrt(v_hat) + eps)``.

    ``grad`` must be zero where ``keep`` is 0 (the caller masks it); ``step`` is a float tensor counting
    the applied steps (for the bias corrections).
    """
    beta1, beta2 = betas
    step.add_(keep)
    exp_avg.mul_(1 - (1 - beta1) * keep).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(1 - (1 - beta2) * keep).addcmul_(grad, grad, value=1 - beta2)
    safe_step = step.clamp_min(1)
    bias_correction1 = 1 - beta1 ** safe_step
    bias_correction2_sqrt = (1 - beta2 ** safe_step).sqrt()
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return exp_avg.div(denom).mul_(keep * (-lr) / bias_correction1)


def heavyball_direction(grad: torch.Tensor, buffer: torch.Tensor, keep: torch.Tensor, *, lr: float,
                        momentum: float) -> torch.Tensor:
    """Update the momentum buffer (``b <- momentum*b + g``) in place and return ``-lr * b``."""
    buffer.mul_(1 - (1 - momentum) * keep).add_(grad)
    return buffer.mul(keep * (-lr))
