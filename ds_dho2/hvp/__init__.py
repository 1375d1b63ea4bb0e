"""Hessian-vector products of a model's loss, and capture of the batch they are evaluated on."""

from ds_dho2.hvp.capture import BatchCapture, LossNotFoundError, loss_from_output
from ds_dho2.hvp.strategies import HessianVectorProduct

__all__ = ["BatchCapture", "LossNotFoundError", "HessianVectorProduct", "loss_from_output"]
