"""DiLoCo's replicas agree (issue 20 part 1): through Trainer.fit on 2 replicas x 2 shards (gloo,
4 ranks), one replica's loss, or only one element of its gradient, is made non-finite on an inner
step, a log step or an outer step, under trainer.nonfinite=stop and skip. Every rank must end the
same way (the same error, or the same skip counts) at the same step, no replica's slow weights
may hold a non-finite value and the replicas' slow weights stay bitwise equal, checkpoints stay
finite, and metrics.jsonl is strict JSON. A clean stretch of the same runs counts the
collectives that cross replicas on the steps that neither log nor take an outer step: none.

One spawn runs every scenario, one after the other (a few seconds each).
"""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.tensor import DTensor

from tests.conftest import REPO, entry_env, make_config, poison_gradients, poison_losses
from tests.dist_utils import free_port, run_distributed
from tests.test_diloco import CollectiveRecorder

R, S = 2, 2
BAD_REPLICA = 1
LOSS_RANK, GRAD_RANK = BAD_REPLICA * S + 1, BAD_REPLICA * S  # the one rank of replica 1 poisoned
# K=3: outer steps 3 and 6; log steps 1, 4, 8; checkpoints 4, 8; steps 2, 5, 7 only train. The
# periodic preemption check (every 2 steps) moves to the outer steps under DiLoCo.
OVERRIDES = [
    "parallel.replicas=2", "optim.k=3", "trainer.max_steps=8", "trainer.log_interval=4",
    "trainer.eval_interval=0", "checkpoint.interval=4", "trainer.preemption_check_interval=2",
]  # fmt: skip
OUTER, LOGS, INNER = {3, 6}, {1, 4, 8}, {2, 5, 7}
# name: (trainer.nonfinite, what is poisoned, at which step)
SCENARIOS = {
    "stop-loss-inner": ("stop", "loss", 2),
    "stop-grad-outer": ("stop", "grad", 6),
    "stop-loss-log": ("stop", "loss", 4),
    "skip-loss-inner": ("skip", "loss", 5),
    "skip-grad-outer": ("skip", "grad", 3),
    "skip-loss-log": ("skip", "loss", 4),
}


def _slow_shards(trainer) -> torch.Tensor:
    """This rank's local shards of SNOO's slow weights, flattened in parameter order."""
    state = trainer.optimizer.state
    shards = [state[p]["snoo_slow"] for p in trainer.model.parameters()]
    return torch.cat([(s.to_local() if isinstance(s, DTensor) else s).detach().flatten() for s in shards])


def _scenario(rank: int, run_dir: Path, policy: str, kind: str, bad_step: int, record: bool) -> dict:
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer

    with pytest.MonkeyPatch.context() as mp:
        if kind == "loss" and rank == LOSS_RANK:
            poison_losses(mp, {bad_step})
        if kind == "grad" and rank == GRAD_RANK:
            poison_gradients(mp, {bad_step})
        cfg = make_config(run_dir, [*OVERRIDES, f"trainer.nonfinite={policy}"], world_size=dist.get_world_size())
        trainer = Trainer(cfg, init_distributed("cpu", replicas=R))
        ops: dict[int, list] = {}
        if record:
            one_step = trainer._one_step

            def recorded(step, first_step, preemption):
                with CollectiveRecorder() as recorder:
                    one_step(step, first_step, preemption)
                ops[step] = recorder.ops

            trainer._one_step = recorded
        try:
            summary = trainer.fit()
            outcome = ("done", summary["skipped_steps"], trainer.policy.skipped_steps, trainer.step)
        except Exception as e:  # noqa: BLE001 - what each rank ended with is the result
            outcome = (type(e).__name__, str(e))
    slow = _slow_shards(trainer)
    return {"outcome": outcome, "ended": time.time(), "slow": slow, "ops": ops}


def _all_scenarios(rank: int, world_size: int, out_dir: str) -> None:
    # A regression would leave some ranks waiting in a collective: fail within minutes instead.
    faulthandler.dump_traceback_later(300, exit=True)
    results = {}
    for name, (policy, kind, step) in SCENARIOS.items():
        dist.barrier()
        results[name] = _scenario(rank, Path(out_dir) / name, policy, kind, step, record=name == "skip-loss-inner")
    faulthandler.cancel_dump_traceback_later()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    out_dir = tmp_path_factory.mktemp("agreement")
    run_distributed(_all_scenarios, R * S, str(out_dir))
    return out_dir, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(R * S)]


def _strict_records(run_dir: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)

    walk("", torch.load(out, weights_only=False))
    return flat


EXPECTED_STOP = {
    "stop-loss-inner": "training loss is nan at step 2 on replica 1",
    "stop-grad-outer": "gradient norm is nan at step 6 on replica 1",
    "stop-loss-log": "training loss is nan at step 4 on replica 1",
}
FOUND_AT = {"stop-loss-inner": 4, "stop-grad-outer": 8, "stop-loss-log": 4}
# Replica steps skipped: one on the bad replica, or, at an outer step, the step on both replicas.
EXPECTED_SKIPS = {"skip-loss-inner": 1, "skip-grad-outer": R, "skip-loss-log": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_every_rank_ends_the_same_way(runs, name):
    _, results = runs
    outcomes = [r[name]["outcome"] for r in results]
    assert all(o == outcomes[0] for o in outcomes), outcomes
    ended = [r[name]["ended"] for r in results]
    assert max(ended) - min(ended) < 10, ended  # together, not after a collective's timeout
    if name in EXPECTED_STOP:
        kind, message = outcomes[0]
        assert kind == "TrainingDiverged" and "\n" not in message
        assert message.startswith(EXPECTED_STOP[name]), message
        assert f"found at step {FOUND_AT[name]};" in message, message
    else:
        # Finished, every rank counting the same replica steps skipped.
        assert outcomes[0] == ("done", EXPECTED_SKIPS[name], EXPECTED_SKIPS[name], 8), outcomes[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_slow_weights_stay_finite_and_equal_across_replicas(runs, name):
    _, results = runs
    for rank, r in enumerate(results):
        assert torch.isfinite(r[name]["slow"]).all(), f"rank {rank}: non-finite slow weights"
    for shard in range(S):  # the same shard in every replica: bitwise the same slow weights
        for replica in range(1, R):
            assert torch.equal(results[shard][name]["slow"], results[replica * S + shard][name]["slow"])


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_checkpoints_stay_finite_and_metrics_are_strict_json(runs, name, tmp_path):
    out_dir, _ = runs
    run_dir = out_dir / name
    records = _strict_records(run_dir)
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    if name in EXPECTED_STOP:
        # Nothing from the check that stopped the run on: no checkpoint at or after it.
        assert steps == [f"step_{s:08d}" for s in (4, 8) if s < FOUND_AT[name]]
        assert [r["step"] for r in records] == [s for s in sorted(LOGS) if s < FOUND_AT[name]]
    else:
        assert steps == ["step_00000004", "step_00000008"]
        assert [r["step"] for r in records] == sorted(LOGS)
        assert records[-1]["skipped_steps"] == EXPECTED_SKIPS[name]
    for step in steps:
        tensors = _checkpoint_tensors(run_dir / "checkpoints" / step, tmp_path)
        assert any("snoo_slow" in k for k in tensors)
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, f"{step}: {bad[:5]}"


@pytest.mark.slow
def test_a_dropped_first_outer_step_logs_null_norms(runs):
    out_dir, _ = runs
    by_step = {r["step"]: r for r in _strict_records(out_dir / "skip-grad-outer")}
    # Step 3's outer step was dropped on both replicas: none applied by step 4, none to report.
    assert by_step[4]["snoo/pseudo_grad_norm"] is None and by_step[4]["snoo/slow_weight_norm"] is None
    assert by_step[8]["snoo/pseudo_grad_norm"] > 0  # step 6's, applied


@pytest.mark.slow
def test_replicas_are_silent_between_outer_steps_in_a_real_fit(runs):
    _, results = runs
    for rank, r in enumerate(results):
        ops = r["skip-loss-inner"]["ops"]
        assert sorted(ops) == list(range(1, 9))
        replicate_ranks = tuple(rank % S + S * q for q in range(R))

        def crossing(step, ops=ops, replica=rank // S):
            """The collectives of this step whose group reaches past this rank's replica."""
            return [(op, g) for op, g in ops[step] if g is None or any(x // S != replica for x in g)]

        for step in INNER:
            assert ops[step], "the recorder saw no collective (FSDP's) on this step"
            assert crossing(step) == [], (rank, step, crossing(step))
            assert not any(g == replicate_ranks for _, g in ops[step])
        for step in OUTER - LOGS:
            # SNOO's all-reduce (the pseudo-gradient and every replica's non-finite flag) and the
            # periodic preemption check, moved to the outer steps.
            assert sorted(crossing(step)) == sorted(
                [("allreduce_", replicate_ranks), ("allreduce_", tuple(range(R * S)))]
            ), (rank, step, crossing(step))


# -- the entry point -----------------------------------------------------------------------------

FAILING_RANKS = """
import os
import snoo_train.trainer.trainer as trainer_module
from snoo_train.data import DataError

if os.environ["RANK"] in os.environ["FAILING_RANKS"].split(","):
    def fail(self):
        raise DataError("this rank cannot read its share of the corpus")
    trainer_module.Trainer._build_data = fail

from snoo_train.train import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "failing, line",
    [("1", "error: this rank cannot read its share of the corpus (rank 1 of 2)"),  # rank 0 healthy
     ("0,1", "error: this rank cannot read its share of the corpus")],  # every rank: rank 0 says it
)  # fmt: skip
def test_an_error_is_printed_once_whichever_ranks_raise_it(tmp_path, failing, line):
    script = tmp_path / "failing_ranks.py"
    script.write_text(FAILING_RANKS)
    launcher = [
        "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(script),
        "model=llama_tiny", "trainer=quick", "trainer.max_steps=2", "data.max_documents=50",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *launcher], cwd=REPO, env=dict(entry_env(), FAILING_RANKS=failing),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [line], proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("cannot read its share") == 1, proc.stderr[-3000:]
