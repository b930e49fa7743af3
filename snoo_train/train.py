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

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
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
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from snoo_train.config import Config, ConfigError, validate_config
from snoo_train.data import BatchLoader, DataError, build_datasets, build_tokenizer, eval_batches
from snoo_train.dist import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    broadcast_object,
    destroy_distributed,
    env_rank,
    env_world_size,
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
from snoo_train.schedule import build_scheduler

# The schema every YAML in configs/ is merged into (configs/config.yaml lists it first).
ConfigStore.instance().store(name="base_config", node=Config)

log = logging.getLogger("snoo_train")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


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


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW (or Muon, optim.inner=muon) on the fast weights, wrapped by SNOO when optim.outer=snoo.

    Muon takes the parameter categories in optim.muon_categories at optim.muon_lr; the rest
    (embedding, head, norms, router) get its AdamW rule at optim.lr."""
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
        return SNOO(
            inner, k=cfg.k, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=cfg.nesterov
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
    global norm."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
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
        )
        materialize(self.model, device=device, seed=t.seed)
        # FSDP2 casts parameters itself; a single process gets bf16 compute from autocast.
        self.autocast = (
            torch.autocast(device.type, dtype=dtype)
            if dtype is not None and dist.mesh is None
            else nullcontext()
        )

        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.is_snoo = isinstance(self.optimizer, SNOO)
        m = cfg.model
        self.router = (
            RouterStats(m.num_experts, m.num_experts_per_tok, m.router_aux_loss_coef)
            if m.family == "moe"
            else None
        )
        self.scheduler = build_scheduler(self.optimizer, t)

        self.flops_per_token = flops_per_token(cfg.model, vocab_size, cfg.data.seq_len)
        self.peak_flops = peak_flops(device, t.peak_flops)
        self.metrics = MetricsLogger(
            cfg.run_dir,
            cfg,
            dist.rank,
            total_steps=t.max_steps,
            resolved_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        )
        self.metrics.message(
            f"model {cfg.model.name}: {self.num_params / 1e6:.2f}M params, vocab {vocab_size} | "
            f"optim {cfg.optim.name} | world size {dist.world_size} on {device.type} | "
            f"{self.loader.tokens_per_step} tokens/step | run dir {cfg.run_dir}"
        )

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
        if not math.isfinite(loss_value):
            # Before optimizer.step(): the weights stay finite for inspection or a checkpoint.
            hint = " or set trainer.grad_clip (now 0)" if not self.cfg.trainer.grad_clip else ""
            raise TrainingDiverged(
                f"training loss is {loss_value} at step {step}; lower optim.lr (now {self.cfg.optim.lr}){hint}"
            )
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.trainer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, grad_norm

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
        t = self.cfg.trainer
        tokens_per_step = self.loader.tokens_per_step
        meter = Throughput()
        window: list[float] = []
        loss = val_loss = float("nan")
        train_time = eval_time = 0.0
        try:
            for step in range(1, t.max_steps + 1):
                lr = self.optimizer.param_groups[0]["lr"]
                loss, grad_norm = self.train_step(step)
                meter.add(tokens_per_step)
                window.append(loss)
                self.metrics.advance(step)

                last = step == t.max_steps
                evaluate = last or (t.eval_interval > 0 and step % t.eval_interval == 0)
                if not (evaluate or step == 1 or step % t.log_interval == 0):
                    continue
                tokens_per_s = meter.tick()
                record: dict[str, Any] = {
                    "step": step,
                    "loss": sum(window) / len(window),
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
                        tokens_per_s
                        * self.flops_per_token
                        / (self.peak_flops * self.dist.world_size)
                    )
                if self.is_snoo:
                    record.update(self.optimizer.outer_metrics())
                if self.router is not None:
                    record.update(
                        self.router.metrics(lambda v: all_reduce_sum(v, self.dist.device))
                    )
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
            train_time = meter.elapsed() - eval_time
        finally:
            self.metrics.close()
        summary = {
            "steps": t.max_steps,
            "final_loss": loss,
            "final_val_loss": val_loss,
            "tokens": t.max_steps * tokens_per_step,
            "flops_per_token": self.flops_per_token,
            "tokens_per_s": t.max_steps * tokens_per_step / max(train_time, 1e-9),
            "train_time_s": train_time,
            "eval_time_s": eval_time,
            "peak_mem_bytes": peak_memory_bytes(self.dist.device),
            "params": self.num_params,
            "world_size": self.dist.world_size,
            "run_dir": self.cfg.run_dir,
        }
        return summary


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
    info = init_distributed(cfg.trainer.device)
    clean = False
    try:
        if not info.is_main:
            log.setLevel(logging.WARNING)
        # Hydra resolves ${now:} per process: rank 0's run directory is the one all ranks use.
        cfg.run_dir = broadcast_object(os.path.abspath(run_dir))
        if info.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            OmegaConf.save(OmegaConf.structured(cfg), os.path.join(cfg.run_dir, "config.yaml"))
        summary = Trainer(cfg, info).fit()
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


# An absolute path: Hydra resolves a relative one against the importing module, which differs
# between `python -m snoo_train.train` and the `snoo-train` console script.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


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
    except (ConfigError, DataError, TrainingDiverged, FileNotFoundError) as e:
        # Bad input gets one clear line, not a traceback.
        if env_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    if env_world_size() > 1 and env_rank() > 0:
        # Only rank 0 keeps Hydra's run directory (.hydra/, train.log). The others would create
        # their own, named by their own clock; they learn rank 0's directory after start-up.
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    _hydra_main()


if __name__ == "__main__":
    main()
