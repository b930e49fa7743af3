"""One optimizer step: micro-batches -> loss -> backward -> clip -> optimizer step -> schedule,
and the policy for a step whose loss or gradient norm is not finite."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snoo_train.dist import all_reduce_mean
from snoo_train.models import RouterStats, clip_grads_with_norm, grad_norm

log = logging.getLogger("snoo_train")


class TrainingDiverged(RuntimeError):
    """The training loss or gradient norm became NaN or infinite."""


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    reduction: str = "mean",
    router: RouterStats | None = None,
) -> torch.Tensor:
    """Cross-entropy of next-token logits. The labels come already shifted (window[1:]), so the
    loss is computed here rather than by the HF model, which would shift them a second time.
    With `router` (MoE training) the router's coef x load-balancing loss is added and recorded."""
    extra = {"output_router_logits": True} if router is not None else {}
    outputs = model(input_ids=batch["input_ids"], use_cache=False, **extra)
    logits = outputs.logits
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        batch["labels"].reshape(-1),
        reduction=reduction,
    )
    return loss + router.loss(outputs) if router is not None else loss


def clip_grad_norm(params, max_norm: float) -> float:
    """Global L2 norm of all gradients, then clip to max_norm (0 disables clipping).

    Under FSDP2 the gradients are DTensor shards and the norm comes back as a DTensor holding
    a partial sum; full_tensor() reduces it over ranks, so every rank clips with the same
    global norm. A non-finite norm is returned without touching the gradients."""
    params = [p for p in params if p.grad is not None]
    # Under expert parallelism the gradients live on two meshes: grad_norm reduces each first.
    norm = grad_norm(params)
    if max_norm > 0 and torch.isfinite(norm):
        clip_grads_with_norm(params, max_norm, norm)
    return norm.item()


class NonFinitePolicy:
    """trainer.nonfinite: `stop` raises before optimizer.step(), so the weights, the optimizer
    state and every saved checkpoint stay finite; `skip` drops this step's gradients and
    leaves the optimizer (its state, SNOO's step counter) and the LR schedule untouched, up to
    trainer.nonfinite_max_skips steps in a row. Its counters are part of a checkpoint."""

    def __init__(self, trainer_cfg, optim_cfg):
        self.t, self.o = trainer_cfg, optim_cfg
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def passed(self) -> None:
        self.consecutive_skips = 0

    def handle(self, step: int, loss: float, grad_norm: float) -> None:
        """Record a non-finite step; raise TrainingDiverged unless it may be skipped."""
        t = self.t
        what = f"training loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        if t.nonfinite == "skip":
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips <= t.nonfinite_max_skips:
                log.warning(
                    "%s at step %d: step skipped (%d in a row, %d in all)",
                    what, step, self.consecutive_skips, self.skipped_steps,
                )
                return
            raise TrainingDiverged(
                f"{what} at step {step}, the {self.consecutive_skips}th non-finite step in a row "
                f"(trainer.nonfinite_max_skips={t.nonfinite_max_skips}); lower optim.lr (now {self.o.lr})"
            )
        hint = " or set trainer.grad_clip (now 0)" if not t.grad_clip else ""
        if self.o.outer == "snoo":
            hint += f", or lower optim.outer_lr (now {self.o.outer_lr})"
        raise TrainingDiverged(
            f"{what} at step {step}; lower optim.lr (now {self.o.lr}){hint}, or set "
            "trainer.nonfinite=skip (this step was not applied and nothing was saved from it)"
        )


class StepRunner:
    """Runs optimizer steps: everything between two batches of the loop."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        device: torch.device,
        autocast: AbstractContextManager,
        router: RouterStats | None,
        grad_clip: float,
        policy: NonFinitePolicy,
        after_update: Callable[[], None] | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.autocast, self.router = device, autocast, router
        self.grad_clip, self.policy = grad_clip, policy
        # Runs after every applied optimizer step (the MoE routing-bias update).
        self.after_update = after_update

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def run(self, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, bool]:
        """One optimizer step; returns (loss averaged over ranks and micro-batches, grad norm,
        whether the step was skipped as non-finite)."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro_batches:
            with self.autocast:
                # Equal-size micro-batches of packed windows: scaling each mean by 1/n makes the
                # accumulated gradient the gradient of the mean over all of them.
                loss = causal_lm_loss(self.model, self.to_device(batch), router=self.router) / len(micro_batches)
            loss.backward()
            loss_sum += loss.detach()

        loss_value = all_reduce_mean(loss_sum.item(), self.device)
        # Both checks see global values (the loss is averaged over ranks, the norm is the global
        # norm), so every rank takes the same decision.
        grad_norm = (
            clip_grad_norm(self.model.parameters(), self.grad_clip) if math.isfinite(loss_value) else float("nan")
        )
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.policy.handle(step, loss_value, grad_norm)  # raises unless the policy is skip
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value, grad_norm, True
        self.policy.passed()
        self.optimizer.step()
        if self.after_update is not None:
            self.after_update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, grad_norm, False
