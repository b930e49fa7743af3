"""Schedule-Free AdamW from the `schedulefree` package, with this package's evaluation interface.

Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, "The Road Less Scheduled", NeurIPS 2024
(arXiv 2405.15682); implementation: facebookresearch/schedule_free, `pip install schedulefree`.
The optimizer is the package's `AdamWScheduleFree`, not a rewrite. Its update, per step k with
c_{k+1} = w_k / sum_{i<=k} w_i and w_k = lr_max^2 (the default weight_lr_power=2, r=0):

    y_k     = (1 - beta1) z_k + beta1 x_k              the parameters in train mode; the gradient
    z_{k+1} = z_k - lr (g_k / (sqrt(v_k / (1 - beta2^(k+1))) + eps) + wd y_k)
    x_{k+1} = (1 - c_{k+1}) x_k + c_{k+1} z_{k+1}      the averaged sequence evaluation reports

It stores z and the second moment (state keys `z`, `exp_avg_sq`); x is implicit in (y, z), and
`.eval()` / `.train()` move the parameters between y and x in place.

What the adapter adds:
  * train mode is set at construction (the package starts in eval mode and refuses to step);
  * `.train()` / `.eval()` leave no empty per-parameter state entries: an empty entry hides an
    uninitialised state from torch.distributed.checkpoint, and a resume would then load no
    optimizer state (see `train`);
  * `eval_sequence = "x"` and `eval_parameters()`, a context manager that calls `.eval()` and
    then `.train()` (the parameters come back to y up to fp32 rounding of the two lerps);
  * nothing for FSDP2: every op of the package's step, `.eval()` and `.train()` is element-wise
    (`torch._foreach_*`, `lerp_`) on tensors that are DTensors with the parameter's placements,
    and it keeps no global norms, so it runs on sharded parameters as they are, with no
    collective (tests/test_outer_family.py checks it against a single-process run at world
    size 2, tests/test_optim_meshes.py on TP x FSDP and EP layouts at world size 4).

Learning rate: schedule-free replaces the decay of a schedule, so the trainer's schedule must be
`constant`. The warm-up of our constant schedule (lr x (k + 1) / warmup_steps for k < warmup)
is exactly the package's own `warmup_steps` formula, so the adapter leaves the package's warm-up
at 0 by default and trainer.warmup_steps is the one knob (snoo_train/configs/groups/optim/schedule_free_adamw.yaml).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from schedulefree import AdamWScheduleFree


class ScheduleFreeAdamW(AdamWScheduleFree):
    """`schedulefree.AdamWScheduleFree`, in train mode from construction, with `eval_parameters()`.

    Takes the package's arguments (params, lr, betas, eps, weight_decay, warmup_steps, r,
    weight_lr_power, foreach). Weight decay is computed at y, as in the package.
    """

    eval_sequence = "x"
    # .eval() then .train() brings y back only up to the rounding of two lerps: a reader that
    # must leave training untouched (the weight norm at log steps) restores y from a copy.
    eval_swap_restores_bitwise = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train()

    # The package's .train() and .eval() look up `self.state[p]` for every parameter, and the
    # state is a defaultdict: before the first step that leaves one empty entry per parameter.
    # torch.distributed.checkpoint's get_state_dict takes a non-empty `optimizer.state` to mean
    # "initialised", skips the step that creates the state tensors, and loading a checkpoint
    # into a fresh optimizer then silently restores no z and no second moment (found by
    # tests/test_outer_family.py's DCP resume). Dropping the empty entries keeps the contract.
    @torch.no_grad()
    def train(self) -> None:
        super().train()
        self._drop_empty_state()

    @torch.no_grad()
    def eval(self) -> None:
        super().eval()
        self._drop_empty_state()

    def _drop_empty_state(self) -> None:
        for p in [p for p, s in self.state.items() if not s]:
            del self.state[p]

    @property
    def train_mode(self) -> bool:
        return all(group["train_mode"] for group in self.param_groups)

    def flush(self) -> None:
        """Nothing pending: x moves at every step (the trainer calls this after its last step)."""

    @contextlib.contextmanager
    def eval_parameters(self) -> Iterator[None]:
        """Context manager: the parameters hold x inside (`.eval()`), y after (`.train()`)."""
        was_training = self.train_mode
        self.eval()
        try:
            yield
        finally:
            if was_training:
                self.train()
