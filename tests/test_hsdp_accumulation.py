"""HSDP with gradient accumulation (parallel.replicas=2, optim.outer=none, trainer.grad_accum=2,
4 gloo ranks = 2 replicas x 2 shards): gradients cross replicas once per step, on the last
micro-batch, not on every one (StepRunner.accumulate_across_replicas), while every micro-batch is
still reduce-scattered within its replica. The step's loss, gradients and parameters equal those of
the same step with the all-reduce on every micro-batch (FSDP's default), which this test takes as
its reference; the collectives are counted per process group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed
from tests.test_diloco import CollectiveRecorder

R, S = 2, 2
OVERRIDES = ["optim=adamw", f"parallel.replicas={R}", "trainer.grad_accum=2", "trainer.log_interval=100"]


def _one_step(trainer) -> dict:
    """One optimizer step; the gradients as the optimizer saw them (this rank's shards) and the
    collectives it issued, by op and process group."""
    grads: dict[str, torch.Tensor] = {}
    names = {p: n for n, p in trainer.model.named_parameters()}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({names[p]: p.grad.to_local().clone() for p in names if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    with CollectiveRecorder() as recorder:
        loss, _, _ = trainer.train_step(1)
    params = {n: p.to_local().detach().clone() for n, p in trainer.model.named_parameters()}
    return {"loss": float(loss), "grads": grads, "params": params, "ops": recorder.ops}


def _both_ways(rank: int, world_size: int, out_dir: str) -> None:
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer
    from tests.conftest import make_config

    info = init_distributed("cpu", replicas=R)
    out = {"replicate": tuple(dist.get_process_group_ranks(info.replicate_group))}
    for name, defer in (("deferred", True), ("every_micro_batch", False)):
        cfg = make_config(Path(out_dir) / name, OVERRIDES, world_size=world_size)
        trainer = Trainer(cfg, info)
        trainer.runner.defer_all_reduce = defer
        out[name] = _one_step(trainer)
        out["fsdp_modules"] = len(trainer.runner.fsdp_modules)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("hsdp")
    run_distributed(_both_ways, R * S, str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(R * S)]


def _count(ops, name: str, group: tuple[int, ...]) -> int:
    return sum(1 for op, g in ops if name in op and g == group)


@pytest.mark.slow
def test_one_all_reduce_across_replicas_per_step_and_the_same_step(runs):
    for rank, run in enumerate(runs):
        deferred, every = run["deferred"], run["every_micro_batch"]
        assert deferred["loss"] == pytest.approx(every["loss"], abs=1e-6)
        assert deferred["grads"].keys() == every["grads"].keys() and deferred["grads"]
        for name, g in deferred["grads"].items():
            torch.testing.assert_close(g, every["grads"][name], rtol=0, atol=1e-6, msg=f"rank {rank} grad {name}")
        for name, p in deferred["params"].items():
            torch.testing.assert_close(p, every["params"][name], rtol=0, atol=1e-6, msg=f"rank {rank} {name}")

        # One all-reduce per FSDP group across the replicas, instead of one per micro-batch.
        replicate, shard = run["replicate"], tuple(range(rank - rank % S, rank - rank % S + S))
        groups = run["fsdp_modules"]
        assert _count(deferred["ops"], "allreduce", replicate) == groups
        assert _count(every["ops"], "allreduce", replicate) == 2 * groups
        # The reduce-scatter within the replica stays on every micro-batch (each rank keeps only
        # its shard of the gradient).
        assert _count(deferred["ops"], "reduce_scatter", shard) == _count(every["ops"], "reduce_scatter", shard)
        assert _count(deferred["ops"], "reduce_scatter", shard) == 2 * groups
