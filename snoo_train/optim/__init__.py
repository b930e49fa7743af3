"""Optimizers. Depends on torch only, so SNOO and Muon can be taken into any training loop.

`ScheduleFreeAdamW` adapts the `schedulefree` package (torch only too) and is imported on first
use, so the rest works without it."""

from snoo_train.optim.ema_nesterov import EMANesterov
from snoo_train.optim.gpa import GPA
from snoo_train.optim.muon import Muon, categorize_parameters, muon_param_groups, newton_schulz
from snoo_train.optim.snoo import SNOO

__all__ = [
    "GPA",
    "SNOO",
    "EMANesterov",
    "Muon",
    "ScheduleFreeAdamW",
    "categorize_parameters",
    "muon_param_groups",
    "newton_schulz",
]


def __getattr__(name: str):
    if name == "ScheduleFreeAdamW":
        from snoo_train.optim.schedule_free import ScheduleFreeAdamW

        return ScheduleFreeAdamW
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
