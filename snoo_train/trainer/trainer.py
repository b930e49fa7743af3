"""The Trainer: builds data, model, optimizer and its components from a validated Config, then
runs the loop. Each component decides its own interval:

    for step in ...:
        StepRunner.run            (step.py)       batch -> loss -> clip -> optimizer -> schedule
        MetricsLogger.should_log  (metrics.py)    a record every trainer.log_interval steps
        Evaluator.should_run      (evaluator.py)  held-out loss at the evaluation weights
        DownstreamEval.should_run (downstream.py) lm-eval tasks at the evaluation weights
        RunState.should_save      (state.py)      a checkpoint every checkpoint.interval steps
        preemption                                save and leave for a requeue (exit 75)
        StepProfiler.step         (profiler.py)   a torch profiler trace of trainer.profile's steps
    after the step at trainer.max_steps, before its evaluation and checkpoint: optimizer.flush()
    (SNOO's outer step on a partial window: the final model holds every step)

A step that does not log never waits for the device: the loss, grad norm and finite flag stay
device tensors (step.py, metrics.LossWindow) and are read at log steps; the non-finite policy
is checked there and before every checkpoint; ranks agree on a preemption signal only at log,
checkpoint and trainer.preemption_check_interval steps. Nor does it wait for data: the next
steps' batches are assembled on a background thread meanwhile, in pinned memory on CUDA
(data.prefetch, data.pin_memory: data/prefetch.py). Under DiLoCo (parallel.replicas > 1)
nothing crosses replicas between outer steps except at those log and checkpoint steps: the loss
is averaged within a replica, the replicas' loss windows and non-finite tallies are merged at log
steps, SNOO's outer all-reduce carries each replica's non-finite flag, and the periodic
preemption check moves to outer steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from snoo_train.config import (
    Config,
    ConfigError,
    ignored_optim_keys,
    is_diloco,
    pipeline_microbatches,
    pipeline_stages_per_rank,
)
from snoo_train.data import (
    BatchLoader,
    PrefetchLoader,
    build_datasets,
    pin_batches,
    resolve_tokenizer,
)
from snoo_train.dist import DistInfo, all_reduce_max, all_reduce_sum, check_same_on_every_rank
from snoo_train.metrics import LossWindow, MetricsLogger, Throughput, peak_flops, peak_memory_bytes
from snoo_train.models import (
    RouterStats,
    biased_routers,
    build_model,
    count_parameters,
    flops_per_token,
    materialize,
    parallelize,
    update_router_bias,
)
from snoo_train.models.pipeline import rank_model, split_model
from snoo_train.models.pretrained import apply_pretrained, choose_tokenizer
from snoo_train.optim import SNOO
from snoo_train.optim.build import build_optimizer
from snoo_train.optim.kernels import KernelUnavailable
from snoo_train.preemption import Preempted, PreemptionHandler, process_handler
from snoo_train.schedule import build_scheduler
from snoo_train.trainer.downstream import DownstreamEval
from snoo_train.trainer.evaluator import Evaluator
from snoo_train.trainer.nonfinite import NonFinitePolicy
from snoo_train.trainer.pipeline import Pipeline
from snoo_train.trainer.profiler import StepProfiler
from snoo_train.trainer.state import RunState
from snoo_train.trainer.step import StepRunner

log = logging.getLogger("snoo_train")


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 compute where requested (auto: on CUDA); None keeps fp32."""
    mp = cfg.trainer.mixed_precision
    if mp == "bf16" or (mp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Trainer:
    """Builds data, model and optimizer from a validated Config, then trains and evaluates."""

    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        if dist.is_main:
            # Honoured or refused elsewhere; these are neither: say so once, before the build.
            for ignored in ignored_optim_keys(cfg.optim):
                log.warning("warning: %s", ignored)
        if cfg.model.from_pretrained:  # the entry point did this already; a library caller may not have
            apply_pretrained(cfg, dist.world_size)
        choose_tokenizer(cfg)  # before the build, so the config the run records names it
        # lm-eval's tasks and datasets, checked on every rank before anything slow is built.
        self.downstream = DownstreamEval(cfg, dist)
        torch.manual_seed(cfg.trainer.seed)
        self.profiler = StepProfiler(cfg.trainer.profile, cfg.run_dir, dist)
        self._build_data()
        self._build_model()
        self._build_optimizer()
        self.step = 0  # optimizer steps taken: the resumed step, then the loop's
        # Tokens counted by the checkpoint, at its step (an elastic DiLoCo resume changes the batch).
        self.tokens_base, self.step_base = 0, 0
        self.state = RunState(self)
        self.resumed_from = self.state.resume()
        if self.resumed_from and cfg.model.from_pretrained and dist.is_main:
            log.info("model.from_pretrained=%s ignored: resumed from %s", cfg.model.from_pretrained, self.resumed_from)
        self.metrics = MetricsLogger(
            cfg.run_dir,
            cfg,
            dist.rank,
            total_steps=cfg.trainer.max_steps,
            resolved_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            resume_step=self.step if self.resumed_from is not None else None,
        )
        self.metrics.message(
            f"model {cfg.model.name}: {self.num_params / 1e6:.2f}M params, vocab {self.vocab_size} | "
            f"optim {cfg.optim.name} | world size {dist.world_size} on {dist.device.type} | "
            f"{self.loader.tokens_per_step} tokens/step | run dir {cfg.run_dir}"
            + (f" | resumed at step {self.step} from {self.resumed_from}" if self.resumed_from else "")
        )

    # -- building --

    def _build_data(self) -> None:
        t, d = self.cfg.trainer, self.dist
        self.tokenizer = resolve_tokenizer(self.cfg.data)
        # Chosen by each rank from the files it sees (choose_tokenizer): the same, or no run.
        check_same_on_every_rank(
            (self.cfg.data.tokenizer, self.tokenizer.fingerprint), "the tokenizer (data.tokenizer, fingerprint)",
            "every node must see the same tokenizer files, or set data.tokenizer",
        )
        self.train_set, self.val_set = build_datasets(self.cfg.data, self.tokenizer, seed=t.seed)
        loader = BatchLoader(
            self.train_set,
            global_batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            # The ranks of one tensor-parallel group read the same batch.
            rank=d.dp_rank,
            world_size=d.dp_size,
            seed=t.seed,
            # DiLoCo: each replica reads its own stream of the global batch (data/loader.py).
            replicas=self.cfg.parallel.replicas if is_diloco(self.cfg) else 1,
        )
        # The next steps assembled on a thread while the device computes (data.prefetch),
        # pinned for asynchronous copies (data.pin_memory); the same batches either way.
        pin = pin_batches(self.cfg.data.pin_memory, d.device)
        self.loader = PrefetchLoader(loader, steps=self.cfg.data.prefetch, pin=pin, device=d.device)

    def _build_model(self) -> None:
        """Built on the meta device and materialized after sharding: each rank only ever
        allocates its own shard, and the weights depend on the seed alone."""
        cfg, t, device = self.cfg, self.cfg.trainer, self.dist.device
        dtype = resolve_dtype(cfg, device)
        model = build_model(cfg.model, self.tokenizer.vocab_size, seed=t.seed, device="meta")
        self.num_params = count_parameters(model)
        self.vocab_size = model.config.vocab_size
        layout = dict(
            mesh=self.dist.dp_mesh,
            param_dtype=dtype if self.dist.mesh is not None else None,
            activation_checkpointing=t.activation_checkpointing,
            compile=t.compile,
            # replicas > 1: DiLoCo shards within each replica only; outer=none is HSDP.
            diloco=is_diloco(cfg),
            tp_mesh=self.dist.tp_mesh,
            loss_parallel=cfg.parallel.loss_parallel,
            ep_mesh=self.dist.ep_mesh,
            efsdp_mesh=self.dist.efsdp_mesh,
        )
        self.pipeline_stages: list[nn.Module] = []
        if cfg.parallel.pp > 1:
            p = cfg.parallel
            self.pipeline_stages, self.stage_indices = split_model(
                model, pp_rank=self.dist.pp_rank, pp=p.pp, stages_per_rank=pipeline_stages_per_rank(p),
                schedule=p.pp_schedule, layers_per_stage=p.pp_layers_per_stage,
            )  # fmt: skip
            for stage in self.pipeline_stages:
                parallelize(stage, **layout, pipeline_stage=True)
                stage.tp_mesh = self.dist.tp_mesh if self.dist.tp > 1 else None
            self.model = rank_model(self.pipeline_stages)
        else:
            self.model = parallelize(model, **layout)
        materialize(self.model, device=device, seed=t.seed, pretrained=cfg.model.from_pretrained)
        # FSDP2 casts parameters itself; a single process gets bf16 compute from autocast.
        self.autocast = (
            torch.autocast(device.type, dtype=dtype) if dtype is not None and self.dist.mesh is None else nullcontext()
        )
        self.pipeline = self._build_pipeline() if self.pipeline_stages else None
        self.flops_per_token = flops_per_token(cfg.model, self.vocab_size, cfg.data.seq_len)
        self.peak_flops = peak_flops(device, t.peak_flops)

    def _build_pipeline(self) -> Pipeline:
        p = self.cfg.parallel
        return Pipeline(
            self.pipeline_stages, self.stage_indices,
            num_stages=p.pp * pipeline_stages_per_rank(p), schedule=p.pp_schedule,
            microbatches=pipeline_microbatches(p), group=self.dist.pp_mesh.get_group(), device=self.dist.device,
            # What stages pass on: this rank's sequence shard of the hidden states, in the compute dtype.
            hidden=(self.cfg.data.seq_len // self.dist.tp, self.cfg.model.hidden_size,
                    resolve_dtype(self.cfg, self.dist.device) or torch.float32),
            sharded_logits=self.dist.tp > 1 and p.loss_parallel,
        )  # fmt: skip

    def _build_optimizer(self) -> None:
        cfg, t, m = self.cfg, self.cfg.trainer, self.cfg.model
        try:
            self.optimizer = build_optimizer(self.model, cfg.optim, replicate_group=self.dist.replicate_group, pp=self.dist.pp)
        except KernelUnavailable as e:  # optim.implementation=fused where torch cannot fuse
            raise ConfigError(str(e)) from None
        self.is_snoo = isinstance(self.optimizer, SNOO)
        self.router = (
            # With auxiliary-loss-free balancing the load metrics count the biased choice.
            RouterStats(m.num_experts, m.num_experts_per_tok, m.router_aux_loss_coef,
                        routers=biased_routers(self.model), num_layers=m.num_layers)  # fmt: skip
            if m.family == "moe"
            else None
        )
        for stage in self.pipeline_stages:  # each stage adds its own layers' balancing loss
            stage.router_stats = self.router
        self.scheduler = build_scheduler(self.optimizer, t)
        diloco = is_diloco(cfg)
        # DiLoCo: each replica decides its inner steps alone; the policy merges replicas at checks.
        self.policy = NonFinitePolicy(t, cfg.optim, replicas=cfg.parallel.replicas if diloco else 1)
        self.runner = StepRunner(
            self.model, self.optimizer, self.scheduler,
            device=self.dist.device, autocast=self.autocast, router=self.router,
            grad_clip=t.grad_clip, policy=self.policy, after_update=self._router_bias_update(),
            sharded_logits=self.dist.tp > 1 and cfg.parallel.loss_parallel,
            replica_group=self.dist.shard_mesh.get_group() if diloco else None, pipeline=self.pipeline,
        )  # fmt: skip
        self.evaluator = Evaluator(
            self.model, self.optimizer, self.val_set, t, self.dist, autocast=self.autocast,
            to_device=self.runner.to_device, pipeline=self.pipeline,
        )  # fmt: skip

    def _router_bias_update(self):
        """Auxiliary-loss-free balancing (model.router_bias_update_rate > 0): the routing bias
        moves after every applied step, from the load summed over the ranks that train together
        (one replica under DiLoCo: replicas meet only at the outer step)."""
        if not biased_routers(self.model):
            return None
        # Pipeline stages hold different layers: the loads are summed over one stage's ranks.
        dims = ("shard", "tp") if is_diloco(self.cfg) else ("replicate", "shard", "tp")
        group = self.dist.group_over(*dims) if self.dist.pp > 1 else (
            self.dist.shard_mesh.get_group() if is_diloco(self.cfg) else None
        )
        return lambda: update_router_bias(self.model, group)

    # -- the parts a benchmark or a test drives by hand --

    @property
    def checkpointer(self):
        return self.state.checkpointer

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step on the next batch: device scalars (loss, grad norm, skipped as
        non-finite), not read on the host; float() them where a number is needed."""
        return self.runner.run(step, self.loader.next_step())

    def evaluate(self) -> float:
        return self.evaluator.evaluate()

    def save_checkpoint(self, *, blocking: bool | None = None) -> str:
        return self.state.save(self.step, blocking=blocking)

    # -- the loop --

    def fit(self) -> dict[str, Any]:
        """Train from self.step (0, or the resumed step) to trainer.max_steps, logging, evaluating
        and checkpointing on their intervals. SIGTERM/SIGUSR1 end the loop after the current
        step with a checkpoint (raises Preempted)."""
        t = self.cfg.trainer
        self._meter, self._window = Throughput(), LossWindow()
        self._last_loss: torch.Tensor | None = None
        self._val_loss = float("nan")
        self._eval_time = 0.0
        first_step = self.step + 1
        # The entry point installs its handler before anything slow; a library caller gets one here.
        preemption = process_handler() or PreemptionHandler()
        try:
            if self._preemption_requested(preemption):
                # Signalled while starting up: nothing new to save, leave for the requeue at once.
                raise Preempted(self.step, preemption.signum, self.resumed_from, before_start=True)
            for step in range(first_step, t.max_steps + 1):
                with self.profiler.step(step):
                    self._one_step(step, first_step, preemption)
            # The steps since the last check (a stop run's tail, when checkpoints are off).
            self.policy.check(self.step)
            train_time = self._meter.elapsed() - self._eval_time
            if first_step > t.max_steps:
                self._val_loss = self._evaluate_only()
            self.checkpointer.wait()
        finally:
            self.profiler.close()
            if preemption is not process_handler():
                preemption.close()
            self.checkpointer.close()
            self.metrics.close()
            self.loader.close()
        return self._summary(first_step, train_time)

    def _evaluate_only(self) -> float:
        """No step to take: a checkpoint at trainer.max_steps already, or trainer.max_steps=0 on
        a fresh run, a conversion: the initial (from_pretrained) model evaluated and saved as the
        step-0 checkpoint, which `python -m snoo_train.export` reads. Nothing trained: no flush."""
        max_steps = self.cfg.trainer.max_steps
        if self.resumed_from is not None:
            log.info("the checkpoint is at trainer.max_steps=%d already: evaluating only", max_steps)
            return self.evaluate()
        save = self.state.should_save(0, preempted=False)
        log.info("trainer.max_steps=0: no training step; evaluating the model as loaded%s",
                 ", saving it as the step-0 checkpoint" if save else " (checkpoint.interval=0: no checkpoint)")
        val_loss = self.evaluate()
        if save:
            self.save_checkpoint(blocking=True)
        return val_loss

    def _one_step(self, step: int, first_step: int, preemption: PreemptionHandler) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        loss, grad_norm, skipped = self.train_step(step)
        self.step, self._last_loss = step, loss
        self._meter.add(self.loader.tokens_per_step)
        self._window.add(loss, ~skipped)
        self.metrics.advance(step)

        evaluate, downstream = self.evaluator.should_run(step), self.downstream.should_run(step)
        logs = evaluate or downstream or self.metrics.should_log(step, first_step)
        if logs:
            self.policy.check(step)  # trainer.nonfinite: stop raises here, skip warns
        if step == self.cfg.trainer.max_steps:
            self._flush_optimizer()  # checked just above: the last step always evaluates
        if logs:
            record = self._step_record(step, lr, float(grad_norm))
            if evaluate:
                self._val_loss = self._timed_eval(self.evaluate)
                record["val_loss"] = self._val_loss
                record["val_weights"] = self.evaluator.eval_sequence
            self.metrics.log(record)
            if downstream:
                self._downstream_eval(step)

        self.checkpointer.poll()
        preempted = self._preemption_agreed(preemption, step, synced=logs)
        if self.state.should_save(step, preempted=preempted):
            t0 = time.perf_counter()
            # The preemption and final checkpoints must be on disk before the process exits;
            # the others may be written in the background (checkpoint.async_save).
            last = step == self.cfg.trainer.max_steps
            path = self.save_checkpoint(blocking=True if preempted or last else None)
            self._meter.pause(time.perf_counter() - t0)
        if preempted:
            self.checkpointer.wait()
            raise Preempted(step, preemption.signum, path)

    def _timed_eval(self, run: Callable[[], Any]) -> Any:
        """`run()`, its time counted as evaluation: out of the throughput, into eval_time_s."""
        t0 = time.perf_counter()
        value = run()
        dt = time.perf_counter() - t0
        self._meter.pause(dt)
        self._eval_time += dt
        return value

    def _downstream_eval(self, step: int) -> None:
        """lm-eval's tasks at the evaluation weights: a record of their scores (the shape
        `python -m snoo_train.evaluate` appends) after the step's own, to metrics.jsonl and wandb."""
        numbers = self._timed_eval(lambda: self.downstream.run(step, self.model, self.evaluator.weights, self.autocast))
        if numbers:
            self.metrics.log({"step": step, **numbers})

    def _flush_optimizer(self) -> None:
        """The final model holds every step: SNOO's slow weights miss the inner steps since its
        last outer step when trainer.max_steps is not a multiple of optim.k, so it takes that
        outer step now, on every rank (with DiLoCo's all-reduce), before the final evaluation and
        the checkpoint at max_steps. Optimizers whose evaluation point moves every step (GPA,
        EMA-Nesterov, Schedule-Free) have nothing to do; plain ones have no `flush`."""
        flush = getattr(self.optimizer, "flush", None)
        if flush is not None:
            flush()

    def _summary(self, first_step: int, train_time: float) -> dict[str, Any]:
        t, tokens_per_step = self.cfg.trainer, self.loader.tokens_per_step
        steps_run = max(t.max_steps - first_step + 1, 0)
        return {
            "steps": t.max_steps,
            "steps_this_session": steps_run,
            "resumed_from": self.resumed_from,
            "skipped_steps": self.policy.skipped_steps,
            "final_loss": float(self._last_loss) if self._last_loss is not None else float("nan"),
            "final_val_loss": self._val_loss,
            "tokens": self.tokens_at(t.max_steps),
            "flops_per_token": self.flops_per_token,
            "tokens_per_s": steps_run * tokens_per_step / max(train_time, 1e-9),
            "train_time_s": train_time,
            "eval_time_s": self._eval_time,
            "peak_mem_bytes": peak_memory_bytes(self.dist.device),
            "params": self.num_params,
            "world_size": self.dist.world_size,
            "run_dir": self.cfg.run_dir,
            **({"downstream": self.downstream.done} if self.downstream.enabled else {}),
        }

    def tokens_at(self, step: int) -> int:
        """Training tokens consumed by the end of `step`: the checkpoint's count, then this run's
        batch per step."""
        return self.tokens_base + (step - self.step_base) * self.loader.tokens_per_step

    def _step_record(self, step: int, lr: float, grad_norm: float) -> dict[str, Any]:
        tokens_per_s = self._meter.tick()
        record: dict[str, Any] = {
            "step": step,
            # DiLoCo: each replica's window, merged here (replicas may talk at log steps).
            "loss": self._window.mean(self._sum_over_ranks if is_diloco(self.cfg) else None),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_at(step),
            # Model FLOPs so far (the MFU numerator), for plots against compute.
            "flops": self.tokens_at(step) * self.flops_per_token,
            "tokens_per_s": tokens_per_s,
            "elapsed_s": self._meter.elapsed(),
            "peak_mem_bytes": peak_memory_bytes(self.dist.device),
            # The evaluated model's norm (SNOO: the slow weights), as in the paper's section 4.
            "weight_norm": self.evaluator.weight_norm(),
        }
        if self.peak_flops:
            record["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        if self.policy.skipped_steps:
            record["skipped_steps"] = self.policy.skipped_steps
        for store, tokens in self.loader.tokens_drawn().items():
            record[f"data/tokens/{store}"] = tokens
        if self.is_snoo:
            record.update(self.optimizer.outer_metrics())
        if self.router is not None:
            record.update(self.router.metrics(lambda v: all_reduce_sum(v, self.dist.device)))
        return record

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.dist.device)

    def _preemption_agreed(self, handler: PreemptionHandler, step: int, *, synced: bool) -> bool:
        """Whether to save and stop after this step. One process reads its own flag every step;
        ranks agree (a collective whose result the host reads, i.e. a sync) only on steps that
        sync anyway (`synced`: log steps; checkpoint steps) and every
        trainer.preemption_check_interval steps, the same steps on every rank, so all stop
        after the same step. A signal is acted on at the next such step. Under DiLoCo the
        periodic check moves to outer steps, where replicas meet anyway: every
        K x ceil(interval / K) steps (nothing crosses replicas between outer steps)."""
        if self.dist.world_size > 1:
            interval = self.cfg.trainer.preemption_check_interval
            if interval and is_diloco(self.cfg):
                k = self.cfg.optim.k
                interval = k * -(-interval // k)
            due = synced or self.state.should_save(step, preempted=False) or (interval and step % interval == 0)
            if not due:
                return False
        return self._preemption_requested(handler)

    def _preemption_requested(self, handler: PreemptionHandler) -> bool:
        """True on every rank if any rank was signalled: all stop after the same step."""
        if self.dist.world_size == 1:
            return handler.requested
        anywhere = all_reduce_max(float(handler.signum))
        if anywhere and not handler.requested:
            handler.signum = int(anywhere)
        return anywhere > 0
