"""Optimizers. Depends on torch only, so SNOO can be taken into any training loop."""

from snoo_train.optim.snoo import SNOO

__all__ = ["SNOO"]
