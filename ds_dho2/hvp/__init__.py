"""Hessian-vector products of a model's loss, and the hooks that capture the batch they are taken on."""

from ds_dho2.hvp.capture import BatchCapture, LossNotFoundError, find_loss, loss_from_output
from ds_dho2.hvp.selection import ProductInputs, StrategyChooser, StrategyUnavailable, open_session

__all__ = ["BatchCapture", "LossNotFoundError", "ProductInputs", "StrategyChooser", "StrategyUnavailable",
           "find_loss", "loss_from_output", "open_session"]
