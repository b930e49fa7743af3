"""The pipeline-parallel forward and backward: this rank's stages (models/pipeline.py) under a
schedule of torch.distributed.pipelining, and the reductions a step needs across stages.

Every rank of a pipeline calls `train(batch)` with the same batch (the pipeline shares one
data-parallel rank's batch); the first stage feeds the token ids, the last computes the loss
of each micro-batch. The schedule averages the micro-batches' gradients (scale_grads) and
defers FSDP's reduce-scatter to the last micro-batch. What a step decides from the whole model
is made the same on every stage here: the loss (held by the last stage) is summed over the pp
group with zeros elsewhere, and the gradient norm's square is summed over it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from snoo_train.config import ConfigError
from snoo_train.trainer.step import causal_attention_without_mask


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of one micro-batch (the labels are already shifted), as causal_lm_loss."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), reduction=reduction)
    return loss.to_local() if isinstance(loss, DTensor) else loss


class _Stage(PipelineStage):
    """torch's stage, minus the side effects of its shape inference: at the first step torch
    2.13 runs each stage once on placeholder data to learn what it sends. That forward must not
    reach the MoE tallies (balancing loss, expert loads), so they are held aside around it.
    (The override is of a private method: on a torch without it, nothing changes.)"""

    def _forward_metadata_inference(self, *args, **kwargs):
        module = self.submod
        loads = [(m, m.expert_load.clone()) for m in module.modules() if isinstance(getattr(m, "expert_load", None), torch.Tensor)]
        stats, module.router_stats = getattr(module, "router_stats", None), None
        try:
            return super()._forward_metadata_inference(*args, **kwargs)
        finally:
            module.router_stats, module.aux_loss = stats, None
            for m, load in loads:
                m.expert_load.copy_(load)


class Pipeline:
    def __init__(
        self,
        stages: list[nn.Module],
        stage_indices: list[int],
        *,
        num_stages: int,
        schedule: str,
        microbatches: int,
        group: dist.ProcessGroup,
        device: torch.device,
        hidden: tuple[int, int, torch.dtype],
        sharded_logits: bool = False,
    ):
        """`hidden`: (sequence length on this rank, hidden size, dtype) of what stages pass on."""
        self.modules = stages
        self.indices, self.num_stages, self.microbatches = stage_indices, num_stages, microbatches
        self.hidden = hidden
        # Which pp rank holds each stage: gathered once, for the forward-only pass.
        owners: list[list[int]] = [[] for _ in range(dist.get_world_size(group))]
        dist.all_gather_object(owners, list(stage_indices), group=group)
        self.owner = {stage: rank for rank, held in enumerate(owners) for stage in held}
        self.has_first, self.has_last = 0 in stage_indices, num_stages - 1 in stage_indices
        self.sharded_logits = sharded_logits
        self.group, self.device = group, device
        self.pp = dist.get_world_size(group)
        self.stages = [
            _Stage(module, index, num_stages, device, group=group)
            for module, index in zip(stages, stage_indices)
        ]
        cls = get_schedule_class(schedule)
        try:
            if issubclass(cls, PipelineScheduleMulti):
                self.schedule = cls(self.stages, n_microbatches=microbatches, loss_fn=_next_token_loss)
            else:
                self.schedule = cls(self.stages[0], n_microbatches=microbatches, loss_fn=_next_token_loss)
        except (ValueError, AssertionError) as e:  # torch's own size checks (e.g. micro-batches per rank)
            raise ConfigError(f"parallel.pp_schedule={schedule} with parallel.pp_microbatches={microbatches}: {e}") from None

    def _context(self) -> AbstractContextManager:
        stack = ExitStack()
        for module in self.modules:
            stack.enter_context(causal_attention_without_mask(module))
        # Logits sharded over the vocabulary: the loss and its backward run under torch's context.
        stack.enter_context(loss_parallel() if self.sharded_logits else nullcontext())
        return stack

    def train(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward of one step's batch through the schedule; the mean loss over its
        micro-batches on every stage (a device scalar, no host read)."""
        losses: list[torch.Tensor] = []
        args = (batch["input_ids"],) if self.has_first else ()
        target = batch["labels"] if self.has_last else None
        with self._context():
            self.schedule.step(*args, target=target, losses=losses if self.has_last else None, return_outputs=False)
        value = torch.stack([x.detach().float() for x in losses]).mean() if self.has_last else None
        value = torch.zeros((), device=self.device) if value is None else value
        for module in self.modules:  # MoE: each stage's balancing loss, logged with the loss as in one process
            if getattr(module, "aux_loss", None) is not None:
                value = value + module.aux_loss.float() / self.microbatches
                module.aux_loss = None
        return self.over_stages(value)

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward only, stage after stage (each stage runs every micro-batch, sending each on as
        it is done, so the next stage starts on the first): the loss summed over the batch's
        tokens, on every stage. Not the training schedule: torch 2.13's eval() of the V-shaped
        schedule asks for a backward that evaluation does not have."""
        ids, labels = batch["input_ids"].chunk(self.microbatches), batch["labels"].chunk(self.microbatches)
        me = dist.get_rank(self.group)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        local: list[torch.Tensor] = []  # outputs of the previous stage when it is this rank's too
        sends = []
        with self._context():
            for stage in range(self.num_stages):
                if self.owner[stage] != me:
                    continue
                module = self.modules[self.indices.index(stage)]
                prev = self.owner.get(stage - 1)
                produced: list[torch.Tensor] = []
                for m in range(self.microbatches):
                    if stage == 0:
                        x = ids[m]
                    elif prev == me:
                        x = local[m]
                    else:
                        x = torch.empty(len(ids[m]), *self.hidden[:2], dtype=self.hidden[2], device=self.device)
                        dist.recv(x, group=self.group, group_src=prev)
                    out = module(x)
                    if stage == self.num_stages - 1:
                        total += _next_token_loss(out, labels[m], reduction="sum").double()
                    elif self.owner[stage + 1] == me:
                        produced.append(out)
                    else:
                        sends.append(dist.isend(out.contiguous(), group=self.group, group_dst=self.owner[stage + 1]))
                local = produced
        for work in sends:
            work.wait()
        return self.over_stages(total)

    def over_stages(self, value: torch.Tensor) -> torch.Tensor:
        """The last stage's value on every stage: a sum over the pp group, zeros elsewhere."""
        value = value.detach().to(torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group)
        return value

    def grad_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The whole model's gradient norm from this stage's (each stage holds its own parameters)."""
        sq = norm.detach().to(self.device, torch.float32).square()
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.group)
        return sq.sqrt()
