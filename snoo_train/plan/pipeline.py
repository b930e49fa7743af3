"""The memory plan of a pipeline rank (parallel.pp > 1): the parameters it holds, the
micro-batches it keeps in flight, and the moments of its step.

A pipeline rank holds its stages' share (models/pipeline.py: `split_layers`, `stages_of_rank`):
each stage's decoder layers, the embedding with stage 0, the final norm and the head with the
last stage, each sharded by FSDP over the S = world / (replicas x pp x tp) ranks of its stage
(plan/layout.py), tensor parallelism inside. Against an unpipelined step (trainer/pipeline.py
under torch.distributed.pipelining 2.13), per pipeline rank of N unsharded (tp-local) parameters:

* parameters stay gathered: the trainer's stages keep every layer unsharded from the first
  micro-batch's forward to the step's reduce (models.parallelize(pipeline_stage=True):
  reshard_after_forward=False; the schedule turns reshard_after_backward off until then): dt N
  (an upper bound with more than 3 stages per rank, of which torch's runtime reshards the idle);
* gradients are reduce-scattered once per step, after the last backward: until then FSDP adds
  each micro-batch's unsharded gradient into an fp32 one (its reduce dtype): 4 N from the first
  backward on, plus one group's fresh gradient in dt before it is added;
* activations: a micro-batch is b = trainer.batch_size / data-parallel ranks / micro-batches
  sequences (data-parallel ranks = world / (tp x pp); config.pipeline_microbatches). One a stage
  has run forward on but not yet backward keeps its saved tensors and what torch's stage holds
  for it (activations.pipeline_chunk_bytes); on the last stage also the logits (dt) and
  log_softmax's fp32 output, (4 + dt) b s V (V / tp with parallel.loss_parallel);
* torch's stages keep a receive buffer per micro-batch for each input they receive (activations
  on a later stage, gradients on an earlier one; activations.pipeline_buffer_bytes), at every
  moment from the first step on.

Micro-batches in flight on pipeline rank r of P, M micro-batches, v stages per rank (`in_flight`,
read off torch's schedules; a chunk is one stage's micro-batch):

    GPipe            M at the first backward (every forward runs first), M - 1 at later ones
    1F1B             w = min(M, P - r), torch's warm-up forwards, at the first backward;
                     min(w, M - 1) at later ones (one forward before each backward)
    Interleaved1F1B  min(W + 1, M v) chunks with W = min((v - 1) R + 2 (P - 1 - r), M v), torch's
                     warm-up, R = M / max(1, M // P) micro-batches per round; taken at every
                     backward (an upper bound), each chunk at the size of the rank's largest
                     stage but the last

The last stage keeps 1 micro-batch in flight under 1F1B and Interleaved1F1B, all under GPipe.
The zero-bubble schedules are refused (`check_plannable`): between a micro-batch's input pass and
its weight pass torch keeps its whole graph (retain_graph; what checkpointing then keeps of the
recomputed layers was not measured) and the gradients at the weights' inputs, for up to P
micro-batches (2P - 1 under ZBV; counted off torch's orders): this planner does not count that.

Moments (memory.py takes the largest, with its optimizer moment: sharded gradients and the
step's temporaries once the reduce has freed what was gathered):

    loss      last stage, a micro-batch's loss backward starts: the chunks in flight, their logits,
              the current one's two fp32 [b s V] gradients; with the accumulated gradients from
              the second backward on (the first backward has none yet, but the most in flight)
    backward  the first backward (the most chunks in flight, no gradient yet) or a later one
              (the later count, every accumulated gradient), each with one layer's gradients
              passing through, one group's fresh gradient and, under checkpointing, one layer
              recomputed; or the reduce after the last backward (every accumulated gradient and
              one group's fp32 reduce-scatter input)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snoo_train.config import ConfigError, pipeline_microbatches, pipeline_stages_per_rank
from snoo_train.models.pipeline import split_layers, stages_of_rank
from snoo_train.plan.activations import (
    backward_transient_bytes,
    layer_bytes,
    pipeline_buffer_bytes,
    pipeline_chunk_bytes,
)
from snoo_train.plan.layout import LocalParam, unsharded_numel

FP32 = 4
UNMODELLED_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble")


@dataclass(frozen=True)
class RankShare:
    """What one pipeline rank holds: its stages, their decoder layers, the root modules."""

    pp_rank: int
    stages: list[int]
    layers: list[list[int]]  # each held stage's decoder layers
    first: bool  # holds stage 0: the embedding
    last: bool  # holds the last stage: the final norm and the head

    def holds(self, p: LocalParam) -> bool:
        if p.layer is not None:
            return any(p.layer in held for held in self.layers)
        return self.first if p.name.endswith("embed_tokens.weight") else self.last


@dataclass(frozen=True)
class InFlight:
    """Chunks in flight at a rank's first backward and, at most, at a later one; `last_*`: of
    those, chunks of the last stage."""

    first: int
    later: int
    last_first: int
    last_later: int


def check_plannable(cfg: Any) -> None:
    """ConfigError naming the key for a pipeline this planner cannot count honestly, and for a
    micro-batch count torch's interleaved schedules refuse (the trainer's error, earlier)."""
    p = cfg.parallel
    if p.pp_schedule in UNMODELLED_SCHEDULES:
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule}: the memory planner does not model the zero-bubble schedules "
            "(between a micro-batch's input and weight passes torch keeps its whole graph, for up to 2 x parallel.pp "
            "micro-batches at once); plan 1F1B, GPipe or Interleaved1F1B"
        )
    m = pipeline_microbatches(p)
    if pipeline_stages_per_rank(p) > 1 and m % max(1, m // p.pp):
        raise ConfigError(
            f"parallel.pp_microbatches={m}: parallel.pp_schedule={p.pp_schedule} needs a multiple of its "
            f"rounds, max(1, micro-batches // parallel.pp) = {max(1, m // p.pp)}"
        )


def pipeline_ranks(world_size: int, replicas: int, pp: int) -> list[int]:
    """One rank per pipeline rank: the first of its stage's ranks in replica 0 (shard 0, tp 0,
    whose shards are the largest); rank = ((replica x pp + pp_rank) x shard + shard_rank) x tp + tp_rank."""
    per_stage = world_size // (replicas * pp)
    return [q * per_stage for q in range(pp)]


def rank_share(cfg: Any, world_size: int, rank: int) -> RankShare:
    """The stages `rank` holds, as the trainer splits the model (DistInfo.pp_rank, split_model)."""
    p = cfg.parallel
    per_replica = world_size // p.replicas
    pp_rank = (rank % per_replica) // (per_replica // p.pp)
    v = pipeline_stages_per_rank(p)
    layers = split_layers(cfg.model.num_layers, p.pp * v, p.pp_layers_per_stage)
    stages = stages_of_rank(pp_rank, p.pp, v, p.pp_schedule)
    return RankShare(pp_rank, stages, [layers[s] for s in stages], 0 in stages, p.pp * v - 1 in stages)


def in_flight(schedule: str, pp: int, pp_rank: int, microbatches: int, stages_per_rank: int, last: bool) -> InFlight:
    """Chunks in flight on pipeline rank `pp_rank` (module docstring); `last`: it holds the last stage."""
    m, v = microbatches, stages_per_rank
    if schedule == "GPipe":
        first, later = m, m - 1
    elif schedule == "1F1B":
        first = min(m, pp - pp_rank)
        later = min(first, m - 1)
    elif schedule == "Interleaved1F1B":
        per_round = m // max(1, m // pp)
        warmup = min((v - 1) * per_round + 2 * (pp - 1 - pp_rank), m * v)
        first = later = min(warmup + 1, m * v)
    else:
        raise ConfigError(f"parallel.pp_schedule={schedule}: not modelled by the memory planner")
    if not last:
        return InFlight(first, later, 0, 0)
    if v == 1:
        return InFlight(first, later, first, later)
    return InFlight(first, later, 1, 1)  # interleaved: the last stage's backward follows its forward


def _chunk_bytes(cfg: Any, share: RankShare, b: int, dt: int, checkpointing: bool) -> tuple[int, int]:
    """(a chunk of the rank's largest stage but the last, a chunk of the last stage, logits aside)."""
    m, s, tp = cfg.model, cfg.data.seq_len, cfg.parallel.tp
    last_stage = max(share.stages) if share.last else None
    other, last = 0, 0
    for stage, layers in zip(share.stages, share.layers):
        n = pipeline_chunk_bytes(m, len(layers), b, s, dt, tp, checkpointing=checkpointing,
                                 first=stage == 0, last=stage == last_stage)  # fmt: skip
        if stage == last_stage:
            last = n
        else:
            other = max(other, n)
    return other, last


def pipeline_step(cfg: Any, share: RankShare, params: list[LocalParam], *, world_size: int, vocab: int, dt: int,
                  checkpointing: bool) -> dict[str, int]:  # fmt: skip
    """Bytes of one pipeline rank's step beyond its states (module docstring): the loss and backward
    moments, and what the plan reports of them. `vocab`: the logits' width on this rank."""
    p, m, s = cfg.parallel, cfg.model, cfg.data.seq_len
    micro = pipeline_microbatches(p)
    b = cfg.trainer.batch_size // (world_size // (p.tp * p.pp)) // micro
    k = in_flight(p.pp_schedule, p.pp, share.pp_rank, micro, pipeline_stages_per_rank(p), share.last)
    other, last = _chunk_bytes(cfg, share, b, dt, checkpointing)
    logits = (4 + dt) * b * s * vocab  # the last stage's output in dt and log_softmax's fp32 output

    def held(n: int, n_last: int, with_logits: bool = True) -> int:
        return (n - n_last) * other + n_last * (last + (logits if with_logits else 0))

    moe = m.family == "moe"
    held_layers = sorted({i for layers in share.layers for i in layers})
    groups = [unsharded_numel(params, i, tp=p.tp, ep=p.ep, moe=moe) for i in [None, *held_layers]]
    gathered, grads, group = dt * sum(groups), FP32 * sum(groups), max(groups)
    recompute = layer_bytes(m, b, s, dt, p.tp) if checkpointing else 0
    transient = backward_transient_bytes(m, b, s, dt, p.tp) + dt * group + recompute
    first, later = held(k.first, k.last_first), grads + held(k.later, k.last_later)
    ce = 2 * FP32 * b * s * vocab  # the current micro-batch's log_softmax gradient and its input's
    total = p.pp * pipeline_stages_per_rank(p)
    receives = sum(stage > 0 for stage in share.stages) + sum(stage < total - 1 for stage in share.stages)
    buffers = pipeline_buffer_bytes(m, b, s, dt, p.tp, microbatches=micro, receives=receives)
    return {
        "micro_batch": b,
        "chunks_in_flight": k.first,
        "activations": max(held(k.first, k.last_first, False), held(k.later, k.last_later, False)) + recompute,
        "loss": (logits * k.last_first + ce) if share.last else 0,
        "fsdp": gathered + grads + dt * group,
        "buffers": buffers,  # every moment's, the optimizer's too
        "loss_moment": buffers + gathered + max(first, later) + ce if share.last else 0,
        "backward_moment": buffers + gathered + max(first + transient, later + transient, grads + FP32 * group),
    }
