"""The memory plan of one rank: states from the real layout (plan/layout.py), activations from
the formula (plan/activations.py), and the peak over the moments of a step.

A step has three moments where memory peaks; the plan takes the largest:

    loss      the forward has ended, the loss's backward runs: every saved activation, the
              cross-entropy's three fp32 [b s V] tensors, FSDP's root group (embedding, final
              norm, head) and last layer unsharded in the compute dtype
    backward  the last layer's backward (saved activations, plus the layer being recomputed
              under checkpointing) or the first layer's (every gradient made, that layer's
              activations left), whichever is larger; either way the root, this layer and the
              prefetched one unsharded, this layer's unsharded gradient and its fp32
              reduce-scatter buffer, the root's unsharded gradient (reduce-scattered only when
              backward ends), and the gradients passing through the layer
    optimizer the gradients exist (set to None again after the step), plus one temporary
              copy of this rank's shard (foreach AdamW's sqrt(v), SNOO's pseudo-gradient;
              DiLoCo adds the all-reduce buffer)

Always present: parameters (fp32 master weights, FSDP2's padded shard), inner and outer optimizer
state and, with trainer.nonfinite=skip, SkipMask's snapshot of parameters and state. With
trainer.grad_accum > 1 the gradients are also held through the later micro-batches.
Outer state with optim.outer_state_device=cpu (and its snapshot) is host memory, reported apart.
Under pipeline parallelism (parallel.pp > 1) the states are the rank's stage share and the loss
and backward moments are plan/pipeline.py's (the stage stays gathered, gradients accumulate
unsharded, several micro-batches are in flight); the optimizer moment is the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from snoo_train.config import Config, is_diloco
from snoo_train.plan.activations import (
    backward_transient_bytes,
    layer_bytes,
    loss_bytes,
    stored_activation_bytes,
)
from snoo_train.plan.layout import LocalParam, local_params, unsharded_numel
from snoo_train.plan.pipeline import (
    RankShare,
    check_plannable,
    pipeline_ranks,
    pipeline_step,
    rank_share,
)

FP32 = 4
STEP_SCALAR = 4  # AdamW's and Muon's per-parameter `step`, a 0-d fp32 tensor
# Per-parameter state tensors (in units of the parameter's local shard) of each optimizer.
OUTER_COPIES = {"none": 0, "snoo": 2, "gpa": 1, "ema_nesterov": 1}


@dataclass
class MemoryPlan:
    """Bytes on one rank (`rank`, the largest by default). Device memory unless named host."""

    world_size: int
    rank: int
    micro_batch: int  # sequences per forward on this rank
    compute_bytes: int  # 2 (bf16) or 4 (fp32)
    param_bytes: int
    grad_bytes: int
    inner_state_bytes: int
    outer_state_bytes: int
    outer_state_host_bytes: int
    snapshot_bytes: int
    activation_bytes: int  # saved activations (+ one recomputed layer under checkpointing)
    activation_bytes_with_ac: int
    activation_bytes_without_ac: int
    loss_bytes: int
    fsdp_buffer_bytes: int  # unsharded parameters and gradients in flight (the backward moment)
    pipeline_buffer_bytes: int  # parallel.pp: torch's receive buffers, one per micro-batch and input
    optimizer_temp_bytes: int
    loss_moment_bytes: int
    backward_moment_bytes: int
    optimizer_moment_bytes: int
    peak_bytes: int
    peak_bytes_with_ac: int
    peak_bytes_without_ac: int
    # Pipeline parallelism (plan/pipeline.py; 0 and empty without): this rank's pipeline rank, the
    # stages and decoder layers it holds, its micro-batches in flight at the first backward.
    pp_rank: int = 0
    stages: list[int] = dataclasses.field(default_factory=list)
    layers: list[int] = dataclasses.field(default_factory=list)
    chunks_in_flight: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compute_bytes(cfg: Config) -> int:
    """Bytes per element of the compute dtype, as trainer.resolve_dtype picks it (auto: bf16,
    the planner assumes an accelerator unless trainer.device=cpu)."""
    mp, device = cfg.trainer.mixed_precision, cfg.trainer.device
    return 2 if mp == "bf16" or (mp == "auto" and device != "cpu") else 4


def _inner_state_bytes(cfg: Config, params: list[LocalParam], muon_names: set[str]) -> int:
    o = cfg.optim
    total = 0
    for p in params:
        copies = 1 if o.inner == "muon" and p.name in muon_names else 2
        scalar = 0 if o.inner == "schedule_free_adamw" else STEP_SCALAR
        total += copies * FP32 * p.local_numel + scalar
    return total


def _muon_names(model: Any, cfg: Config) -> set[str]:
    if cfg.optim.inner != "muon":
        return set()
    from snoo_train.optim.muon import categorize_parameters

    wanted = set(cfg.optim.muon_categories)
    return {name for name, category in categorize_parameters(model).items() if category in wanted}


def _states(cfg: Config, model: Any, params: list[LocalParam]) -> dict[str, int]:
    """Parameters, gradients, optimizer state and the skip snapshot of this rank."""
    local = FP32 * sum(p.local_numel for p in params)
    padded = FP32 * sum(p.padded_numel for p in params)
    inner = _inner_state_bytes(cfg, params, _muon_names(model, cfg))
    outer = OUTER_COPIES[cfg.optim.outer] * local
    if cfg.optim.outer == "snoo" and is_diloco(cfg) and cfg.optim.error_feedback:
        outer += local  # the error-feedback residual (snoo_residual), a third copy
    on_host = cfg.optim.outer == "snoo" and cfg.optim.outer_state_device == "cpu"
    skip = cfg.trainer.nonfinite == "skip"
    scalars = STEP_SCALAR * len(params) if cfg.optim.inner != "schedule_free_adamw" else 0
    # SkipMask copies the local shards of parameters and of every state tensor but the step
    # counters; SNOO guards its own outer state (SNOO.guarded_state_keys), the others' is copied.
    snapshot = local + inner - scalars + (0 if cfg.optim.outer == "snoo" else outer) if skip else 0
    return {
        "param_bytes": padded,
        "grad_bytes": padded,
        "inner_state_bytes": inner,
        "outer_state_bytes": 0 if on_host else outer,
        "outer_state_host_bytes": outer if on_host else 0,
        "snapshot_bytes": snapshot,
        "_local": local,
    }


def _fsdp_bytes(cfg: Config, params: list[LocalParam], world_size: int, dt: int) -> tuple[int, int, int, bool]:
    """(root group numel, largest layer numel, the backward moment's in-flight bytes, whether
    FSDP shards at all)."""
    p, moe = cfg.parallel, cfg.model.family == "moe"
    root = unsharded_numel(params, None, tp=p.tp, ep=p.ep, moe=moe)
    layer = max(unsharded_numel(params, i, tp=p.tp, ep=p.ep, moe=moe) for i in range(cfg.model.num_layers))
    if world_size == 1:
        # no FSDP: parameters are used in place; the root's and the last layer's fp32 gradients
        return root, layer, FP32 * (root + layer), False
    # root, this layer and the prefetched one unsharded; this layer's gradient in dt, its fp32
    # reduce-scatter input; the root's unsharded gradient (its backward ran first)
    backward = dt * (root + 2 * layer) + (dt + FP32) * layer + dt * root
    return root, layer, backward, True


def _optimizer_temp_bytes(cfg: Config, local: int) -> int:
    """One temporary copy of this rank's shard on the device (foreach AdamW's sqrt(v), Muon's
    update, SNOO's pseudo-gradient), plus DiLoCo's flat all-reduce buffer."""
    o = cfg.optim
    if o.outer == "snoo" and is_diloco(cfg) and o.outer_quant != "none":
        # optim/outer_quant.py, in fp32: s, the flat buffer, the sum, a decoded message (codes,
        # then values), plus s + e and the new residual with error feedback; in bytes: this
        # replica's message and the R gathered ones (codes, and a 4-byte scale per 128 values)
        from snoo_train.optim.outer_quant import CODECS

        bits = CODECS[o.outer_quant][1]
        message = local * bits // 32 + (0 if o.outer_quant == "bf16" else local // 128)
        return (5 + 2 * o.error_feedback) * local + (cfg.parallel.replicas + 1) * message
    if o.outer == "snoo" and is_diloco(cfg):
        reduce = local // 2 if o.outer_reduce_dtype == "bf16" else local
        return local + reduce
    return local


def build_meta_model(cfg: Config) -> Any:
    """The model the trainer would build, on the meta device (no memory). The vocabulary is
    model.vocab_size, or the tokenizer's (data.tokenizer) when that is unset."""
    from snoo_train.models import build_model

    vocab = cfg.model.vocab_size
    if vocab is None:
        from snoo_train.data import resolve_tokenizer

        vocab = resolve_tokenizer(cfg.data).vocab_size
    return build_model(cfg.model, vocab, seed=cfg.trainer.seed, device="meta")


def _activations(cfg: Config, model: Any, world_size: int, dt: int) -> dict[str, int]:
    """Saved activations with and without checkpointing, the recomputed layer, the loss."""
    m, t, p = cfg.model, cfg.trainer, cfg.parallel
    b = t.batch_size // (world_size // p.tp * t.grad_accum)
    s = cfg.data.seq_len
    autocast = dt == 2 and world_size == 1
    act_dt = FP32 if autocast else dt
    # autocast keeps a bf16 copy of every matmul weight (the embedding lookup is not one)
    cache = 2 * sum(q.numel() for q in model.parameters() if q.ndim >= 2) if autocast else 0
    vocab = model.config.vocab_size // (p.tp if p.tp > 1 and p.loss_parallel else 1)
    return {
        "micro_batch": b,
        "stored_ac": stored_activation_bytes(m, b, s, act_dt, tp=p.tp, checkpointing=True) + cache,
        "stored_no_ac": stored_activation_bytes(m, b, s, act_dt, tp=p.tp, checkpointing=False) + cache,
        "layer": layer_bytes(m, b, s, act_dt, p.tp),
        "transient": backward_transient_bytes(m, b, s, act_dt, p.tp),
        "loss": loss_bytes(b, s, vocab),
    }


def _moments(cfg, states, acts, fsdp, dt, checkpointing: bool) -> tuple[int, int]:
    """(loss, backward) moments of an unpipelined step with or without checkpointing."""
    root, layer, backward_buffers, sharded = fsdp
    static = sum(v for k, v in states.items() if k in _DEVICE_STATE)
    held_grads = states["grad_bytes"] if cfg.trainer.grad_accum > 1 else 0
    stored = acts["stored_ac" if checkpointing else "stored_no_ac"]
    unsharded = dt * (root + layer) if sharded else 0  # FSDP: the root and the last layer
    loss = static + held_grads + stored + acts["loss"] + unsharded
    in_flight = backward_buffers + acts["transient"]
    # The last layer's backward (every activation saved, one layer recomputed under
    # checkpointing) or the first layer's (every gradient made, one layer's activations left).
    first = static + held_grads + stored + (acts["layer"] if checkpointing else 0) + in_flight
    last = static + states["grad_bytes"] + acts["layer"] + in_flight
    return loss, max(first, last)


_DEVICE_STATE = ("param_bytes", "inner_state_bytes", "outer_state_bytes", "snapshot_bytes")


def _step(cfg: Config, model: Any, params: list[LocalParam], share: RankShare | None, states: dict[str, int],
          world_size: int, dt: int, checkpointing: bool) -> dict[str, int]:  # fmt: skip
    """The three moments of a step (states included) and what the plan reports of them, with or
    without checkpointing; `share`: the pipeline rank's (plan/pipeline.py), None without pp."""
    p = cfg.parallel
    static = sum(v for k, v in states.items() if k in _DEVICE_STATE)
    optimizer = static + states["grad_bytes"] + _optimizer_temp_bytes(cfg, states["_local"])
    if share is not None:
        vocab = model.config.vocab_size // (p.tp if p.tp > 1 and p.loss_parallel else 1)
        step = pipeline_step(cfg, share, params, world_size=world_size, vocab=vocab, dt=dt, checkpointing=checkpointing)
        step["loss_moment"] += static if share.last else 0  # only the last stage computes a loss
        step["backward_moment"] += static
        return step | {"optimizer_moment": optimizer + step["buffers"]}
    acts = _activations(cfg, model, world_size, dt)
    fsdp = _fsdp_bytes(cfg, params, world_size, dt)
    loss, backward = _moments(cfg, states, acts, fsdp, dt, checkpointing)
    return {
        "micro_batch": acts["micro_batch"], "chunks_in_flight": 0, "buffers": 0,
        "activations": acts["stored_ac"] + acts["layer"] if checkpointing else acts["stored_no_ac"],
        "loss": acts["loss"], "fsdp": fsdp[2] if fsdp[3] else 0,
        "loss_moment": loss, "backward_moment": backward, "optimizer_moment": optimizer,
    }  # fmt: skip


def _peak(step: dict[str, int]) -> int:
    return max(step["loss_moment"], step["backward_moment"], step["optimizer_moment"])


def _plan(cfg: Config, model: Any, world_size: int, rank: int) -> MemoryPlan:
    """The memory plan of `rank` (the config validated, the meta model built)."""
    p = cfg.parallel
    params = local_params(model, world_size=world_size, rank=rank, replicas=p.replicas, tp=p.tp, ep=p.ep, pp=p.pp)
    share = rank_share(cfg, world_size, rank) if p.pp > 1 else None
    if share is not None:
        params = [q for q in params if share.holds(q)]
    dt = compute_bytes(cfg)
    states = _states(cfg, model, params)
    on, off = (_step(cfg, model, params, share, states, world_size, dt, c) for c in (True, False))
    step = on if cfg.trainer.activation_checkpointing else off
    public = {k: v for k, v in states.items() if not k.startswith("_")}
    return MemoryPlan(
        world_size=world_size, rank=rank, micro_batch=step["micro_batch"], compute_bytes=dt, **public,
        activation_bytes=step["activations"],
        activation_bytes_with_ac=on["activations"], activation_bytes_without_ac=off["activations"],
        loss_bytes=step["loss"], fsdp_buffer_bytes=step["fsdp"], pipeline_buffer_bytes=step["buffers"],
        optimizer_temp_bytes=_optimizer_temp_bytes(cfg, states["_local"]),
        loss_moment_bytes=step["loss_moment"], backward_moment_bytes=step["backward_moment"],
        optimizer_moment_bytes=step["optimizer_moment"],
        peak_bytes=_peak(step), peak_bytes_with_ac=_peak(on), peak_bytes_without_ac=_peak(off),
        pp_rank=share.pp_rank if share else 0, stages=list(share.stages) if share else [],
        layers=sorted(i for held in share.layers for i in held) if share else [],
        chunks_in_flight=step["chunks_in_flight"],
    )  # fmt: skip


def _prepare(cfg: Config, world_size: int) -> Any:
    """Validate the config as the trainer does (ConfigError naming the key); the meta model."""
    from snoo_train.config import validate_config

    validate_config(cfg, world_size=world_size)
    if cfg.parallel.pp > 1:
        check_plannable(cfg)
    return build_meta_model(cfg)


def estimate(cfg: Config, world_size: int, rank: int | None = None) -> MemoryPlan:
    """The memory plan of `rank` when `cfg` trains on `world_size` ranks; by default the rank with
    the largest peak: rank 0 (whose shards are the largest) or, under parallel.pp, the largest of
    `estimate_stages`. Validates the config as the trainer does (ConfigError naming the key)."""
    model = _prepare(cfg, world_size)
    if rank is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside the world of {world_size} ranks")
        return _plan(cfg, model, world_size, rank)
    if cfg.parallel.pp == 1:
        return _plan(cfg, model, world_size, 0)
    return max(_stage_plans(cfg, model, world_size), key=lambda plan: plan.peak_bytes)


def _stage_plans(cfg: Config, model: Any, world_size: int) -> list[MemoryPlan]:
    p = cfg.parallel
    return [_plan(cfg, model, world_size, r) for r in pipeline_ranks(world_size, p.replicas, p.pp)]


def estimate_stages(cfg: Config, world_size: int) -> list[MemoryPlan]:
    """Under parallel.pp: one plan per pipeline rank, pipeline rank 0 first, each for the first
    rank of its stage (the largest shards). Without pp: rank 0's plan alone."""
    model = _prepare(cfg, world_size)
    if cfg.parallel.pp == 1:
        return [_plan(cfg, model, world_size, 0)]
    return _stage_plans(cfg, model, world_size)
