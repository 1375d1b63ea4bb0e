"""Small models, data and reference runs shared by the DeepSpeed integration tests.

The model has 227 parameters: not a multiple of ``2 * W`` for W in {2, 4}, so ZeRO pads the flat buffer
and the last rank's partition ends in padding. Data are fixed per step; a W-rank run gives rank ``r`` rows
``[r*B/W, (r+1)*B/W)`` of each global batch ``B`` and the single-process reference sees the whole batch.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

IN_FEATURES, HIDDEN, CLASSES = 12, 14, 3
NUM_PARAMS = IN_FEATURES * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES  # 227

#: DHO2 params for the equality runs: refreshes at steps 2, 5, 8 (blocking), k=4, m=8. Exact products on
#: the whole micro-batch (W=4 gives each rank 2 rows, too few for a world-size-invariant strided subset),
#: and a fixed interval, so every world size runs the same schedule.
EQ_PARAMS: dict[str, Any] = {"lr": 1e-2, "rank": 4, "refresh_interval": 3, "warmup_steps": 2,
                             "weight_decay": 0.01, "hvp": "reverse",
                             "curvature": {"batch_fraction": 1.0, "max_interval": 3, "back_off": False}}


class LossModel(torch.nn.Module):
    """An MLP whose forward returns the cross-entropy loss (so DHO2 finds the loss without a loss_fn)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, HIDDEN), torch.nn.Tanh(),
                                       torch.nn.Linear(HIDDEN, CLASSES))

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        logits = self.net(x.to(self.net[0].weight.dtype)).float()
        return torch.nn.functional.cross_entropy(logits, y) * scale


def batches(steps: int, global_batch: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` fixed global batches (a learnable rule plus noise, so the loss can fall)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(IN_FEATURES, CLASSES, generator=g)
    out = []
    for _ in range(steps):
        x = torch.randn(global_batch, IN_FEATURES, generator=g)
        y = (x @ w + 0.3 * torch.randn(global_batch, CLASSES, generator=g)).argmax(dim=1)
        out.append((x, y))
    return out


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    per = x.shape[0] // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def keep_curvature(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the curvature back-off off: short runs that test the curvature machinery must keep
    their basis even where the Newton step carries a small share of the update (``curvature.back_off``)."""
    params = config["optimizer"]["params"]
    params["curvature"] = {**params.get("curvature", {}), "back_off": False}
    return config


def ds_config(stage: int, params: dict[str, Any], micro_batch: int, **extra: Any) -> dict[str, Any]:
    """A minimal DeepSpeed config with a DHO2 optimizer block."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "DHO2", "params": copy.deepcopy(params)},
        "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    cfg.update(extra)
    return cfg


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def single_process_run(steps: int, global_batch: int, params: dict[str, Any], *, clip: float | None = None,
                       lr_schedule: Any = None, accumulation: int = 1, seed: int = 1) -> dict[str, Any]:
    """Plain ``ds_dho2.DHO2`` on the whole global batch: the reference a W-rank run must reproduce.

    ``clip``: gradient norm clipping (global norm, as DeepSpeed does). ``lr_schedule(step)`` sets the lr
    before each step (step counts from 0). ``accumulation``: each global batch is split into that many
    consecutive micro-batches whose mean gradient is used; the curvature uses the last one (only when
    every rank sees the same micro-batch layout, i.e. the caller passes matching data).
    """
    import ds_dho2

    model = LossModel()
    opt = ds_dho2.DHO2(model.parameters(), **copy.deepcopy(params)).attach(model)
    history, norms, lrs = [], [], []
    for step, batch in enumerate(batches(steps, global_batch, seed)):
        if lr_schedule is not None:
            opt.param_groups[0]["lr"] = lr_schedule(step)
        opt.zero_grad()
        micro = batch_micro(batch, accumulation)
        for x, y in micro:
            (model(x, y) / accumulation).backward()
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        history.append(None if opt.eigenvalues is None else opt.eigenvalues.clone())
    return {"params": flat_params(model), "eigenvalues": opt.eigenvalues.clone() if opt.eigenvalues is not None
            else None, "eig_history": history, "eigvec_numel": None if opt.local_eigenvectors is None
            else opt.local_eigenvectors.numel(), "stats": dict(opt.stats), "pre_clip_norms": norms, "lrs": lrs}


def batch_micro(batch: tuple[torch.Tensor, torch.Tensor], parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = batch
    return list(zip(x.chunk(parts), y.chunk(parts)))
