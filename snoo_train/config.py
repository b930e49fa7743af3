"""Typed configuration tree for a training run.

Plain dataclasses, no Hydra import: `train.py` registers them in Hydra's ConfigStore as the
schema that every YAML file in `snoo_train/configs/` is merged into, so a misspelled key or a wrong type
fails at composition time, before any process group starts. `validate_config` then checks the
values that a type alone cannot (ranges, choices, divisibility) and names the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config value is out of range or inconsistent; the message names the key."""


# The model families models/build.py registers (it imports this module, so it cannot be read
# from there; tests/test_models.py checks the two agree).
MODEL_FAMILIES = ("llama", "moe")


# The vocabulary is padded to a multiple of this (models/decoder.py), so that tensor parallelism
# can split it over any power-of-two tp up to it.
VOCAB_MULTIPLE = 64


@dataclass
class ModelConfig:
    """A Llama-style decoder. `vocab_size=None` takes the tokenizer's size (padded to 64)."""

    name: str = "llama_tiny"
    family: str = "llama"  # llama (dense LlamaForCausalLM) | moe (Mixtral: Llama + MoE feed-forward)
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    vocab_size: Optional[int] = None
    # family=moe only (snoo_train/models/moe.py):
    num_experts: int = 0
    num_experts_per_tok: int = 2  # top-k experts per token
    moe_intermediate_size: Optional[int] = None  # one expert's width; None: intermediate_size
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss in the training loss
    experts_implementation: str = "auto"  # auto (grouped_mm) | grouped_mm | batched_mm | eager
    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the router's scores for
    # the top-k choice only, moved by this much towards balance after every optimizer step
    # (snoo_train/models/moe.py: update_router_bias); 0 turns it off.
    router_bias_update_rate: float = 0.0
    # Warm start (snoo_train/models/pretrained.py): a Hugging Face directory or hub id whose
    # config.json sets the shape and whose safetensors are the initial weights; null: seeded init.
    from_pretrained: Optional[str] = None


@dataclass
class OptimConfig:
    """Inner optimizer (`optim.lr` is the inner learning rate) plus the optional outer wrapper
    (SNOO, GPA or EMA-Nesterov; snoo_train/optim/)."""

    name: str = "adamw"
    inner: str = "adamw"  # adamw | muon | schedule_free_adamw (needs outer=none, lr_schedule=constant)
    lr: float = 3e-3  # AdamW's lr (with inner=muon: for the parameters Muon does not take)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # The AdamW kernel (inner=adamw, and Muon's AdamW part; snoo_train/optim/kernels.py):
    # auto (fused on accelerators, torch's default elsewhere) | fused | foreach | forloop
    implementation: str = "auto"
    outer: str = "none"  # none | snoo | gpa | ema_nesterov
    k: int = 20  # inner steps per outer step
    outer_lr: float = 0.7  # eta
    outer_momentum: float = 0.5  # mu
    nesterov: bool = True
    # outer=snoo with parallel.replicas > 1 (DiLoCo): dtype of the pseudo-gradient all-reduce
    outer_reduce_dtype: str = "fp32"  # fp32 | bf16 (half the bytes, s rounded to bf16)
    # ... or quantized (docs/parallelism.md#quantized-outer-sync): none (the all-reduce above) |
    # bf16 | fp8 | int8 | int4, one scale per 128 values, gathered and summed in replica order
    outer_quant: str = "none"
    # with outer_quant: carry each replica's quantization residual into its next outer step
    error_feedback: bool = False
    # where SNOO's slow weights and momentum live: param (the parameter's device) | cpu (saves
    # 2 x params/ranks of accelerator memory; a D2H + H2D copy of the params per outer step)
    outer_state_device: str = "param"
    # outer=snoo, streaming DiLoCo (docs/parallelism.md): the parameters in `fragments` groups of
    # contiguous layers, each taking its outer step k / fragments steps after the previous one's
    # (each sync moves ~1/fragments of the bytes); 1 = plain SNOO / DiLoCo.
    fragments: int = 1
    # outer=snoo: inner steps between the start of a fragment's (asynchronous) all-reduce and its
    # update (the sync overlaps with them); 0 = synchronous. Must be < k / fragments.
    sync_delay: int = 0
    # outer=gpa (snoo_train/optim/gpa.py): x = mu_x x + (1 - mu_x) z, gradient at mu_y x + (1 - mu_y) z
    gpa_mu_x: float = 0.9967  # 0.9 ** (1 / H) matches DiLoCo with H inner steps (0.9967: H = 32)
    gpa_mu_y: float = 0.7
    # outer=ema_nesterov (snoo_train/optim/ema_nesterov.py): lookahead x + beta m, m = EMA of updates
    ema_gamma: float = 0.99
    ema_beta: float = 0.5
    ema_beta_follows_lr: bool = True  # beta_t = ema_beta x lr / initial lr (the schedule's shape)
    # inner=muon only (snoo_train/optim/muon.py):
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    ns_steps: int = 5  # Newton-Schulz iterations
    muon_period: int = 1  # MuonBP: full-matrix orthogonalisation every `period` steps; 1 = Muon
    # Parameter categories (snoo_train.optim.muon.categorize_parameters) that Muon updates; the
    # rest (embedding, head, vector = norms and biases, router) get AdamW.
    muon_categories: list[str] = field(default_factory=lambda: ["matrix", "expert"])


@dataclass
class DataConfig:
    """Where tokens come from. `source`: stdlib (embedded, no network) | hf | local | prepared
    (token stores written by `python -m snoo_train.data.prepare`, memory-mapped).

    The same keys mean the same to training, to `snoo_train.data.prepare` and to
    `snoo_train.data.train_tokenizer`: a store records the data config that made it."""

    source: str = "stdlib"
    # hf: dataset path on the hub (or a local dataset directory); prepared: the store directory
    path: Optional[str] = None
    name: Optional[str] = None  # hf: dataset config name
    split: str = "train"
    val_split: Optional[str] = None  # hf: a named held-out split; None holds out val_fraction
    # hf and local: read the source as a stream, tokenized in a background thread, each rank
    # its own share of the documents (data/streaming.py), instead of tokenizing it all up front
    streaming: bool = False
    files: list[str] = field(default_factory=list)  # local: text/jsonl/parquet files or globs
    format: Optional[str] = None  # local: text | jsonl | parquet; None infers from extension
    text_field: str = "text"
    sample_by: str = "document"  # local text files: document (one per file) | paragraph | line
    # byte | any HF tokenizer name or directory. None: the run's own (the store's for prepared,
    # else model.from_pretrained's when it holds one, else byte, gpt2 for hf); a value always wins.
    tokenizer: Optional[str] = None
    seq_len: int = 256
    val_fraction: float = 0.02  # documents held out for validation (by a hash of the document)
    max_documents: Optional[int] = None  # cap on documents read (quick runs, tests)
    cache_dir: Optional[str] = None  # where packed token arrays are cached; None: no cache
    shuffle_buffer: int = 10000  # streaming: windows shuffled together, in seeded blocks
    # Documents whose text field is missing or null stop the run (a corpus where half the
    # lines lack the field would otherwise train on the other half without a word); true skips
    # them with a warning that gives their count and the first one's position.
    skip_invalid_documents: bool = False
    # prepared: several stores mixed by `weights` (one per store, any positive scale)
    paths: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    # prepared: shard sizes are always checked at start-up (O(shards)); true also checks every
    # shard's sha256 (reads the whole store once)
    verify_checksums: bool = False
    # Training steps assembled ahead on a background thread while the device computes
    # (data/prefetch.py); 0 assembles each on the training thread. The batches are the same.
    prefetch: int = 2
    # Batches in pinned host memory, so that their non_blocking copy to the GPU never blocks
    # the host: auto (when training on CUDA) | true | false
    pin_memory: str = "auto"


# DataConfig keys that decide what goes into a token store: a prepared run cannot change them
# (the store fixed them; its manifest.json records them).
PREPARE_TIME_KEYS = (
    "name", "split", "val_split", "files", "format", "text_field", "sample_by",
    "val_fraction", "max_documents", "cache_dir", "skip_invalid_documents",
)  # fmt: skip


@dataclass
class PrepareConfig:
    """`python -m snoo_train.data.prepare`: tokenize a data config once into a token store."""

    out: Optional[str] = None  # the store directory to create
    workers: int = 1  # tokenizer processes; the store is byte-identical for any number
    shard_tokens: int = 100_000_000  # a shard closes at the first document end past this size
    chunk_documents: int = 256  # documents per task handed to a worker (and per progress save)
    overwrite: bool = False  # replace an existing store at `out`
    progress: bool = True  # a progress bar on stderr (documents, tokens, ETA)


@dataclass
class PrepareJob:
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass
class TokenizerTrainConfig:
    """`python -m snoo_train.data.train_tokenizer`: a byte-level BPE tokenizer from a data config."""

    vocab_size: int = 32000  # including the 256 byte symbols and the special tokens
    out: Optional[str] = None  # a directory AutoTokenizer.from_pretrained loads
    min_frequency: int = 2  # a merge must occur at least this often
    eos_token: str = "<|endoftext|>"
    overwrite: bool = False


@dataclass
class TokenizerJob:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)


@dataclass
class ProfileConfig:
    """trainer.profile: a torch profiler trace of steps start_step .. start_step + num_steps - 1
    on rank 0, written to <run_dir>/profile/ as Chrome/Perfetto trace JSON (ui.perfetto.dev)."""

    enabled: bool = False
    start_step: int = 5  # the first profiled step (1-based, as in metrics.jsonl)
    num_steps: int = 2
    # CUDA only: also record the allocator's history (torch.cuda.memory._record_memory_history)
    # over the same steps and dump it as a pickle for pytorch.org/memory_viz
    memory_snapshot: bool = False
    record_shapes: bool = False  # input shapes of every op (bigger traces)
    with_stack: bool = False  # Python stacks of every op (much bigger traces)


@dataclass
class DownstreamEvalConfig:
    """lm-evaluation-harness tasks run in the loop at the evaluation weights (trainer/downstream.py;
    the same code as `python -m snoo_train.evaluate`). Needs the `eval` extra when tasks is set."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task names; empty: no downstream evaluation
    interval: int = 0  # every this many steps, and after the last; 0: only after the last step
    include: Optional[str] = None  # a directory of task YAMLs (local tasks), as evaluate's include=
    limit: Optional[int] = None  # at most this many documents per task; None: all
    num_fewshot: Optional[int] = None  # None: each task's own default
    batch_size: int = 8  # sequences per forward (every rank runs the same ones: docs/checkpoints.md)


@dataclass
class TrainerConfig:
    max_steps: int = 200  # 0: no step (load, evaluate, save the step-0 checkpoint: a conversion)
    batch_size: int = 16  # global, in sequences, per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    log_interval: int = 10
    eval_interval: int = 50  # 0 disables periodic evaluation (a final one still runs)
    eval_batches: int = 8  # global validation batches of `batch_size` sequences
    seed: int = 0
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    lr_schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optim.lr
    decay_fraction: float = 0.2  # wsd: fraction of max_steps spent decaying
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False
    peak_flops: Optional[float] = None  # per device, for MFU; None: looked up from the GPU name
    progress: bool = True  # progress bar on rank 0
    # auto: continue from the newest complete checkpoint in checkpoint.dir (start fresh if there
    # is none) | none: start fresh, refused where the run directory already holds a run's
    # checkpoints or metrics | a path: that checkpoint (or that run's latest one)
    resume: str = "auto"
    # Starting fresh (resume=none) in a run directory that holds an earlier run: move that run's
    # checkpoints, metrics and summary into <run_dir>/archive/<time>/ first, instead of refusing.
    archive_previous_run: bool = False
    # A non-finite loss or gradient norm, found at the next log step or checkpoint: stop (raise;
    # no checkpoint holds a non-finite step) | skip (the step's update is masked on the device;
    # host counters such as the LR schedule still advance: docs/development.md "Steps without host syncs")
    nonfinite: str = "stop"
    nonfinite_max_skips: int = 10  # skip: stop anyway after this many consecutive skipped steps
    # More than one rank: agree on a preemption signal (a host sync) every this many steps, besides
    # every log and checkpoint step; 0: at log and checkpoint steps only. One process: every step.
    preemption_check_interval: int = 10
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    downstream_eval: DownstreamEvalConfig = field(default_factory=DownstreamEvalConfig)


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (snoo_train/checkpoint.py). `async_save` is also accepted on the
    command line as `checkpoint.async` (async is a Python keyword, so no field can carry it)."""

    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    interval: int = 100  # save every this many steps and at the end; 0: only on preemption
    keep_latest: int = 2  # complete checkpoints kept; 0 keeps all
    async_save: bool = False  # write in a background thread; training waits only for a copy
    checksum: bool = True  # CRC32 of every file in the manifest, verified before loading


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "snoo-train"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    metrics_file: str = "metrics.jsonl"  # relative to the run directory
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ParallelConfig:
    """How the world of ranks is laid out: replicas x shards x tp (torchrun --nproc_per_node=R*S*T),
    with expert parallelism borrowing `ep` of the S shard ranks (snoo_train/dist.py draws it).

    replicas=1: FSDP over all ranks. replicas=R > 1: the model fully sharded within each replica
    of world_size / R consecutive ranks, and
      * optim.outer=snoo: DiLoCo. Replicas train independently on their own data (no
        communication between them during the inner steps); every optim.k steps the
        pseudo-gradient is averaged over the replicas (one all-reduce) and SNOO's Nesterov step
        follows. With R=1 this is exactly SNOO.
      * optim.outer=none: HSDP. Gradients are reduce-scattered within a replica and all-reduced
        across replicas every step: the same training as FSDP over all ranks, with the
        parameters sharded over S ranks instead of R x S.
    tp=T > 1: tensor parallelism (Megatron-style, with sequence parallelism for the norms) over T
    consecutive ranks, which see the same batch; FSDP then shards over the rest.
    ep=E > 1 (family=moe): each rank holds num_experts / E whole experts and tokens travel to
    their experts' ranks by all-to-all; expert weights are fully sharded over the S / E ranks that
    hold the same experts, everything else over all S.
    """

    replicas: int = 1
    tp: int = 1
    # tp > 1: the head's logits stay sharded over the vocabulary and the cross-entropy runs on
    # the shards (no [batch, seq, vocab] gather); false gathers the logits first.
    loss_parallel: bool = True
    ep: int = 1
    # Pipeline parallelism (docs/parallelism.md#pipeline-parallelism): pp=P stages of contiguous
    # decoder layers (the embedding on the first, the norm and head on the last), the outermost
    # dimension within a replica; torch.distributed.pipelining's schedule runs the micro-batches.
    pp: int = 1
    pp_schedule: str = "1F1B"  # 1F1B, GPipe, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble
    pp_microbatches: Optional[int] = None  # per data-parallel rank and step; null: one per stage (P x stages per rank)
    # Decoder layers of each stage, first to last (P x stages per rank entries); null: an even split.
    pp_layers_per_stage: Optional[list[int]] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: Optional[str] = None  # filled from hydra.run.dir / the sweep dir at start-up


def is_diloco(cfg: Any) -> bool:
    """Several replicas with SNOO: DiLoCo (replicas drift apart between outer steps). Several
    replicas without an outer optimizer are plain HSDP."""
    return cfg.parallel.replicas > 1 and cfg.optim.outer == "snoo"


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float, *, strict: bool = True) -> None:
    if value is None or (value <= 0 if strict else value < 0):
        bound = "> 0" if strict else ">= 0"
        raise ConfigError(f"{key}={value!r} must be {bound}")


def _float_values(node: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every float in a config tree (dataclass or DictConfig), lists included, with its key."""
    if dataclasses.is_dataclass(node):
        items = ((f.name, getattr(node, f.name)) for f in dataclasses.fields(node))
    elif hasattr(node, "items"):
        items = node.items()
    else:
        return
    for key, value in items:
        if isinstance(value, float):
            yield f"{prefix}{key}", value
        elif isinstance(value, Sequence) and not isinstance(value, str):  # lists, ListConfig
            for i, v in enumerate(value):
                if isinstance(v, float):
                    yield f"{prefix}{key}[{i}]", v
        else:
            yield from _float_values(value, f"{prefix}{key}.")


def validate_config(cfg: Any, world_size: int = 1) -> None:
    """Check values a type cannot; raise ConfigError naming the key. `cfg` is a Config or DictConfig.

    Each section checks its own values (`_check_<section>`); only the checks that span sections
    are here."""
    # First: a NaN passes every range check below (nan <= 0 is False) and inf passes most.
    # Only the schema's sections: a composed DictConfig may also hold Hydra's own node.
    for section in dataclasses.fields(Config):
        for key, value in _float_values(getattr(cfg, section.name), f"{section.name}."):
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be a finite number")
    m, o, d, t = cfg.model, cfg.optim, cfg.data, cfg.trainer
    _check_model(m)
    _check_optim(o)
    if o.outer == "snoo" and o.fragments > m.num_layers:
        raise ConfigError(
            f"optim.fragments={o.fragments} exceeds model.num_layers={m.num_layers}: fragments are contiguous layers"
        )
    if (o.fragments > 1 or o.sync_delay > 0) and t.nonfinite == "skip":
        raise ConfigError(
            "trainer.nonfinite=skip cannot undo a step of SNOO with optim.fragments > 1 or optim.sync_delay > 0 "
            "(its fragments restart at different steps); use trainer.nonfinite=stop"
        )
    if o.inner == "schedule_free_adamw" and t.lr_schedule != "constant":
        raise ConfigError(
            f"trainer.lr_schedule={t.lr_schedule!r}: optim.inner=schedule_free_adamw replaces the "
            "schedule's decay and needs trainer.lr_schedule=constant (warm-up still applies)"
        )
    _check_parallel(cfg, world_size)
    _check_data(d)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check_trainer(t)
    # Ranks of one tensor-parallel group (and of one pipeline) share a batch: it splits over the others.
    dp_size = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    per_step = dp_size * t.grad_accum
    if t.batch_size % per_step:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} must be divisible by data-parallel ranks x trainer.grad_accum "
            f"= {dp_size} x {t.grad_accum} = {per_step} (data-parallel ranks = world size / (parallel.tp x parallel.pp))"
        )
    if cfg.parallel.pp > 1:
        microbatches = pipeline_microbatches(cfg.parallel)
        if (t.batch_size // dp_size) % microbatches:
            raise ConfigError(
                f"parallel.pp_microbatches={microbatches} must divide the batch of one pipeline, trainer.batch_size / "
                f"data-parallel ranks = {t.batch_size} / {dp_size} = {t.batch_size // dp_size}"
            )
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, ("disabled", "offline", "online"))
    _positive("checkpoint.interval", cfg.checkpoint.interval, strict=False)
    _positive("checkpoint.keep_latest", cfg.checkpoint.keep_latest, strict=False)


def mesh_dims(world_size: int, replicas: int = 1, tp: int = 1, ep: int = 1, pp: int = 1) -> dict[str, int]:
    """The root mesh's named dimensions and sizes, outermost first: (replicate,) (pp,) shard (, tp);
    ConfigError naming the key when a size does not divide. `shard` is always present (FSDP over
    one rank is a no-op layout)."""
    for key, size in (("parallel.replicas", replicas), ("parallel.tp", tp), ("parallel.ep", ep), ("parallel.pp", pp)):
        if size < 1:
            raise ConfigError(f"{key}={size} must be >= 1")
    if world_size % replicas:
        raise ConfigError(
            f"parallel.replicas={replicas} must divide the world size {world_size} "
            "(torchrun --nproc_per_node x nodes = replicas x shards x tp)"
        )
    if (world_size // replicas) % tp:
        raise ConfigError(
            f"parallel.tp={tp} must divide the ranks of one replica, world / replicas = "
            f"{world_size} / {replicas} = {world_size // replicas}"
        )
    if (world_size // (replicas * tp)) % pp:
        raise ConfigError(
            f"parallel.pp={pp} must divide world / (replicas x tp) = {world_size} / ({replicas} x {tp}) = "
            f"{world_size // (replicas * tp)}: each pipeline stage is a group of FSDP x tp ranks"
        )
    shard = world_size // (replicas * tp * pp)
    if shard % ep:
        raise ConfigError(
            f"parallel.ep={ep} must divide the FSDP dimension world / (replicas x tp) = "
            f"{world_size} / (replicas x tp x pp) = {shard}: expert parallelism borrows its ranks from it"
        )
    dims = {"replicate": replicas} if replicas > 1 else {}
    if pp > 1:
        dims["pp"] = pp
    dims["shard"] = shard
    if tp > 1 or ep > 1:
        # Expert parallelism reads "tp" as the ranks sharing a batch, so it needs the dimension
        # even at size 1.
        dims["tp"] = tp
    return dims


def _check_parallel(cfg: Any, world_size: int) -> None:
    """Every size the mesh and the sharded model need, before any process group starts."""
    p, m, o = cfg.parallel, cfg.model, cfg.optim
    mesh_dims(world_size, p.replicas, p.tp, p.ep, p.pp)
    _check_pipeline(cfg, world_size)
    if p.replicas > 1 and o.outer not in ("snoo", "none"):
        raise ConfigError(
            f"parallel.replicas={p.replicas} needs optim.outer=snoo (DiLoCo) or none (HSDP), got {o.outer!r}"
        )
    if o.outer == "snoo" and o.outer_quant != "none" and p.replicas == 1:
        # Refused, not ignored: the user asked for a wire format and nothing would be sent.
        raise ConfigError(
            f"optim.outer_quant={o.outer_quant} quantizes what DiLoCo replicas send each other at outer "
            "steps; with parallel.replicas=1 nothing is sent: use optim.outer_quant=none or parallel.replicas > 1"
        )
    if p.tp > 1:
        # Colwise q/k/v/gate/up and rowwise o/down split heads and the MLP width; the embedding
        # and head split the vocabulary, which is padded to a multiple of VOCAB_MULTIPLE.
        widths = {"model.num_heads": m.num_heads, "model.num_kv_heads": m.num_kv_heads}
        if m.family != "moe":
            widths["model.intermediate_size"] = m.intermediate_size
        for key, size in widths.items():
            if size % p.tp:
                raise ConfigError(f"parallel.tp={p.tp} must divide {key}={size}: each tp rank takes an equal share")
        if m.from_pretrained and m.vocab_size is not None and m.vocab_size % p.tp:
            raise ConfigError(
                f"parallel.tp={p.tp} must divide the vocabulary of model.from_pretrained={m.from_pretrained!r} "
                f"({m.vocab_size}): the embedding and head are split over the tp ranks"
            )
        if VOCAB_MULTIPLE % p.tp:
            raise ConfigError(
                f"parallel.tp={p.tp} must divide {VOCAB_MULTIPLE} (the vocabulary is padded to a multiple "
                "of it and split over the tp ranks): use a power of two"
            )
    if p.ep > 1:
        if p.tp > 1:
            raise ConfigError(
                f"parallel.ep={p.ep} with parallel.tp={p.tp} is not supported yet: the tp ranks would each "
                "run a slice of the same tokens through the experts; use one of them"
            )
        if p.replicas > 1 and o.outer == "none":
            raise ConfigError(
                f"parallel.ep={p.ep} with parallel.replicas={p.replicas} needs optim.outer=snoo (DiLoCo): "
                "HSDP of expert-parallel weights is not supported yet"
            )
        if m.family != "moe":
            raise ConfigError(f"parallel.ep={p.ep} needs a mixture-of-experts model (model.family=moe), got {m.family!r}")
        if m.num_experts % p.ep:
            raise ConfigError(
                f"parallel.ep={p.ep} must divide model.num_experts={m.num_experts}: each rank holds an equal "
                "number of whole experts"
            )


# parallel.pp_schedule -> stages per rank by default (the interleaved and V schedules need two or more).
PP_SCHEDULES = {"1F1B": 1, "GPipe": 1, "Interleaved1F1B": 2, "InterleavedZeroBubble": 2, "ZBVZeroBubble": 2}


def pipeline_stages_per_rank(p: Any) -> int:
    """Stages each pipeline rank holds: from parallel.pp_layers_per_stage's length, else the schedule's default."""
    if p.pp_layers_per_stage:
        return max(1, len(p.pp_layers_per_stage) // p.pp)
    return PP_SCHEDULES.get(p.pp_schedule, 1)


def pipeline_microbatches(p: Any) -> int:
    """Micro-batches per step of one pipeline: parallel.pp_microbatches, else one per stage."""
    return p.pp_microbatches if p.pp_microbatches else p.pp * pipeline_stages_per_rank(p)


def _check_pipeline(cfg: Any, world_size: int) -> None:
    p, m, t = cfg.parallel, cfg.model, cfg.trainer
    _choice("parallel.pp_schedule", p.pp_schedule, tuple(PP_SCHEDULES))
    if p.pp_microbatches is not None:
        _positive("parallel.pp_microbatches", p.pp_microbatches)
    if p.pp == 1:
        if p.pp_microbatches is not None or p.pp_layers_per_stage:
            raise ConfigError("parallel.pp_microbatches and parallel.pp_layers_per_stage need parallel.pp > 1")
        return
    v = pipeline_stages_per_rank(p)
    stages = p.pp * v
    if p.pp_layers_per_stage:
        sizes = list(p.pp_layers_per_stage)
        if len(sizes) % p.pp or any(n < 0 for n in sizes) or sum(sizes) != m.num_layers:
            raise ConfigError(
                f"parallel.pp_layers_per_stage={sizes} must list a non-negative layer count per stage, "
                f"parallel.pp={p.pp} x stages per rank entries, summing to model.num_layers={m.num_layers}"
            )
    elif m.num_layers % stages:
        raise ConfigError(
            f"parallel.pp={p.pp} x {v} stage(s) per rank = {stages} stages must divide model.num_layers="
            f"{m.num_layers} for an even split; or list the layers with parallel.pp_layers_per_stage"
        )
    default_v = PP_SCHEDULES[p.pp_schedule]
    if (default_v == 1 and v != 1) or (p.pp_schedule == "ZBVZeroBubble" and v != 2) or v < default_v:
        need = "one stage" if default_v == 1 else ("two stages" if p.pp_schedule == "ZBVZeroBubble" else "two or more stages")
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule} runs {need} per rank; parallel.pp_layers_per_stage lists "
            f"{len(p.pp_layers_per_stage or [])} stages for parallel.pp={p.pp}"
        )
    if pipeline_microbatches(p) < p.pp:
        raise ConfigError(
            f"parallel.pp_microbatches={p.pp_microbatches} must be at least parallel.pp={p.pp}: fewer leaves stages idle"
        )
    if m.tie_embeddings:
        raise ConfigError(
            f"parallel.pp={p.pp} needs model.tie_embeddings=false: the embedding (first stage) and the head "
            "(last stage) live on different ranks"
        )
    if t.grad_accum != 1:
        raise ConfigError(
            f"trainer.grad_accum={t.grad_accum} with parallel.pp={p.pp}: the pipeline splits the batch into "
            "parallel.pp_microbatches itself; use trainer.grad_accum=1"
        )
    if p.tp > 1 and cfg.data.seq_len % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp} must divide data.seq_len={cfg.data.seq_len} with parallel.pp: stages pass "
            "sequence shards"
        )
    if t.compile and "ZeroBubble" in p.pp_schedule:
        raise ConfigError(
            f"trainer.compile with parallel.pp_schedule={p.pp_schedule}: zero-bubble schedules split the "
            "backward, which torch.compile does not support; use 1F1B or Interleaved1F1B"
        )
    if t.downstream_eval.tasks:
        raise ConfigError(
            "trainer.downstream_eval with parallel.pp is not supported yet: lm-eval runs whole-model forwards; "
            "evaluate an exported checkpoint (python -m snoo_train.evaluate)"
        )


def _check_model(m: Any) -> None:
    _choice("model.family", m.family, MODEL_FAMILIES)
    if m.from_pretrained is not None and not str(m.from_pretrained).strip():
        raise ConfigError("model.from_pretrained is empty; name a directory or hub id, or null for a fresh init")
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        _positive(f"model.{key}", getattr(m, key))
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}")
    if m.family != "moe":
        return
    if m.num_experts < 2:
        raise ConfigError(f"model.num_experts={m.num_experts} must be >= 2 when model.family=moe")
    if not 1 <= m.num_experts_per_tok <= m.num_experts:
        raise ConfigError(
            f"model.num_experts_per_tok={m.num_experts_per_tok} must be in [1, model.num_experts={m.num_experts}]"
        )
    if m.moe_intermediate_size is not None:
        _positive("model.moe_intermediate_size", m.moe_intermediate_size)
    _positive("model.router_aux_loss_coef", m.router_aux_loss_coef, strict=False)
    _positive("model.router_bias_update_rate", m.router_bias_update_rate, strict=False)
    _choice("model.experts_implementation", m.experts_implementation, ("auto", "grouped_mm", "batched_mm", "eager"))


def _unit_interval(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}={value} must be in [0, 1)")


def _check_optim(o: Any) -> None:
    # The registry is the one list of optimizers (optim/build.py; torch only, no cycle).
    from snoo_train.optim.build import INNER, OUTER
    from snoo_train.optim.kernels import IMPLEMENTATIONS

    _choice("optim.inner", o.inner, tuple(INNER))
    if o.inner == "muon":
        _positive("optim.muon_lr", o.muon_lr)
        _unit_interval("optim.muon_momentum", o.muon_momentum)
        _positive("optim.ns_steps", o.ns_steps)
        _positive("optim.muon_period", o.muon_period)
        allowed = ("matrix", "expert", "embedding", "head", "router")  # vectors cannot be orthogonalised
        for c in o.muon_categories:
            _choice("optim.muon_categories", c, allowed)
    _choice("optim.implementation", o.implementation, IMPLEMENTATIONS)
    if o.inner == "schedule_free_adamw" and o.implementation == "fused":
        raise ConfigError(
            "optim.implementation=fused: optim.inner=schedule_free_adamw (the schedulefree package) has no "
            "fused kernel; use auto or foreach (the same) or forloop"
        )
    _choice("optim.outer", o.outer, tuple(OUTER))
    if o.inner == "schedule_free_adamw" and o.outer != "none":
        raise ConfigError(
            f"optim.outer={o.outer!r} cannot wrap optim.inner=schedule_free_adamw (it averages its "
            "iterates itself); use optim.outer=none"
        )
    if o.outer == "gpa":
        for key in ("gpa_mu_x", "gpa_mu_y"):
            _unit_interval(f"optim.{key}", getattr(o, key))
    if o.outer == "ema_nesterov":
        _unit_interval("optim.ema_gamma", o.ema_gamma)
        _positive("optim.ema_beta", o.ema_beta, strict=False)
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, strict=False)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two values in [0, 1)")
    if o.outer == "snoo":
        if o.k < 1:
            raise ConfigError(f"optim.k={o.k} must be >= 1")
        _positive("optim.outer_lr", o.outer_lr)
        _unit_interval("optim.outer_momentum", o.outer_momentum)
    _choice("optim.outer_reduce_dtype", o.outer_reduce_dtype, ("fp32", "bf16"))
    _check_outer_quant(o)
    _choice("optim.outer_state_device", o.outer_state_device, ("param", "cpu"))
    _check_streaming(o)


def _check_streaming(o: Any) -> None:
    """optim.fragments and optim.sync_delay (streaming DiLoCo): SNOO only, evenly spread, one
    sync in flight at a time. The layer count and trainer.nonfinite are checked in validate_config."""
    _positive("optim.fragments", o.fragments)
    _positive("optim.sync_delay", o.sync_delay, strict=False)
    if o.fragments == 1 and o.sync_delay == 0:
        return
    if o.outer != "snoo":
        key = "optim.fragments" if o.fragments != 1 else "optim.sync_delay"
        raise ConfigError(
            f"{key}={getattr(o, key.split('.')[1])} needs optim.outer=snoo: only SNOO takes outer steps to "
            f"split into fragments or delay (optim.outer={o.outer!r})"
        )
    if o.k % o.fragments:
        raise ConfigError(
            f"optim.fragments={o.fragments} must divide optim.k={o.k}: the fragments' outer steps are "
            "spread k / fragments steps apart"
        )
    if o.sync_delay >= o.k // o.fragments:
        raise ConfigError(
            f"optim.sync_delay={o.sync_delay} must be < optim.k / optim.fragments = {o.k // o.fragments}: a "
            "fragment's update must land before the next fragment's sync starts (one sync in flight)"
        )


def _check_outer_quant(o: Any) -> None:
    from snoo_train.optim.outer_quant import CODECS

    _choice("optim.outer_quant", o.outer_quant, ("none", *CODECS))
    if not isinstance(o.error_feedback, bool):
        raise ConfigError(f"optim.error_feedback={o.error_feedback!r} must be true or false")
    if o.error_feedback and o.outer_quant == "none":
        raise ConfigError(
            "optim.error_feedback=true needs optim.outer_quant (bf16, fp8, int8 or int4): without "
            "quantization there is no residual to carry"
        )
    if o.outer_quant != "none" and o.outer_reduce_dtype != "fp32":
        raise ConfigError(
            f"optim.outer_reduce_dtype={o.outer_reduce_dtype} and optim.outer_quant={o.outer_quant} both set the "
            "pseudo-gradient's wire format: outer_reduce_dtype is the all-reduce's (outer_quant=none); set one"
        )


# Keys that one inner optimizer or outer wrapper alone reads (optim/build.py); the rest (lr,
# betas, eps, weight_decay) every optimizer reads.
OPTIM_KEYS_OF = {
    ("outer", "snoo"): (
        "k", "outer_lr", "outer_momentum", "nesterov", "outer_reduce_dtype", "outer_state_device",
        "outer_quant", "error_feedback", "fragments", "sync_delay",
    ),  # fmt: skip
    ("outer", "gpa"): ("gpa_mu_x", "gpa_mu_y"),
    ("outer", "ema_nesterov"): ("ema_gamma", "ema_beta", "ema_beta_follows_lr"),
    ("inner", "muon"): ("muon_lr", "muon_momentum", "ns_steps", "muon_period", "muon_categories"),
}


def ignored_optim_keys(o: Any) -> list[str]:
    """One line for each key the chosen optimizer never reads and that holds a value of its own
    (`optim=adamw optim.k=0`): the entry point warns with them, so nothing asked for is ignored
    without a word. A warning, not a refusal: a sweep over optimizers with one set of overrides
    (`-m optim=adamw,snoo_adamw optim.k=10`) is a normal request. A key at its schema default
    is not a request: the optim groups leave other optimizers' keys there."""
    defaults = OptimConfig()
    ignored = []
    for (role, owner), keys in OPTIM_KEYS_OF.items():
        chosen = getattr(o, role)
        if chosen == owner:
            continue
        for key in keys:
            value = getattr(o, key)
            if isinstance(value, Sequence) and not isinstance(value, str):
                value = list(value)  # a ListConfig compares and prints as a list
            if value != getattr(defaults, key):
                ignored.append(
                    f"optim.{key}={value!r} is ignored: it applies to optim.{role}={owner} only, and "
                    f"optim={o.name} uses optim.{role}={chosen}"
                )
    return ignored


def _check_data(d: Any) -> None:
    _choice("data.source", d.source, ("stdlib", "hf", "local", "prepared"))
    if d.source == "hf" and not d.path:
        raise ConfigError("data.path must name a dataset when data.source=hf (e.g. data.path=roneneldan/TinyStories)")
    if d.source == "local" and not d.files:
        raise ConfigError("data.files must list at least one file when data.source=local")
    if d.format is not None:
        _choice("data.format", d.format, ("text", "jsonl", "parquet"))
    _choice("data.sample_by", d.sample_by, ("document", "paragraph", "line"))
    _positive("data.shuffle_buffer", d.shuffle_buffer)
    _positive("data.prefetch", d.prefetch, strict=False)
    _check_pin_memory(d.pin_memory)
    _positive("data.seq_len", d.seq_len)
    _unit_interval("data.val_fraction", d.val_fraction)
    if d.source == "prepared":
        _check_prepared(d)
        return
    if d.tokenizer is not None and not d.tokenizer.strip():
        raise ConfigError("data.tokenizer is empty; name one (byte, a hub name or a directory), or null for the run's own")
    for key in ("paths", "weights"):
        if getattr(d, key):
            raise ConfigError(f"data.{key} mixes token stores and needs data=prepared (data.source={d.source})")
    if d.streaming and d.source == "stdlib":
        raise ConfigError("data.streaming=true reads hf or local sources; the embedded corpus is small enough to pack")


def pin_memory_mode(value: Any) -> str:
    """data.pin_memory as auto | true | false: Hydra reads `data.pin_memory=true` as a boolean,
    which the str field then holds as "True"."""
    return str(value).lower()


def _check_pin_memory(value: Any) -> None:
    mode = pin_memory_mode(value)
    _choice("data.pin_memory", mode, ("auto", "true", "false"))
    import torch  # here: the config module stays importable without torch's start-up cost

    if mode == "true" and not torch.cuda.is_available():
        raise ConfigError(
            "data.pin_memory=true pins batches for copies to a CUDA device, and no CUDA device is visible: "
            "use auto (pins only when training on CUDA) or false"
        )


def _check_prepared(d: Any) -> None:
    """A prepared run reads one store (data.path) or a mixture (data.paths + data.weights)."""
    if bool(d.path) == bool(d.paths):
        raise ConfigError(
            "data=prepared reads one store, data.path=DIR, or a mixture, 'data.paths=[DIR,...]' "
            "with 'data.weights=[...]'; set exactly one of data.path and data.paths"
        )
    if d.streaming:
        raise ConfigError("data.streaming=true streams a source while training; a prepared store is memory-mapped instead")
    if d.paths:
        if len(d.weights) != len(d.paths):
            raise ConfigError(
                f"data.weights has {len(d.weights)} values for {len(d.paths)} stores in data.paths; give one weight per store"
            )
        if any(w < 0 for w in d.weights) or not sum(d.weights) > 0:
            raise ConfigError(f"data.weights={list(d.weights)} must be >= 0 with a positive sum")
    elif d.weights:
        raise ConfigError("data.weights weighs the stores of data.paths; with one store (data.path) leave it out")
    defaults = DataConfig()
    changed = [k for k in PREPARE_TIME_KEYS if getattr(d, k) != getattr(defaults, k)]
    if changed:
        raise ConfigError(
            f"data.{changed[0]} is fixed when a store is prepared (its manifest.json records it); data=prepared "
            "cannot change it: prepare another store with it"
        )


def _check_trainer(t: Any) -> None:
    for key in ("batch_size", "grad_accum", "log_interval"):
        _positive(f"trainer.{key}", getattr(t, key))
    # 0: no training step (a warm start's conversion: load, evaluate, checkpoint, export)
    for key in ("max_steps", "eval_interval", "eval_batches", "grad_clip", "warmup_steps"):
        _positive(f"trainer.{key}", getattr(t, key), strict=False)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"trainer.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if not 0.0 < t.decay_fraction <= 1.0:
        raise ConfigError(f"trainer.decay_fraction={t.decay_fraction} must be in (0, 1]")
    _choice("trainer.lr_schedule", t.lr_schedule, ("cosine", "wsd", "constant"))
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _choice("trainer.mixed_precision", t.mixed_precision, ("auto", "bf16", "fp32"))
    _choice("trainer.nonfinite", t.nonfinite, ("stop", "skip"))
    _positive("trainer.nonfinite_max_skips", t.nonfinite_max_skips)
    _positive("trainer.preemption_check_interval", t.preemption_check_interval, strict=False)
    _check_profile(t.profile, t.device)
    _check_downstream(t.downstream_eval)
    if t.max_steps == 0 and t.profile.enabled:
        raise ConfigError("trainer.profile.enabled=true profiles training steps, and trainer.max_steps=0 takes none")
    if not t.resume:
        raise ConfigError("trainer.resume is empty; use auto, none or a checkpoint path")


def _check_downstream(e: Any) -> None:
    """The values alone; which tasks exist (and whether lm-eval is installed) is checked by
    trainer/downstream.py before training starts, on every rank alike."""
    tasks = list(e.tasks) if isinstance(e.tasks, Sequence) and not isinstance(e.tasks, str) else None
    if tasks is None or not all(isinstance(x, str) and x.strip() for x in tasks):
        raise ConfigError(f"trainer.downstream_eval.tasks={e.tasks!r} must be a list of lm-eval task names")
    _positive("trainer.downstream_eval.interval", e.interval, strict=False)
    _positive("trainer.downstream_eval.batch_size", e.batch_size)
    if e.limit is not None:
        _positive("trainer.downstream_eval.limit", e.limit)
    if e.num_fewshot is not None:
        _positive("trainer.downstream_eval.num_fewshot", e.num_fewshot, strict=False)
    if e.include is not None:
        if not os.path.isdir(e.include):
            raise ConfigError(f"trainer.downstream_eval.include={e.include}: not a directory of task YAMLs")


def _check_profile(p: Any, device: str) -> None:
    _positive("trainer.profile.start_step", p.start_step)
    _positive("trainer.profile.num_steps", p.num_steps)
    if p.enabled and p.memory_snapshot and device == "cpu":
        raise ConfigError(
            "trainer.profile.memory_snapshot=true records the CUDA allocator's history; trainer.device=cpu has "
            "none: set it to false (the trace itself works on CPU)"
        )
