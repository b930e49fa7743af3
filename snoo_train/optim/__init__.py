"""Optimizers. Depends on torch only, so SNOO and Muon can be taken into any training loop."""

from snoo_train.optim.muon import Muon, categorize_parameters, muon_param_groups, newton_schulz
from snoo_train.optim.snoo import SNOO

__all__ = ["SNOO", "Muon", "categorize_parameters", "muon_param_groups", "newton_schulz"]
