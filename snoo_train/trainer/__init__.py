"""The training loop and its components (see trainer.py for how they meet)."""

from snoo_train.trainer.evaluator import Evaluator
from snoo_train.trainer.nonfinite import NonFinitePolicy, SkipMask, TrainingDiverged
from snoo_train.trainer.state import RunState
from snoo_train.trainer.step import StepRunner, causal_lm_loss, clip_grad_norm
from snoo_train.trainer.trainer import Trainer, resolve_dtype

__all__ = [
    "Evaluator",
    "NonFinitePolicy",
    "RunState",
    "SkipMask",
    "StepRunner",
    "Trainer",
    "TrainingDiverged",
    "causal_lm_loss",
    "clip_grad_norm",
    "resolve_dtype",
]
