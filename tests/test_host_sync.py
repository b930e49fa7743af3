"""Steps that do not log never wait for the device (issue 14 part 6), and trainer.nonfinite=skip
masks exactly the bad steps on the device.

A host read of a device value is an `aten::_local_scalar_dense` op (`.item()`, `float(t)`,
`bool(t)`, `if t:`), which the torch profiler records even when a kernel calls it internally.
On this CPU-only machine every tensor is on the host, so the count also sees reads that cost
nothing on a GPU: torch's AdamW and our Muon keep their `step` counters as 0-d CPU tensors by
design (AdamW: unless capturable/fused) and read them with `.item()`; fused AdamW keeps them on
the parameters' device (here the CPU too), where its kernel reads them. A dispatch mode tells
those apart by the tensor read, but it cannot see reads made inside C++ kernels and it would
record its own ops twice in a profile, so the two instruments take turns: on some non-log steps
the mode checks that every read from Python is one of a step counter (the same number every
step), on the others the profiler checks that there are no more reads than that. `.tolist()`
and `.cpu()` copies are not ops the CPU profiler can see; the code has none on a non-log step.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from snoo_train.dist import init_distributed
from snoo_train.preemption import Preempted
from snoo_train.trainer import Trainer, TrainingDiverged
from tests.conftest import make_config, poison_losses
from tests.dist_utils import run_distributed

HOST_READS = ("aten::_local_scalar_dense",)
SYNC_FREE = ["trainer.log_interval=4", "trainer.eval_interval=0", "checkpoint.interval=0", "trainer.max_steps=8"]


def host_reads(prof: profile) -> int:
    return sum(e.name in HOST_READS for e in prof.events())


FUSED_ADAM = (torch.ops.aten._fused_adam_.default, torch.ops.aten._fused_adamw_.default)


class CounterReads(TorchDispatchMode):
    """Host reads made from Python: of the optimizer's own 0-d CPU step counters (free on a GPU
    too), and of anything else."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.counters = {
            v.data_ptr() for s in optimizer.state.values() for k, v in s.items()
            if k == "step" and isinstance(v, torch.Tensor) and v.ndim == 0 and v.device.type == "cpu"
        }  # fmt: skip
        self.n = self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in FUSED_ADAM:
            # The CPU fused kernel reads each of its step counters (state_steps) on the host from
            # C++, where this mode cannot see it; on a GPU they live on the device.
            self.n += sum(1 for t in args[5] if t.device.type == "cpu")
        if func is torch.ops.aten._local_scalar_dense.default:
            if args[0].data_ptr() in self.counters:
                self.n += 1
            else:
                self.others += 1
        return func(*args, **(kwargs or {}))


def reference_loss(model, micro_batches) -> float:
    """The step's loss by a plain forward of the model as it is before the step."""
    total = torch.zeros(())
    with torch.no_grad():
        for mb in micro_batches:
            logits = model(input_ids=mb["input_ids"], use_cache=False).logits
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), mb["labels"].reshape(-1)) / len(
                micro_batches
            )
    return float(total)


def drive(trainer: Trainer, instrument=lambda step: None):
    """Run fit() with every step's batch drawn first and its reference loss computed outside the
    step; `instrument(step)` runs a step under the "profiler" or the "counter" mode. Returns
    ({step: reference loss}, {step: (instrument, reads...)}, {step: skipped})."""
    refs, reads, skipped = {}, {}, {}
    next_step, run_step, one_step = trainer.loader.next_step, trainer.train_step, trainer._one_step

    def train_step(step):
        out = run_step(step)
        skipped[step] = out[2]
        return out

    def wrapped(step, first_step, preemption):
        batch = next_step()
        refs[step] = reference_loss(trainer.model, batch)
        trainer.loader.next_step = lambda: batch
        how = instrument(step)
        if how == "profiler":
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                one_step(step, first_step, preemption)
            reads[step] = (how, host_reads(prof))
        elif how == "counter":
            with CounterReads(trainer.optimizer) as counters:
                one_step(step, first_step, preemption)
            reads[step] = (how, counters.n, counters.others)
        else:
            one_step(step, first_step, preemption)

    trainer._one_step, trainer.train_step = wrapped, train_step
    trainer.fit()
    return refs, reads, {s: bool(v) for s, v in skipped.items()}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_log(refs: dict[int, float], log_steps: list[int], bad: set[int] = frozenset()) -> dict[int, float]:
    """The mean reference loss of the good steps since the previous log step."""
    out, since = {}, 0
    for step in log_steps:
        good = [refs[s] for s in range(since + 1, step + 1) if s not in bad]
        out[step] = sum(good) / len(good) if good else math.nan
        since = step
    return out


def test_the_counter_sees_a_host_read():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        float(torch.ones(()) * 2)
        bool(torch.ones(()) > 0)
    assert host_reads(prof) == 2


# Fused AdamW (optim/kernels.py): its step counters live with the parameters (here the CPU) and
# only its kernel reads them (CounterReads counts those reads).
FUSED = "optim.implementation=fused"


# Streaming DiLoCo: syncs start after steps 2, 4, 6 and land after 3, 5, 7.
STREAMING = "optim.k=4 optim.fragments=2 optim.sync_delay=1"


@pytest.mark.parametrize("optim", ["snoo_adamw", "muon", f"snoo_adamw {FUSED}", f"muon {FUSED}", f"snoo_adamw {STREAMING}"])
def test_a_step_that_does_not_log_never_reads_the_device(tmp_path, optim):
    overrides = [f"optim={optim.split()[0]}", *optim.split()[1:], *SYNC_FREE]
    trainer = Trainer(make_config(tmp_path / "run", overrides), init_distributed("cpu"))
    # Step 1 logs (the first of a session); so do 4 and 8.
    turns = {2: "counter", 3: "counter", 5: "profiler", 6: "profiler", 7: "profiler"}
    refs, reads, _ = drive(trainer, instrument=turns.get)
    assert {s: r[0] for s, r in reads.items()} == turns
    counter_reads = {r[1] for r in reads.values() if r[0] == "counter"}
    assert all(r[2] == 0 for r in reads.values() if r[0] == "counter"), reads  # from Python: counters only
    (per_step,) = counter_reads
    assert per_step > 0  # the instrument is on: the optimizer did read its counters
    for step, (_, total) in ((s, r) for s, r in reads.items() if r[0] == "profiler"):
        assert total - per_step == 0, f"step {step}: {total - per_step} host reads of device values"

    logged = {r["step"]: r["loss"] for r in records(tmp_path / "run")}
    assert sorted(logged) == [1, 4, 8]
    want = expected_log(refs, [1, 4, 8])
    for step in logged:
        assert logged[step] == pytest.approx(want[step], rel=1e-6, abs=0), step


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Parameters and every state tensor but the host step counters."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    out = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for p, state in trainer.optimizer.state.items():
        out.update({f"{names[p]}/{k}": v.clone() for k, v in state.items() if torch.is_tensor(v) and v.ndim > 0})
    return out


def test_skip_masks_exactly_the_bad_steps_and_logs_the_good_ones(tmp_path, monkeypatch):
    # Step 1 is bad before the optimizer has state (decided on the host, once); 4 and 5 are
    # masked on the device, 5 being SNOO's outer step (k=5 in these configs).
    bad = {1, 4, 5}
    poison_losses(monkeypatch, bad)
    cfg = make_config(tmp_path / "run", ["trainer.nonfinite=skip", *SYNC_FREE])
    trainer = Trainer(cfg, init_distributed("cpu"))
    states = {}
    run_step = trainer.runner.run

    def run(step, micro_batches):
        before = _weights(trainer)
        out = run_step(step, micro_batches)
        states[step] = (before, _weights(trainer))
        return out

    trainer.runner.run = run
    refs, _, skipped = drive(trainer)
    assert {s for s, was in skipped.items() if was} == bad
    for step, (before, after) in states.items():
        same = [k for k in before if k in after and torch.equal(before[k], after[k])]
        if step in bad:
            assert sorted(after) == sorted(before) and len(same) == len(before), f"step {step} was applied"
        else:
            assert not any(k.count("/") == 0 for k in same), f"step {step} left a parameter unchanged"
    logged = {r["step"]: r for r in records(tmp_path / "run")}
    want = expected_log(refs, [1, 4, 8], bad)
    assert logged[1]["loss"] is None and math.isnan(want[1])  # strict JSON: NaN is written as null
    for step in (4, 8):
        assert logged[step]["loss"] == pytest.approx(want[step], rel=1e-6, abs=0), step
    assert logged[4]["skipped_steps"] == 2 and logged[8]["skipped_steps"] == 3


OPTIMS = ["adamw", "muon", "snoo_adamw", "snoo_muon", "lookahead_adamw", "gpa_adamw", "ema_nesterov_adamw",
          "schedule_free_adamw"]  # fmt: skip


@pytest.mark.parametrize("optim", OPTIMS)
def test_skip_restores_weights_and_state_bitwise_for_every_optimizer(tmp_path, monkeypatch, optim):
    poison_losses(monkeypatch, {3})
    overrides = [f"optim={optim}", "trainer.nonfinite=skip", "trainer.max_steps=4", *SYNC_FREE[:3]]
    trainer = Trainer(make_config(tmp_path / "run", overrides), init_distributed("cpu"))
    for step in (1, 2):
        trainer.train_step(step)
    before = _weights(trainer)
    assert bool(trainer.train_step(3)[2])
    after = _weights(trainer)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert not bool(trainer.train_step(4)[2])
    applied = _weights(trainer)
    assert any(not torch.equal(applied[k], after[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in applied.values())


def test_stop_names_the_first_bad_step_and_the_range_at_the_next_log_step(tmp_path, monkeypatch):
    poison_losses(monkeypatch, {2})
    trainer = Trainer(make_config(tmp_path / "run", SYNC_FREE), init_distributed("cpu"))
    with pytest.raises(TrainingDiverged) as failure:
        trainer.fit()
    message = str(failure.value)
    assert "\n" not in message
    assert "training loss is nan at step 2 (3 non-finite steps in steps 2-4), found at step 4" in message
    assert [r["step"] for r in records(tmp_path / "run")] == [1]  # nothing from the bad steps


def _preempt_one_rank(rank: int, world_size: int, run_dir: str) -> None:
    overrides = [*SYNC_FREE, "trainer.log_interval=100", "trainer.preemption_check_interval=3"]
    trainer = Trainer(make_config(Path(run_dir), overrides), init_distributed("cpu"))
    run_step = trainer.train_step

    def train_step(step):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled, during step 2
        return run_step(step)

    trainer.train_step = train_step
    with pytest.raises(Preempted) as stopped:
        trainer.fit()
    # Step 2 is not an agreement step (no log, no checkpoint, 2 % 3 != 0): both ranks go on to
    # step 3, agree there, save and stop after the same step.
    assert stopped.value.step == 3 and trainer.step == 3
    assert stopped.value.checkpoint.endswith("step_00000003")
    assert (Path(run_dir) / "checkpoints" / "step_00000003").is_dir()


@pytest.mark.slow
def test_ranks_agree_on_a_preemption_at_the_next_check_step_and_stop_together(tmp_path):
    run_distributed(_preempt_one_rank, 2, str(tmp_path / "run"))
