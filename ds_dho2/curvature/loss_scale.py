"""How the curvature loss is scaled: the one place that decides it, for every route and world size.

The curvature DHO2 estimates must be the Hessian of the loss whose gradient it receives. DeepSpeed gives
the optimizer ``G = mean over ranks of sum over micro-batches of (s * grad l_i)``, where ``l_i`` is the
loss handed to ``engine.backward`` and ``s`` is ``1 / gradient_accumulation_steps`` when DeepSpeed
scales it (``scale_wrt_gas=True``, the default) and 1 when the caller already did (the Hugging Face
Trainer passes ``scale_wrt_gas=False``). Products are taken on one micro-batch per rank and averaged over
ranks, so:

* **graph route** (products on the loss handed to ``engine.backward``): the curvature loss is
  ``gradient_accumulation_steps * s * l`` (:func:`backward_loss_scale`); whatever the Trainer folded into
  ``l`` (its ``world_size`` factor under token averaging, its ``1/accumulation`` otherwise) is exactly
  what reached the gradient, so eigenvalues do not depend on W or on accumulation;
* **replay route** (re-running the captured micro-batch): the curvature loss is the model's loss on that
  micro-batch as its own mean, so the replay drops ``num_items_in_batch`` (``REPLAY_DROPPED_KWARGS``),
  the global item count by which Hugging Face models would otherwise divide a sum;
* **plain PyTorch** (``loss.backward(); optimizer.step()``): the replayed loss is the loss that was
  differentiated.
"""

from __future__ import annotations

from ds_dho2.hvp.capture import REPLAY_DROPPED_KWARGS

__all__ = ["REPLAY_DROPPED_KWARGS", "backward_loss_scale"]


def backward_loss_scale(gradient_accumulation_steps: int, scaled_by_engine: bool) -> float:
    """The factor that turns the loss handed to ``engine.backward`` into the curvature loss."""
    return 1.0 if scaled_by_engine else float(gradient_accumulation_steps)
