"""EMA-Nesterov: Nesterov's lookahead along an exponential moving average of the updates.

Yau, Li, Glentis, Boreiko, Wai, Hong, "EMA-Nesterov: Stabilizing Nesterov's Lookahead for
Accelerated Deep Learning Optimization", arXiv 2605.25395 (used on modded-nanogpt records #39/#40
with gamma = 0.99 and beta = 0.6 or 0.3 times lr / max_lr). Around any base optimizer A:

    x_{t+1} = A_t(x_t + beta_t m_t)                     gradient and base step at the lookahead
    m_{t+1} = gamma m_t + (1 - gamma) (x_{t+1} - x_t)    EMA of the iterate's increments
    x_0 = the parameters at the first step, m_0 = 0.

The base step starts from the lookahead point (it is not undone), its gradient is taken there, and
its weight decay acts there; x is the iterate evaluation reports (the authors' training script
evaluates the parameters before the next lookahead is added). `beta_follows_lr` scales beta by the
learning-rate schedule, beta_t = beta * lr / initial_lr of the param group (`initial_lr` is what
torch's LR schedulers record; without a scheduler the ratio is 1), so the lookahead is small in
warm-up and vanishes with the learning rate at the end, as the paper prescribes.

Where the sequences live. Between steps the parameters hold the lookahead point
y_t = x_t + beta_t m_t, where the training loop takes the gradient; the inner step turns them into
x_{t+1}; then the next lookahead is added. The training loop steps the LR scheduler after the
optimizer, so the beta of the lookahead added at the end of step t follows the lr of step t: one
step behind the authors' loop, which adds it after the scheduler step (immaterial for smooth
schedules). The beta that is in the parameters is kept per param group (`ema_beta_applied`), so
x_t = y_t - beta_applied m_t is always known (a checkpoint or a scheduler change of `ema_beta`
cannot desynchronise them).

Memory: one buffer per parameter, m (state key `ema_m`). x_t is not stored: before the inner step
the buffer becomes c m_t - y_t with c = gamma / (1 - gamma) + beta_applied, and after it
m_{t+1} = (1 - gamma) (buffer + x_{t+1}), which is gamma m_t + (1 - gamma)(x_{t+1} - x_t); all
in place on the local shards with torch._foreach_*, no temporary copy of the parameters and no
collective. (The authors' implementation keeps two buffers, the previous iterate and m.)

Evaluation: `eval_sequence = "x"`, and `eval_parameters()` writes x = y - beta_applied m into the
parameters' local shards and restores y exactly afterwards (one transient copy of this rank's
parameters while evaluating).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from snoo_train.optim._wrapper import InnerWrapper, _local

M = "ema_m"
GAMMA = "ema_gamma"
BETA = "ema_beta"
FOLLOWS_LR = "ema_beta_follows_lr"
BETA_APPLIED = "ema_beta_applied"  # the beta of the lookahead the parameters hold now


class EMANesterov(InnerWrapper):
    """EMA-Nesterov around any `torch.optim.Optimizer`.

    Args:
        inner: the base optimizer (AdamW, Muon, SGD, ...), stepped at the lookahead point.
        gamma: EMA coefficient of the update direction m, in [0, 1). Paper/authors: 0.99.
        beta: lookahead step size, >= 0 (the lookahead is x + beta m). Authors' default 0.5;
            beta = 0 gives the plain inner optimizer.
        beta_follows_lr: scale beta by lr / initial_lr of each param group.

    Example::

        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        opt = EMANesterov(inner, gamma=0.99, beta=0.5)
        loss.backward(); opt.step(); opt.zero_grad()
        with opt.eval_parameters():
            evaluate(model)  # at x, without the lookahead
    """

    eval_sequence = "x"
    _buffer_key = M

    def __init__(
        self,
        inner: Optimizer,
        gamma: float = 0.99,
        beta: float = 0.5,
        beta_follows_lr: bool = True,
    ) -> None:
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
        if not beta >= 0.0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        super().__init__(
            inner, {GAMMA: float(gamma), BETA: float(beta), FOLLOWS_LR: bool(beta_follows_lr)}
        )

    def _init_group(self, group: dict[str, Any]) -> None:
        super()._init_group(group)
        group.setdefault(BETA_APPLIED, 0.0)

    @staticmethod
    def lookahead_beta(group: dict[str, Any]) -> float:
        """beta for the next lookahead of this group: ema_beta, times lr / initial_lr when
        ema_beta_follows_lr."""
        beta = group[BETA]
        if group[FOLLOWS_LR]:
            initial = group.get("initial_lr", group["lr"])
            beta = beta * float(group["lr"]) / float(initial) if initial else 0.0
        return beta

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        # The parameters hold the lookahead point: a closure's gradient belongs there.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # A parameter joins at its first gradient with m_0 = 0 (no lookahead in it yet): the copy
        # of x_0 becomes m once the inner optimizer has made its state.
        first_seen = self._newcomers(M)

        # buffer <- c m_t - y_t, c = gamma / (1 - gamma) + beta_applied
        for group in self.param_groups:
            params = self._tracked(group, M)
            if params:
                gamma = group[GAMMA]
                buf = [_local(self.state[p][M]) for p in params]
                torch._foreach_mul_(buf, gamma / (1.0 - gamma) + group[BETA_APPLIED])
                torch._foreach_sub_(buf, [_local(p) for p in params])

        self._inner.step()  # x_{t+1} = A_t(y_t)

        for group in self.param_groups:
            gamma = group[GAMMA]
            params, buf, x0 = [], [], []
            for p in group["params"]:
                if p in first_seen:
                    x0.append((p, first_seen[p]))
                elif M in self.state[p]:
                    params.append(_local(p))
                    buf.append(_local(self.state[p][M]))
            if buf:  # m_{t+1} = (1 - gamma) (buffer + x_{t+1})
                torch._foreach_add_(buf, params)
                torch._foreach_mul_(buf, 1.0 - gamma)
            if x0:  # m_1 = (1 - gamma) (x_1 - x_0)
                copies = [_local(c) for _, c in x0]
                torch._foreach_sub_(copies, [_local(p) for p, _ in x0])
                torch._foreach_mul_(copies, gamma - 1.0)
                for p, c in x0:
                    self.state[p][M] = c

            # The next lookahead: y_{t+1} = x_{t+1} + beta_{t+1} m_{t+1}.
            beta = self.lookahead_beta(group)
            tracked = self._tracked(group, M)
            if tracked and beta != 0.0:
                torch._foreach_add_(
                    [_local(p) for p in tracked],
                    [_local(self.state[p][M]) for p in tracked],
                    alpha=beta,
                )
            group[BETA_APPLIED] = beta
        return loss

    # -- evaluation ----------------------------------------------------------------------------

    def eval_parameters(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: the parameters hold x (no lookahead) inside, y again (exactly) after."""
        return self._swap_in_eval_point()

    def _params_are_eval_point(self, group: dict[str, Any]) -> bool:
        return group[BETA_APPLIED] == 0.0

    def _write_eval_point(self, group, params, buffers) -> None:
        torch._foreach_add_(params, buffers, alpha=-group[BETA_APPLIED])
