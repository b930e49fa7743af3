"""GPA: Generalized Primal Averaging around any inner optimizer.

Defazio, Mishchenko, Raman, Shi, Xiao, "Smoothing DiLoCo with Primal Averaging for Faster
Training of LLMs", arXiv 2512.17131 (Meta; official AdamW version: facebookresearch/optimizers,
gpa/). Three sequences per parameter: z takes the base optimizer's steps, x is an exponential
moving average of z (the model to evaluate), and the gradient is taken at y, an interpolation of
the two. Each step t, with the inner optimizer as the base step A:

    y_t     = mu_y * x_t + (1 - mu_y) * z_t        the parameters; the training loop's gradient
    z_{t+1} = A(z_t; grad f(y_t))                  the inner step, applied to z
    x_{t+1} = mu_x * x_t + (1 - mu_x) * z_{t+1}
    x_0 = z_0 = y_0 = the parameters at the first step.

The inner step runs on z, as in the paper's general form z_{t+1} = (1 - lr*wd) z_t - lr d_t(y_t):
AdamW's decoupled weight decay therefore acts on z. (The official GPAAdamW applies its decay at y
instead; both are allowed by the paper. With weight_decay=0 the two are identical.)

mu_x sets how far x averages: time constant 1 / (1 - mu_x) steps. The paper maps it to the
number of inner steps H of single-worker DiLoCo with outer momentum 0.9 as

    mu_x = 0.9 ** (1 / H)      H=1: 0.9, H=8: 0.9869, H=16: 0.9934, H=32: 0.9967 (default), H=64: 0.9984

(`GPA.mu_x_for_period(H)`). mu_y is how much of x the gradient point holds: mu_y = 0 takes the
gradient at z (plain inner optimizer, x a pure EMA for evaluation); mu_x = 0 gives x = y = z
(the plain inner optimizer).

Memory: one buffer per parameter, x (state key `gpa_x`), the "single additional buffer" of the
paper. The parameters hold y; z is never stored: just before the inner step each parameter's
local shard is turned into z in place, `p <- (p - mu_y * x) / (1 - mu_y)`; the inner optimizer
steps it; then `x <- lerp(x, p, 1 - mu_x)` and `p <- lerp(p, x, mu_y)` write x_{t+1} and
y_{t+1}, all in place with torch._foreach_* on the local shards: no temporary copy of the
parameters and no collective. The price is that mu_y = 1 (gradient at x) is not representable,
so mu_y is in [0, 1), and recovering z divides by (1 - mu_y): fp32 rounding on z grows by about
1 / (1 - mu_y) (3x at the default 0.7), far below the size of a step. Keep fp32 master weights
(FSDP2 does: the sharded parameters stay fp32 under a bf16 compute policy).

The mu_y with which the parameters were last formed is kept in each param group
(`gpa_params_mu_y`), so a scheduler may change `gpa_mu_y` or `gpa_mu_x` between steps.

Evaluation and export should see x: `eval_sequence = "x"`, and `eval_parameters()` copies x into
the parameters' local shards and restores y exactly afterwards (one transient copy of this rank's
parameters while evaluating; under FSDP2 reshard before and after, as for SNOO).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from snoo_train.optim._wrapper import InnerWrapper, _local

X = "gpa_x"
MU_X = "gpa_mu_x"
MU_Y = "gpa_mu_y"
PARAMS_MU_Y = "gpa_params_mu_y"  # the mu_y with which the parameters (y) were last formed


class GPA(InnerWrapper):
    """Generalized Primal Averaging around any `torch.optim.Optimizer`.

    Args:
        inner: the base optimizer (AdamW, Muon, SGD, ...); it steps z. LR schedulers act on its
            learning rate.
        mu_x: EMA coefficient of x, in [0, 1): `GPA.mu_x_for_period(H)` = 0.9 ** (1 / H) matches
            single-worker DiLoCo with H inner steps. Paper default 0.9967 (H = 32).
        mu_y: weight of x in the gradient point y, in [0, 1). Paper default 0.7.

    Example::

        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        opt = GPA(inner, mu_x=GPA.mu_x_for_period(32), mu_y=0.7)
        loss.backward(); opt.step(); opt.zero_grad()
        with opt.eval_parameters():
            evaluate(model)  # at x
    """

    eval_sequence = "x"
    _buffer_key = X

    def __init__(self, inner: Optimizer, mu_x: float = 0.9967, mu_y: float = 0.7) -> None:
        if not 0.0 <= mu_x < 1.0:
            raise ValueError(f"mu_x must be in [0, 1), got {mu_x!r}")
        if not 0.0 <= mu_y < 1.0:
            raise ValueError(f"mu_y must be in [0, 1), got {mu_y!r}")
        super().__init__(inner, {MU_X: float(mu_x), MU_Y: float(mu_y)})

    @staticmethod
    def mu_x_for_period(period: float) -> float:
        """The mu_x that matches single-worker DiLoCo with `period` inner steps: 0.9 ** (1 / H)."""
        if not period > 0:
            raise ValueError(f"period must be > 0, got {period!r}")
        return 0.9 ** (1.0 / period)

    @staticmethod
    def period_for_mu_x(mu_x: float) -> float:
        """Inverse of `mu_x_for_period`: H = ln 0.9 / ln mu_x."""
        return math.log(0.9) / math.log(mu_x)

    def _init_group(self, group: dict[str, Any]) -> None:
        super()._init_group(group)
        group.setdefault(PARAMS_MU_Y, group[MU_Y])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        # The gradient belongs to y, which the parameters hold now: a closure runs here, before
        # the parameters are turned into z, and the inner optimizer steps without it.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # A parameter joins at its first gradient: x_0 = z_0 = y_0 = its value now, so it needs
        # no transformation; the copy becomes x once the inner optimizer has made its state.
        first_seen = self._newcomers(X)

        # y -> z in place: z = (y - mu_y' x) / (1 - mu_y'), mu_y' the value y was formed with.
        for group in self.param_groups:
            params = self._tracked(group, X)
            mu = group[PARAMS_MU_Y]
            if params and mu != 0.0:
                local = [_local(p) for p in params]
                torch._foreach_sub_(local, [_local(self.state[p][X]) for p in params], alpha=mu)
                torch._foreach_div_(local, 1.0 - mu)

        self._inner.step()  # z_{t+1} = A(z_t; grad f(y_t))

        for p, x0 in first_seen.items():
            self.state[p][X] = x0

        for group in self.param_groups:
            params = self._tracked(group, X)
            mu_x, mu_y = group[MU_X], group[MU_Y]
            if params:
                z = [_local(p) for p in params]
                x = [_local(self.state[p][X]) for p in params]
                torch._foreach_lerp_(x, z, 1.0 - mu_x)  # x_{t+1} = mu_x x_t + (1 - mu_x) z_{t+1}
                torch._foreach_lerp_(z, x, mu_y)  # y_{t+1} = mu_y x_{t+1} + (1 - mu_y) z_{t+1}
            group[PARAMS_MU_Y] = mu_y
        return loss

    # -- evaluation ----------------------------------------------------------------------------

    def eval_parameters(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: the parameters hold x inside, y again (exactly) after."""
        return self._swap_in_eval_point()

    def _write_eval_point(self, group, params, buffers) -> None:
        torch._foreach_copy_(params, buffers)
