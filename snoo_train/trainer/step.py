"""One optimizer step: micro-batches -> loss -> backward -> clip -> optimizer step -> schedule
(the policy for a step whose loss or gradient norm is not finite: nonfinite.py).

Nothing here waits for the device: the loss, the gradient norm and the finite check stay
device tensors, and the non-finite policy is applied on the device (`NonFinitePolicy`,
`SkipMask`). The loop reads them at log steps and before checkpoints (`NonFinitePolicy.check`),
so on a GPU the host can queue the next steps while the device works on this one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from snoo_train.dist import all_reduce_max, in_process_group
from snoo_train.models import RouterStats, clip_grads_with_norm, grad_norm
from snoo_train.models.pipeline import all_modules
from snoo_train.trainer.nonfinite import NonFinitePolicy, SkipMask


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
    with causal_attention_without_mask(model):
        outputs = model(input_ids=batch["input_ids"], use_cache=False, **extra)
    logits = outputs.logits
    # Tensor parallel with parallel.loss_parallel: logits sharded over the vocabulary (a DTensor).
    # The cross-entropy runs on the shards (torch's loss_parallel: a max and a sum over the tp
    # ranks instead of a gather of the logits) and its backward must run under the same context
    # (StepRunner.run). The result is replicated over the tp ranks: its local value is the loss.
    sharded = isinstance(logits, DTensor)
    with loss_parallel() if sharded else nullcontext():
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            batch["labels"].reshape(-1),
            reduction=reduction,
        )
    if sharded:
        loss = loss.to_local()
    return loss + router.loss(outputs) if router is not None else loss


# transformers' SDPA attention under a name that has no mask function registered, so that
# transformers builds no mask for it (see causal_attention_without_mask).
UNMASKED_SDPA = "snoo_sdpa_unmasked"
AttentionInterface.register(UNMASKED_SDPA, sdpa_attention_forward)


@contextmanager
def causal_attention_without_mask(model: nn.Module) -> Iterator[None]:
    """Inside, a model on transformers' "sdpa" attention builds no attention mask.

    Our windows are packed and never padded, so their mask is the causal one, which SDPA applies
    itself (is_causal=True) when it gets no mask; that is what "sdpa" ends up doing too. But
    "sdpa" first inspects the position ids for packed sequences, a host read of a device tensor
    (`.all()` in an `if`): a GPU sync on every forward. The same SDPA function under a name with
    no mask function skips that: the same kernel and numbers, no sync. Only around our own
    forwards: a user's padded batch still gets its mask from the model as built. Activation
    checkpointing recomputes with "sdpa" and the mask it was given (None): the same call."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    config._attn_implementation = UNMASKED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def clip_grad_norm(params, max_norm: float, combine: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Global L2 norm of all gradients, then clip to max_norm (0 disables clipping); returns the
    norm as a device scalar, never read on the host here.

    Under FSDP2 the gradients are DTensor shards and the norm comes back as a DTensor holding
    a partial sum; full_tensor() reduces it over ranks (a collective, not a host sync), so every
    rank clips with the same global norm. The clip factor min(1, max_norm / norm) is computed on
    the device: a non-finite norm makes the gradients non-finite, and the step's finite check
    (NonFinitePolicy.record) catches it. `combine` turns this rank's norm into the whole model's
    (pipeline parallelism: each stage holds its own parameters, trainer/pipeline.py)."""
    params = [p for p in params if p.grad is not None]
    # Under expert parallelism the gradients live on two meshes: grad_norm reduces each first.
    norm = grad_norm(params)
    if combine is not None:
        norm = combine(norm)
    if max_norm > 0:
        clip_grads_with_norm(params, max_norm, norm)
    return norm


def mean_over_ranks(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The mean of a device scalar over the ranks of `group` (None: all ranks), in float64,
    still on the device (one all-reduce, no host read). float64 and sum-then-divide: the same
    numbers the loop logged when it reduced host floats."""
    value = value.detach().to(torch.float64)
    if in_process_group() and dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)  # gloo has no AVG
        value /= dist.get_world_size(group)
    return value


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
        sharded_logits: bool = False,
        replica_group: dist.ProcessGroup | None = None,
        pipeline: Any = None,
    ):
        """`replica_group` (DiLoCo): the ranks of this replica, over which the loss is averaged
        every step; replicas meet only at outer steps (SNOO's all-reduce carries the non-finite
        flag, `guard_outer_step`) and at log steps (the policy and the loss window merge there)."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        # Logits sharded over the vocabulary (tensor parallel): backward under torch's context.
        self.backward_context = loss_parallel if sharded_logits else nullcontext
        self.device, self.autocast, self.router = device, autocast, router
        self.grad_clip, self.policy = grad_clip, policy
        # Runs after every optimizer step (the MoE routing-bias update).
        self.after_update = after_update
        # stop applies every step (a bad one is caught at the next check, before any save).
        self.mask = SkipMask(optimizer) if policy.t.nonfinite == "skip" else None
        self.replica_group = replica_group
        # Pipeline parallelism (trainer/pipeline.py): the schedule runs forward and backward.
        self.pipeline = pipeline
        # DiLoCo: every replica takes an outer step or none does (SNOO.guard_outer_step).
        self.guard_outer = replica_group is not None and hasattr(optimizer, "guard_outer_step")
        # Every FSDP module, expert groups on their own meshes included (accumulate_across_replicas).
        self.fsdp_modules = [m for m in all_modules(model) if isinstance(m, FSDPModule)]
        self.defer_all_reduce = True  # False: all-reduce on every micro-batch (the tests' reference)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def run(
        self, step: int, micro_batches: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step; returns device scalars, none of them read here: (the loss averaged
        over ranks and micro-batches, float64; the global grad norm; whether the step was
        skipped as non-finite)."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        if self.pipeline is not None:  # one batch (grad_accum=1): the schedule cuts its micro-batches
            loss_sum = self.pipeline.train(self.to_device(micro_batches[0]))
            micro_batches = []
        for i, batch in enumerate(micro_batches):
            if len(micro_batches) > 1 and self.defer_all_reduce:
                self.accumulate_across_replicas(last=i == len(micro_batches) - 1)
            with self.autocast:
                # Equal-size micro-batches of packed windows: scaling each mean by 1/n makes the
                # accumulated gradient the gradient of the mean over all of them.
                loss = causal_lm_loss(self.model, self.to_device(batch), router=self.router) / len(micro_batches)
            with self.backward_context():
                loss.backward()
            loss_sum += loss.detach()

        loss = mean_over_ranks(loss_sum, self.replica_group)
        combine = None if self.pipeline is None else self.pipeline.grad_norm
        grad_norm = clip_grad_norm(self.model.parameters(), self.grad_clip, combine)
        # Both are global over the ranks that train together (the loss is averaged over them,
        # the norm is their global norm: every rank, or one replica under DiLoCo), so those
        # ranks hold the same flag and mask the same steps.
        ok = self.policy.record(step, loss, grad_norm)
        if self.guard_outer and self.mask is None:  # under skip, SkipMask hands the wrapper its flag
            self.optimizer.guard_outer_step(self.policy.outer_step_flag(ok))
        taken = True
        if self.mask is None:
            self.optimizer.step()
        else:
            taken, ok = self.mask.step(ok, agreed=self._agreed, agree_on_host=self._agree_on_host)
            self.policy.record_skip(~ok)
        if self.after_update is not None:
            # Not masked: like the other host-side counters, the routing bias advances on a
            # skipped step (from finite expert counts).
            self.after_update()
        self.optimizer.zero_grad(set_to_none=True)
        if taken:
            self.scheduler.step()
        return loss, grad_norm, ~ok

    def accumulate_across_replicas(self, *, last: bool) -> None:
        """HSDP (a (replicate, shard) mesh): the coming backward all-reduces the gradients across
        replicas only on the last micro-batch. Every micro-batch is still reduce-scattered within
        the replica, so each rank keeps only its shard of the gradient (memory); FSDP adds the
        earlier micro-batches' shards to the last one's before its one all-reduce. Without a
        replicate dimension FSDP has no all-reduce and the flag changes nothing."""
        for module in self.fsdp_modules:
            module.set_requires_all_reduce(last, recurse=False)

    def _agreed(self, ok: torch.Tensor) -> torch.Tensor:
        """After the optimizer step: not applied either if this was an outer step that some
        replica's non-finite flag dropped (the same device flag on every replica)."""
        if self.guard_outer and self.optimizer.outer_step_ok is not None:
            return ok & self.optimizer.outer_step_ok
        return ok

    def _agree_on_host(self, ok: bool) -> bool:
        """Whether every replica's step is finite (a host value; only before the optimizer has
        its state): DiLoCo's replicas take their first step together or not at all."""
        if not self.guard_outer:
            return ok
        return all_reduce_max(0.0 if ok else 1.0) == 0.0
