"""Held-out evaluation at the optimizer's evaluation weights (SNOO's slow weights, GPA's and
Schedule-Free's x), on its own interval."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from snoo_train.data import eval_batches
from snoo_train.dist import DistInfo, all_reduce_sum
from snoo_train.models.pipeline import all_modules
from snoo_train.optim._dtensor import local, replication_factor
from snoo_train.trainer.step import causal_lm_loss


class Evaluator:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        val_set: Any,
        trainer_cfg,
        dist: DistInfo,
        *,
        autocast: AbstractContextManager,
        to_device: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        pipeline: Any = None,
    ):
        self.model, self.optimizer, self.val_set = model, optimizer, val_set
        self.pipeline = pipeline  # trainer/pipeline.py: evaluation runs through its schedule
        self.t, self.dist = trainer_cfg, dist
        self.autocast, self.to_device = autocast, to_device

    def should_run(self, step: int) -> bool:
        """Every trainer.eval_interval steps (0: never) and after the last step."""
        return step == self.t.max_steps or (self.t.eval_interval > 0 and step % self.t.eval_interval == 0)

    @property
    def eval_sequence(self) -> str:
        """Which weights evaluation sees: the optimizer's `eval_sequence` (SNOO: "slow"; GPA,
        Schedule-Free: "x"), "params" for optimizers without one."""
        return getattr(self.optimizer, "eval_sequence", "params")

    @contextmanager
    def weights(self) -> Iterator[None]:
        """The optimizer's evaluation point (`eval_parameters()`) for the duration of an
        evaluation; plain parameters for AdamW.

        The optimizers swap weights in the sharded parameters. FSDP2 keeps some groups gathered
        after a forward with no backward (the root and the last layer: reshard_after_forward=False),
        and a later forward would reuse those gathered copies: resharding on both sides of the
        swap keeps the slow weights out of training and the fast ones out of evaluation."""
        self.reshard()
        swap = getattr(self.optimizer, "eval_parameters", None)
        with swap() if swap is not None else nullcontext():
            try:
                yield
            finally:
                self.reshard()

    def reshard(self) -> None:
        for module in all_modules(self.model):
            if isinstance(module, FSDPModule):
                module.reshard()

    @torch.no_grad()
    def weight_norm(self) -> float:
        """Global L2 norm of the evaluation weights (SNOO's slow weights, GPA's x, AdamW's
        parameters): each rank's squared local norms, each element counted once
        (`replication_factor`), summed in one all-reduce. Call on every rank, at log steps.
        Training goes on exactly as without it: where the swap back is not bitwise
        (Schedule-Free), the parameters are restored from a copy."""
        params = list(self.model.parameters())
        exact = getattr(self.optimizer, "eval_swap_restores_bitwise", True)
        backup = None if exact else [local(p).detach().clone() for p in params]
        with self.weights():
            norms = torch._foreach_norm([local(p).detach().float() for p in params])
            sq = torch.stack([n.double().square() / replication_factor(p, self.dist.pp) for n, p in zip(norms, params)]).sum()
        if backup is not None:
            torch._foreach_copy_([local(p).detach() for p in params], backup)
        (total,) = all_reduce_sum([sq.item()], self.dist.device)
        return total**0.5

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss per token over all ranks, at the evaluation weights."""
        t = self.t
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        tokens = 0
        # Same sequences as eval_batches x batch_size, in training-sized micro-batches.
        batches = eval_batches(
            self.val_set,
            batch_size=t.batch_size // t.grad_accum,
            num_batches=t.eval_batches * t.grad_accum,
            rank=self.dist.dp_rank,
            world_size=self.dist.dp_size,
        )
        with self.weights():
            for batch in batches:
                batch = self.to_device(batch)
                if self.pipeline is not None:  # a forward-only schedule; each stage holds the sum
                    loss_sum += self.pipeline.evaluate(batch)
                else:
                    with self.autocast:
                        loss_sum += causal_lm_loss(self.model, batch, reduction="sum")
                tokens += batch["labels"].numel()
        total, count = all_reduce_sum([loss_sum.item(), float(tokens)], self.dist.device)
        return total / count if count else float("nan")  # nan: no held-out data (val_fraction=0)
