"""Hydra entry point and the training loop.

    python -m snoo_train.train [overrides]                          # one process
    torchrun --nproc_per_node=N -m snoo_train.train [overrides]      # N ranks, FSDP2

One optimizer step, top to bottom:
    Trainer.train_step
      BatchLoader.next_step()            grad_accum micro-batches of this rank's slice
      causal_lm_loss(...) / grad_accum   forward + backward per micro-batch (FSDP2 reduces grads);
                                         MoE adds coef x the router's load-balancing loss
      clip_grad_norm(...)                global norm over DTensor shards, then clip
      optimizer.step()                   AdamW or Muon on the fast weights; every k-th step SNOO's
                                         outer Nesterov step on the slow weights (optim/snoo.py)
      scheduler.step()                   next inner learning rate
"""

from __future__ import annotations

# `python -m snoo_train.train`: catch SIGTERM/SIGUSR1 from the first moment, before the slow
# imports below (torch, transformers: seconds), so a preemption during start-up ends in the
# requeue status 75 instead of killing the process (snoo_train/preemption.py). The console
# script does the same in snoo_train/cli.py.
if __name__ == "__main__":
    from snoo_train.preemption import install_process_handler

    install_process_handler()

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from snoo_train.checkpoint import (
    Checkpointer,
    CheckpointError,
    CorruptCheckpoint,
    checkpoint_name,
    no_loadable_checkpoint,
    replica_keys,
    resolve_checkpoint,
    resume_candidates,
)
from snoo_train.config import Config, ConfigError, is_diloco, validate_config
from snoo_train.data import BatchLoader, DataError, build_datasets, build_tokenizer, eval_batches
from snoo_train.dist import (
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    broadcast_object,
    destroy_distributed,
    env_rank,
    env_world_size,
    exit_process,
    init_distributed,
)
from snoo_train.metrics import MetricsLogger, Throughput, peak_flops, peak_memory_bytes
from snoo_train.models import (
    RouterStats,
    build_model,
    count_parameters,
    flops_per_token,
    materialize,
    parallelize,
)
from snoo_train.optim import SNOO, Muon, muon_param_groups
from snoo_train.preemption import (
    REQUEUE_EXIT_CODE,
    Preempted,
    PreemptionHandler,
    process_handler,
    report_requeue_status,
)
from snoo_train.resume import apply_changes, config_changes, param_group_hyperparameters
from snoo_train.rundir import (
    RunDirError,
    RunDirLock,
    check_free_space,
    check_writable,
    guard_fresh_start,
)
from snoo_train.schedule import build_scheduler

# The schema every YAML in snoo_train/configs/ is merged into (config.yaml lists it first).
ConfigStore.instance().store(name="base_config", node=Config)

log = logging.getLogger("snoo_train")


class TrainingDiverged(RuntimeError):
    """The training loss or gradient norm became NaN or infinite."""


# -- building blocks -----------------------------------------------------------------------


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases and the token embedding (and with it a tied LM head)
    keep weight_decay=0, the usual choice for transformers."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg, *, replicate_group=None) -> torch.optim.Optimizer:
    """AdamW (or Muon, optim.inner=muon) on the fast weights, wrapped by SNOO when optim.outer=snoo
    (GPA: outer=gpa, EMA-Nesterov: outer=ema_nesterov; snoo_train/optim/). Schedule-Free AdamW
    (inner=schedule_free_adamw) stands alone: it averages its iterates itself.

    Muon takes the parameter categories in optim.muon_categories at optim.muon_lr; the rest
    (embedding, head, norms, router) get its AdamW rule at optim.lr."""
    from snoo_train.optim import GPA, EMANesterov

    if cfg.inner == "schedule_free_adamw":
        from snoo_train.optim import ScheduleFreeAdamW

        # Its warm-up is the trainer's constant schedule's (the same (k + 1) / warmup formula).
        return ScheduleFreeAdamW(
            weight_decay_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
        )
    if cfg.inner == "muon":
        inner = Muon(
            muon_param_groups(
                model,
                muon_categories=cfg.muon_categories,
                lr=cfg.muon_lr,
                adamw_lr=cfg.lr,
                weight_decay=cfg.weight_decay,
            ),
            momentum=cfg.muon_momentum,
            ns_steps=cfg.ns_steps,
            period=cfg.muon_period,
            adamw_betas=tuple(cfg.betas),
            adamw_eps=cfg.eps,
        )
    else:
        inner = torch.optim.AdamW(
            weight_decay_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
        )
    if cfg.outer == "snoo":
        # replicate_group (DiLoCo, parallel.replicas > 1): SNOO averages the pseudo-gradient
        # over the replicas at each outer step.
        return SNOO(
            inner, k=cfg.k, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=cfg.nesterov,
            replicate_group=replicate_group,
            reduce_dtype=torch.bfloat16 if cfg.outer_reduce_dtype == "bf16" else None,
            state_device="cpu" if cfg.outer_state_device == "cpu" else None,
        )  # fmt: skip
    if cfg.outer == "gpa":
        return GPA(inner, mu_x=cfg.gpa_mu_x, mu_y=cfg.gpa_mu_y)
    if cfg.outer == "ema_nesterov":
        return EMANesterov(
            inner, gamma=cfg.ema_gamma, beta=cfg.ema_beta, beta_follows_lr=cfg.ema_beta_follows_lr
        )
    return inner


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
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0 and torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 compute where requested (auto: on CUDA); None keeps fp32."""
    mp = cfg.trainer.mixed_precision
    if mp == "bf16" or (mp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# -- the trainer ---------------------------------------------------------------------------


class Trainer:
    """Builds data, model and optimizer from a validated Config, then trains and evaluates."""

    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        t, device = cfg.trainer, dist.device
        torch.manual_seed(t.seed)

        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.train_set, self.val_set = build_datasets(cfg.data, self.tokenizer, seed=t.seed)
        self.loader = BatchLoader(
            self.train_set,
            global_batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            rank=dist.rank,
            world_size=dist.world_size,
            seed=t.seed,
        )

        # Built on the meta device and materialized after sharding: each rank only ever
        # allocates its own shard, and the weights depend on the seed alone.
        dtype = resolve_dtype(cfg, device)
        model = build_model(cfg.model, self.tokenizer.vocab_size, seed=t.seed, device="meta")
        self.num_params = count_parameters(model)
        vocab_size = model.config.vocab_size
        self.model = parallelize(
            model,
            mesh=dist.mesh,
            param_dtype=dtype if dist.mesh is not None else None,
            activation_checkpointing=t.activation_checkpointing,
            compile=t.compile,
            # replicas > 1: DiLoCo shards within each replica only; outer=none is HSDP.
            diloco=is_diloco(cfg),
        )
        materialize(self.model, device=device, seed=t.seed)
        # FSDP2 casts parameters itself; a single process gets bf16 compute from autocast.
        self.autocast = (
            torch.autocast(device.type, dtype=dtype)
            if dtype is not None and dist.mesh is None
            else nullcontext()
        )

        self.optimizer = build_optimizer(self.model, cfg.optim, replicate_group=dist.replicate_group)
        self.is_snoo = isinstance(self.optimizer, SNOO)
        m = cfg.model
        self.router = (
            RouterStats(m.num_experts, m.num_experts_per_tok, m.router_aux_loss_coef)
            if m.family == "moe"
            else None
        )
        self.scheduler = build_scheduler(self.optimizer, t)

        self.vocab_size = vocab_size
        self.flops_per_token = flops_per_token(cfg.model, vocab_size, cfg.data.seq_len)
        self.peak_flops = peak_flops(device, t.peak_flops)

        # Progress counters, all part of a checkpoint.
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.checkpoint_dir = cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")
        self._agree(self._check_checkpoint_space)
        self.checkpointer = Checkpointer(
            self.checkpoint_dir,
            keep_latest=cfg.checkpoint.keep_latest,
            async_save=cfg.checkpoint.async_save,
            checksum=cfg.checkpoint.checksum,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        # The optimizer's hyper-parameters as this run's config set them: loading a checkpoint
        # overwrites them with the saved ones, and a changed one is written back (resume.py).
        built_groups = param_group_hyperparameters(self.optimizer)
        self.config_changes = []
        self.resumed_from = self._resume()
        if self.config_changes:
            apply_changes(self.config_changes, self.optimizer, self.scheduler, built_groups)
            for change in self.config_changes:
                log.warning("resume: %s (applied from step %d on)", change, self.step + 1)

        self.metrics = MetricsLogger(
            cfg.run_dir,
            cfg,
            dist.rank,
            total_steps=t.max_steps,
            resolved_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            resume_step=self.step if self.resumed_from is not None else None,
        )
        self.metrics.message(
            f"model {cfg.model.name}: {self.num_params / 1e6:.2f}M params, vocab {vocab_size} | "
            f"optim {cfg.optim.name} | world size {dist.world_size} on {device.type} | "
            f"{self.loader.tokens_per_step} tokens/step | run dir {cfg.run_dir}"
            + (f" | resumed at step {self.step} from {self.resumed_from}" if self.resumed_from else "")
        )

    # -- checkpoints -----------------------------------------------------------------------

    def _agree(self, decide: Callable[[], Any]) -> Any:
        """Run `decide` on rank 0 and share its result, or its error, with every rank: all ranks
        go on with the same value or all raise the same CheckpointError."""
        outcome: tuple[str, Any] = ("ok", None)
        if self.dist.is_main:
            try:
                outcome = ("ok", decide())
            except CheckpointError as e:
                outcome = (type(e).__name__, str(e))
        kind, value = broadcast_object(outcome)
        if kind != "ok":
            raise {"CorruptCheckpoint": CorruptCheckpoint, "RunDirError": RunDirError}.get(kind, CheckpointError)(value)
        return value

    def _resume(self) -> str | None:
        """Load the checkpoint trainer.resume names (auto: the newest loadable one in
        checkpoint.dir, falling back past damaged ones, including damage found only while
        loading) and return its path; None when the run starts fresh, which is refused where
        an earlier run's checkpoints or metrics would be overwritten."""
        resume = self.cfg.trainer.resume
        if resume == "none":
            self._agree(lambda: self._guard_fresh_start("trainer.resume=none"))
            return None
        problems: list[str] = []
        candidates = self._agree(lambda: self._resume_candidates(resume, problems))
        for path in candidates:
            try:
                self.load_checkpoint(path)
                return path
            except CorruptCheckpoint as e:  # every rank sees the failure (DCP gathers them)
                if resume != "auto":
                    raise CorruptCheckpoint(f"trainer.resume: {e}") from e
                problems.append(str(e))
                if self.dist.is_main:
                    log.warning("skipping checkpoint: %s", e)
        if problems:
            raise no_loadable_checkpoint(self.checkpoint_dir, problems)
        self._agree(lambda: self._guard_fresh_start("there is no checkpoint to resume from (trainer.resume=auto)"))
        return None

    def _resume_candidates(self, resume: str, problems: list[str]) -> list[str]:
        checksum = self.cfg.checkpoint.checksum
        if resume == "auto":
            found = [str(p) for p in resume_candidates(self.checkpoint_dir, checksum=checksum, problems=problems)]
            if problems and not found:
                raise no_loadable_checkpoint(self.checkpoint_dir, problems)
            return found
        try:
            return [str(resolve_checkpoint(resume, checksum=checksum))]
        except CheckpointError as e:
            raise type(e)(f"trainer.resume: {e}") from e

    def _guard_fresh_start(self, why: str) -> None:
        archived = guard_fresh_start(
            self.cfg.run_dir,
            self.checkpoint_dir,
            self.cfg.logging.metrics_file,
            archive=self.cfg.trainer.archive_previous_run,
            why=why,
        )
        if archived is not None:
            log.warning("trainer.archive_previous_run: the earlier run is now in %s", archived)

    def _check_checkpoint_space(self) -> None:
        """Before the first step, not at the first save: the checkpoint directory takes a file,
        and has room for one checkpoint (the parameters and the optimizer's copies of them, in
        fp32; a lower bound: the real one also holds small state)."""
        check_writable(self.checkpoint_dir, "checkpoint.dir")
        o = self.cfg.optim
        copies = {"adamw": 2, "muon": 1, "schedule_free_adamw": 2}.get(o.inner, 1)
        copies += {"snoo": 2, "gpa": 1, "ema_nesterov": 1}.get(o.outer, 0)
        per_replica = self.cfg.parallel.replicas if is_diloco(self.cfg) else 1
        check_free_space(self.checkpoint_dir, 4 * self.num_params * (1 + copies) * per_replica, "checkpoint.dir")

    def _checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be loaded into this run."""
        return {
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
            "model": {**OmegaConf.to_container(OmegaConf.structured(self.cfg.model)), "vocab_size": self.vocab_size},
            "optim": {"name": self.cfg.optim.name, "inner": self.cfg.optim.inner, "outer": self.cfg.optim.outer},
            "replicas": self.cfg.parallel.replicas,
            "world_size": self.dist.world_size,
        }

    def _check_checkpoint_meta(self, saved: dict[str, Any], saved_world_size: int) -> None:
        """Refuse a checkpoint this run cannot continue (before any tensor is read), and note the
        hyper-parameters that changed since it was written (applied after loading)."""
        problem = next(
            (f"meta.{k}" for k, kind in (("model", dict), ("optim", dict), ("config", dict)) if not isinstance(saved.get(k), kind)),
            None,
        ) or next((f"meta.optim.{k}" for k in ("name", "inner", "outer") if k not in saved["optim"]), None)
        if problem:
            raise CorruptCheckpoint(f"malformed state.json: {problem} is missing or not what the trainer writes")
        here = self._checkpoint_meta()
        diffs = [
            f"model.{k}={saved['model'].get(k)!r} (this run: {v!r})"
            for k, v in here["model"].items()
            if k != "name" and saved["model"].get(k) != v
        ]
        if diffs:
            raise CheckpointError(
                f"the checkpoint was written for a different model ({saved['model'].get('name')}): "
                + ", ".join(diffs)
            )
        for key in ("inner", "outer"):
            if saved["optim"][key] != here["optim"][key]:
                raise CheckpointError(
                    f"the checkpoint was written with optim.{key}={saved['optim'][key]} "
                    f"(this run: {here['optim'][key]}); its optimizer state does not fit"
                )
        if saved.get("replicas", 1) != here["replicas"]:
            raise CheckpointError(
                f"the checkpoint has parallel.replicas={saved.get('replicas', 1)} (this run: "
                f"{here['replicas']}): each replica's fast weights and inner state are saved apart"
            )
        if isinstance(saved.get("config"), dict):
            refusals, self.config_changes = config_changes(saved["config"], here["config"])
            if refusals:
                raise CheckpointError(
                    "cannot resume: the checkpoint was written with " + "; ".join(refusals)
                    + ". Resume with its values, or start a new run in a new hydra.run.dir"
                )
        # RNG states are per rank: they only carry over to the same number of ranks.
        self._restore_rng = saved_world_size == self.dist.world_size

    def state_tree(self) -> dict[str, Any]:
        """Everything a checkpoint holds, as one tree of tensors (DTensor shards under FSDP2)
        and plain values. get_state_dict keys the optimizer state by parameter name, so DCP can
        reshard it, SNOO's slow weights and momentum included (they live in optimizer.state)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "rng": {f"rank{self.dist.rank}": rng},
            "trainer": {
                "step": self.step,
                "tokens": self.step * self.loader.tokens_per_step,
                "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips,
                "loader": self.loader.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            },
        }

    @property
    def _checkpoint_keys(self) -> Callable[[str], str] | None:
        """Per-replica keys under DiLoCo (checkpoint.replica_keys); the tree's own otherwise."""
        return replica_keys(self.dist.replica) if is_diloco(self.cfg) else None

    def save_checkpoint(self, *, blocking: bool | None = None) -> str:
        self.checkpointer.save(
            self.step, self.state_tree(), self._checkpoint_meta(), blocking=blocking, rename=self._checkpoint_keys
        )
        return os.path.join(self.checkpoint_dir, checkpoint_name(self.step))

    def load_checkpoint(self, path: str) -> None:
        # The tree to load into; on a fresh optimizer get_state_dict first creates its state
        # with one zero-learning-rate step, which the loaded values then replace.
        tree = self.state_tree()
        self._restore_rng = False
        self.checkpointer.load(
            path,
            tree,
            check_meta=self._check_checkpoint_meta,
            skip=lambda key: key.startswith("rng/") and not self._restore_rng,
            rename=self._checkpoint_keys,
        )
        set_state_dict(
            self.model, self.optimizer, model_state_dict=tree["model"], optim_state_dict=tree["optim"]
        )
        state = tree["trainer"]
        self.loader.load_state_dict(state["loader"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skips = int(state["consecutive_skips"])
        if self._restore_rng:
            rng = tree["rng"][f"rank{self.dist.rank}"]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.dist.device)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step; returns (loss averaged over ranks and micro-batches, grad norm)."""
        self.model.train()
        micro_batches = self.loader.next_step()
        loss_sum = torch.zeros((), device=self.dist.device)
        for batch in micro_batches:
            with self.autocast:
                # Equal-size micro-batches of packed windows: scaling each mean by 1/n makes the
                # accumulated gradient the gradient of the mean over all of them.
                loss = causal_lm_loss(
                    self.model, self._to_device(batch), router=self.router
                ) / len(micro_batches)
            loss.backward()
            loss_sum += loss.detach()

        loss_value = all_reduce_mean(loss_sum.item(), self.dist.device)
        # Both checks see global values (the loss is averaged over ranks, the norm is the global
        # norm), so every rank takes the same decision.
        grad_norm = (
            clip_grad_norm(self.model.parameters(), self.cfg.trainer.grad_clip)
            if math.isfinite(loss_value)
            else float("nan")
        )
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self._nonfinite_step(step, loss_value, grad_norm)  # raises unless the policy is skip
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value, grad_norm, True
        self.consecutive_skips = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, grad_norm, False

    def _nonfinite_step(self, step: int, loss: float, grad_norm: float) -> None:
        """trainer.nonfinite: `stop` raises before optimizer.step(), so the weights, the optimizer
        state and every saved checkpoint stay finite; `skip` drops this step's gradients and
        leaves the optimizer (its state, SNOO's step counter) and the LR schedule untouched."""
        t = self.cfg.trainer
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
                f"(trainer.nonfinite_max_skips={t.nonfinite_max_skips}); lower optim.lr (now {self.cfg.optim.lr})"
            )
        hint = " or set trainer.grad_clip (now 0)" if not t.grad_clip else ""
        if self.cfg.optim.outer == "snoo":
            hint += f", or lower optim.outer_lr (now {self.cfg.optim.outer_lr})"
        raise TrainingDiverged(
            f"{what} at step {step}; lower optim.lr (now {self.cfg.optim.lr}){hint}, or set "
            "trainer.nonfinite=skip (this step was not applied and nothing was saved from it)"
        )

    @property
    def eval_sequence(self) -> str:
        """Which weights evaluation sees: the optimizer's `eval_sequence` (SNOO: "slow"; GPA,
        Schedule-Free: "x"), "params" for optimizers without one."""
        return getattr(self.optimizer, "eval_sequence", "params")

    @contextmanager
    def _evaluation_weights(self) -> Iterator[None]:
        """The optimizer's evaluation point (`eval_parameters()`: SNOO's slow weights, GPA's and
        Schedule-Free's x) for the duration of an evaluation; plain parameters for AdamW.

        The optimizers swap weights in the sharded parameters. FSDP2 keeps some groups gathered after a
        forward with no backward (the root and the last layer: reshard_after_forward=False), and
        a later forward would reuse those gathered copies: resharding on both sides of the swap
        keeps the slow weights out of training and the fast ones out of evaluation."""
        self._reshard()
        swap = getattr(self.optimizer, "eval_parameters", None)
        with swap() if swap is not None else nullcontext():
            try:
                yield
            finally:
                self._reshard()

    def _reshard(self) -> None:
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss per token over all ranks, at SNOO's slow weights."""
        t = self.cfg.trainer
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        tokens = 0
        # Same sequences as eval_batches x batch_size, in training-sized micro-batches.
        batches = eval_batches(
            self.val_set,
            batch_size=t.batch_size // t.grad_accum,
            num_batches=t.eval_batches * t.grad_accum,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        with self._evaluation_weights():
            for batch in batches:
                batch = self._to_device(batch)
                with self.autocast:
                    loss_sum += causal_lm_loss(self.model, batch, reduction="sum")
                tokens += batch["labels"].numel()
        total, count = all_reduce_sum([loss_sum.item(), float(tokens)], self.dist.device)
        return total / count if count else float("nan")  # nan: no held-out data (val_fraction=0)

    def fit(self) -> dict[str, Any]:
        """Train from self.step (0, or the resumed step) to trainer.max_steps, logging, evaluating
        and checkpointing on their intervals. SIGTERM/SIGUSR1 end the loop after the current
        step with a checkpoint (raises Preempted)."""
        t = self.cfg.trainer
        interval = self.cfg.checkpoint.interval
        tokens_per_step = self.loader.tokens_per_step
        meter = Throughput()
        window: list[float] = []
        loss = val_loss = float("nan")
        train_time = eval_time = 0.0
        first_step = self.step + 1
        # The entry point installs its handler before anything slow; a library caller gets one here.
        preemption = process_handler() or PreemptionHandler()
        try:
            if self._preemption_requested(preemption):
                # Signalled while starting up: nothing new to save, leave for the requeue at once.
                raise Preempted(self.step, preemption.signum, self.resumed_from, before_start=True)
            for step in range(first_step, t.max_steps + 1):
                lr = self.optimizer.param_groups[0]["lr"]
                loss, grad_norm, skipped = self.train_step(step)
                self.step = step
                meter.add(tokens_per_step)
                if not skipped:
                    window.append(loss)
                self.metrics.advance(step)

                last = step == t.max_steps
                evaluate = last or (t.eval_interval > 0 and step % t.eval_interval == 0)
                if evaluate or step == first_step or step % t.log_interval == 0:
                    record = self._step_record(step, window, lr, grad_norm, meter)
                    window.clear()
                    if evaluate:
                        t0 = time.perf_counter()
                        val_loss = self.evaluate()
                        dt = time.perf_counter() - t0
                        meter.pause(dt)
                        eval_time += dt
                        record["val_loss"] = val_loss
                        record["val_weights"] = self.eval_sequence
                    self.metrics.log(record)

                self.checkpointer.poll()
                preempted = self._preemption_requested(preemption)
                if preempted or (interval > 0 and (step % interval == 0 or last)):
                    t0 = time.perf_counter()
                    # The preemption and final checkpoints must be on disk before the process
                    # exits; the others may be written in the background (checkpoint.async_save).
                    path = self.save_checkpoint(blocking=True if preempted or last else None)
                    meter.pause(time.perf_counter() - t0)
                if preempted:
                    self.checkpointer.wait()
                    raise Preempted(step, preemption.signum, path)
            train_time = meter.elapsed() - eval_time
            if self.step >= t.max_steps and first_step > t.max_steps:
                log.info("the checkpoint is at trainer.max_steps=%d already: evaluating only", t.max_steps)
                val_loss = self.evaluate()
            self.checkpointer.wait()
        finally:
            if preemption is not process_handler():
                preemption.close()
            self.checkpointer.close()
            self.metrics.close()
        steps_run = max(t.max_steps - first_step + 1, 0)
        summary = {
            "steps": t.max_steps,
            "steps_this_session": steps_run,
            "resumed_from": self.resumed_from,
            "skipped_steps": self.skipped_steps,
            "final_loss": loss,
            "final_val_loss": val_loss,
            "tokens": t.max_steps * tokens_per_step,
            "flops_per_token": self.flops_per_token,
            "tokens_per_s": steps_run * tokens_per_step / max(train_time, 1e-9),
            "train_time_s": train_time,
            "eval_time_s": eval_time,
            "peak_mem_bytes": peak_memory_bytes(self.dist.device),
            "params": self.num_params,
            "world_size": self.dist.world_size,
            "run_dir": self.cfg.run_dir,
        }
        return summary

    def _step_record(
        self, step: int, window: list[float], lr: float, grad_norm: float, meter: Throughput
    ) -> dict[str, Any]:
        tokens_per_step = self.loader.tokens_per_step
        tokens_per_s = meter.tick()
        record: dict[str, Any] = {
            "step": step,
            "loss": sum(window) / len(window) if window else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step * tokens_per_step,
            # Model FLOPs so far (the MFU numerator), for plots against compute.
            "flops": step * tokens_per_step * self.flops_per_token,
            "tokens_per_s": tokens_per_s,
            "elapsed_s": meter.elapsed(),
            "peak_mem_bytes": peak_memory_bytes(self.dist.device),
        }
        if self.peak_flops:
            record["mfu"] = (
                tokens_per_s * self.flops_per_token / (self.peak_flops * self.dist.world_size)
            )
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        if self.is_snoo:
            record.update(self.optimizer.outer_metrics())
        if self.router is not None:
            record.update(self.router.metrics(lambda v: all_reduce_sum(v, self.dist.device)))
        return record

    def _preemption_requested(self, handler: PreemptionHandler) -> bool:
        """True on every rank if any rank was signalled: all stop after the same step."""
        if self.dist.world_size == 1:
            return handler.requested
        anywhere = all_reduce_max(float(handler.signum), self.dist.device)
        if anywhere and not handler.requested:
            handler.signum = int(anywhere)
        return anywhere > 0


# -- entry point ---------------------------------------------------------------------------


def reject_unknown_keys(dcfg: DictConfig) -> None:
    """Hydra lets `+trainer.max_step=5` add a key to a structured config; nothing would read
    it, so a typo would pass silently. Refuse every key the Config schema does not have."""

    def unknown(node: dict, schema: dict, prefix: str) -> list[str]:
        keys = []
        for key, value in node.items():
            if key not in schema:
                keys.append(f"{prefix}{key}")
            elif isinstance(value, dict) and isinstance(schema[key], dict):
                keys += unknown(value, schema[key], f"{prefix}{key}.")
        return keys

    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    extra = unknown(OmegaConf.to_container(dcfg, resolve=False), schema, "")
    if extra:
        raise ConfigError(
            f"unknown config key(s): {', '.join(extra)} (not in snoo_train.config.Config)"
        )


def run(cfg: Config, run_dir: str) -> dict[str, Any]:
    """Validate, join the process group, train, and leave the group. Rank 0 writes the files."""
    validate_config(cfg, world_size=env_world_size())
    info = init_distributed(cfg.trainer.device, replicas=cfg.parallel.replicas)
    clean = False
    try:
        if not info.is_main:
            log.setLevel(logging.WARNING)
        # Hydra resolves ${now:} per process: rank 0's run directory is the one all ranks use.
        cfg.run_dir = broadcast_object(os.path.abspath(run_dir))
        # One run per run directory: a second one would write into the first one's saves.
        locked: tuple[RunDirLock | None, str | None] = (None, None)
        if info.is_main:
            try:
                check_writable(cfg.run_dir, "the run directory")
                locked = (RunDirLock(cfg.run_dir).acquire(), None)
            except RunDirError as e:
                locked = (None, str(e))
        error = broadcast_object(locked[1])
        if error:
            raise RunDirError(error)
        lock = locked[0]
        try:
            if lock is not None and lock.stale_holder:
                log.warning("took over the run directory lock of a run that ended without releasing it (%s)", lock.stale_holder)
            trainer = Trainer(cfg, info)
            if info.is_main:
                # After the resume checks: a refused resume leaves the recorded config as it was.
                # From here on it is the truth, changed hyper-parameters included.
                OmegaConf.save(OmegaConf.structured(cfg), os.path.join(cfg.run_dir, "config.yaml"))
            summary = trainer.fit()
        except (Preempted, TrainingDiverged, CheckpointError):
            clean = True  # every rank stopped at the same step, or took the same decision: leave together
            raise
        finally:
            if lock is not None:
                lock.release()
        if info.is_main:
            with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            log.info(
                "done: %d steps, final val_loss %.4f, %.0f tokens/s, %.1f s training; %s",
                summary["steps"],
                summary["final_val_loss"],
                summary["tokens_per_s"],
                summary["train_time_s"],
                cfg.run_dir,
            )
        clean = True
        return summary
    finally:
        destroy_distributed(clean=clean)


# The configs ship inside the package (package data), so a wheel install trains from any directory.
# An absolute path: Hydra resolves a relative one against the importing module, which differs
# between `python -m snoo_train.train` and the `snoo-train` console script.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


def group_sweep_runs(cfg: Config) -> None:
    """Under `-m` (multirun) the runs of one sweep share a wandb group, the sweep directory, and
    each run is named by its job number and overrides, so wandb shows the sweep as one unit.
    A group or name set in the config wins."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    wb = cfg.logging.wandb
    if wb.group is None:
        wb.group = str(hydra_cfg.sweep.dir)
    if wb.name is None:
        wb.name = f"{hydra_cfg.job.num}" + (
            f" {hydra_cfg.job.override_dirname}" if hydra_cfg.job.override_dirname else ""
        )


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        reject_unknown_keys(dcfg)
        cfg: Config = OmegaConf.to_object(dcfg)
        group_sweep_runs(cfg)
        run(cfg, HydraConfig.get().runtime.output_dir)
    except Preempted as e:
        # The checkpoint is on disk: exit with the status the launchers turn into a requeue.
        if env_rank() == 0:
            print(f"preempted: {e}; resume with trainer.resume=auto", file=sys.stderr)
        report_requeue_status()  # every node's launcher reads its own file
        sys.exit(REQUEUE_EXIT_CODE)
    except (ConfigError, DataError, TrainingDiverged, CheckpointError, FileNotFoundError) as e:
        # Bad input gets one clear line, not a traceback.
        if env_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def accept_async_alias(args: list[str]) -> list[str]:
    """`async` is a Python keyword, so the config field is checkpoint.async_save; accept the
    short spelling `checkpoint.async=...` on the command line too."""
    return [re.sub(r"^(\+{0,2})checkpoint\.async=", r"\1checkpoint.async_save=", a) for a in args]


def main() -> None:
    sys.argv = accept_async_alias(sys.argv)
    if env_world_size() > 1 and env_rank() > 0:
        # Only rank 0 keeps Hydra's run directory (.hydra/, train.log). The others would create
        # their own, named by their own clock; they learn rank 0's directory after start-up.
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    try:
        _hydra_main()
        status: int | str | None = 0
    except SystemExit as e:
        status = e.code
    exit_process(status)


if __name__ == "__main__":
    main()
