"""Elastic DiLoCo replicas at restart (issue 23 part 5): a DiLoCo checkpoint resumes with another
`parallel.replicas`; new replica r continues saved replica r mod R_saved (fast weights, inner
state, anything per replica), the slow weights and outer momentum carry over after a check that
every saved replica holds them alike, and each replica keeps its batch and its data stream.

The data rule is checked here in one process against the epoch permutations written out by
hand; the resumes (2 -> 4 and 2 -> 1 replicas, then 4 -> 2, and the refusals) run in one spawn
of 4 gloo ranks and are compared with the saved tensors read back by DCP's own converter.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from snoo_train.data.errors import DataError
from snoo_train.data.loader import BatchLoader
from snoo_train.resume import config_changes
from tests.test_data import indexed_dataset, sample_ids

SEED, SEQ = 7, 4


# -- the data rule, in one process ---------------------------------------------------------------


def permutation(n: int, epoch: int, pass_: int) -> np.ndarray:
    """The reference order: pass 0 is the run's own epoch permutation; pass p > 0 (replicas
    beyond the saved count) a permutation seeded by (seed, epoch, p)."""
    entropy = [SEED, epoch] if pass_ == 0 else [SEED, epoch, pass_]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy))).permutation(n)


def stream_rows(n: int, step: int, replica: int, streams: int, b: int) -> list[int]:
    """Replica `replica`'s `b` windows at `step` when the layout holds `streams` stripes."""
    pass_, stripe = divmod(replica, streams)
    epoch, within = divmod(step, n // (streams * b))
    start = within * streams * b + stripe * b
    return permutation(n, epoch, pass_)[start : start + b].tolist()


def replica_loaders(data, *, replicas: int, shards: int, b: int, grad_accum: int = 1) -> list[list[BatchLoader]]:
    """loaders[r][s]: rank s of replica r, laid out as the trainer does (rank = r * shards + s)."""
    world = replicas * shards
    return [
        [
            BatchLoader(data, global_batch_size=replicas * b, grad_accum=grad_accum, rank=r * shards + s,
                        world_size=world, seed=SEED, replicas=replicas)
            for s in range(shards)
        ]
        for r in range(replicas)
    ]  # fmt: skip


def replica_step(shards: list[BatchLoader]) -> list[int]:
    return sum((sample_ids(loader.next_step(), SEQ) for loader in shards), [])


@pytest.mark.parametrize("new_replicas, new_shards", [(4, 1), (4, 2), (1, 2), (3, 1)])
def test_each_replica_keeps_its_stream_across_a_replica_change(new_replicas, new_shards):
    n, b = 60, 4  # 2 replicas x 4 windows: 7 steps per epoch, so the runs cross epochs
    data = indexed_dataset(n, SEQ)
    old = replica_loaders(data, replicas=2, shards=2, b=b)
    for step in range(5):
        got = [replica_step(shards) for shards in old]
        assert got == [stream_rows(n, step, r, 2, b) for r in range(2)]
    state = old[0][0].state_dict()
    assert state["streams"] == 2 and state["stream_batch"] == b
    new = replica_loaders(data, replicas=new_replicas, shards=new_shards, b=b, grad_accum=2 if new_shards == 1 else 1)
    for shards in new:
        for loader in shards:
            loader.load_state_dict(state)
    for step in range(5, 16):
        got = [replica_step(shards) for shards in new]
        # Replicas 0 and 1 read what they would have read without the change.
        assert got == [stream_rows(n, step, r, 2, b) for r in range(new_replicas)]
    # Later checkpoints keep the layout of the run's start.
    assert new[0][0].state_dict()["streams"] == 2


def test_without_a_change_diloco_reads_the_global_batch_as_before():
    # Replica r's ranks hold the r-th stripe of the global batch: the slicing of one stream
    # over all ranks (tests/test_data.py), so runs that do not change replicas keep their order.
    data = indexed_dataset(50, SEQ)
    flat = [BatchLoader(data, global_batch_size=8, grad_accum=1, rank=k, world_size=4, seed=SEED) for k in range(4)]
    laid = replica_loaders(data, replicas=2, shards=2, b=4)
    for _ in range(9):
        assert [sample_ids(f.next_step(), SEQ) for f in flat] == [
            sample_ids(loader.next_step(), SEQ) for shards in laid for loader in shards
        ]


def test_new_replicas_read_other_windows_than_the_old_ones():
    n, b = 64, 4
    rows = [stream_rows(n, 3, r, 2, b) for r in range(4)]
    assert len({tuple(r) for r in rows}) == 4  # every replica its own batch


def test_loader_refuses_a_batch_per_replica_that_changed():
    data = indexed_dataset(50, SEQ)
    state = replica_loaders(data, replicas=2, shards=1, b=4)[0][0].state_dict()
    other = BatchLoader(data, global_batch_size=8, grad_accum=1, rank=0, world_size=4, seed=SEED, replicas=4)
    with pytest.raises(DataError, match="stream_batch=4, this run has 2"):
        other.load_state_dict(state)


# -- which configs may change parallel.replicas ---------------------------------------------------


def diloco_config(replicas: int, batch: int, **data) -> dict:
    return {
        "parallel": {"replicas": replicas, "tp": 1},
        "trainer": {"batch_size": batch, "seed": 0},
        "optim": {"outer": "snoo", "lr": 1e-3},
        "data": {"streaming": False, "path": None, "paths": [], **data},
    }


def test_a_replica_change_keeping_each_replica_batch_is_a_change():
    refusals, changes = config_changes(diloco_config(2, 8), diloco_config(4, 16))
    assert refusals == []
    assert [str(c) for c in changes] == ["parallel.replicas: 2 -> 4", "trainer.batch_size: 8 -> 16"]
    refusals, changes = config_changes(diloco_config(2, 8), diloco_config(1, 4))
    assert refusals == [] and len(changes) == 2


@pytest.mark.parametrize(
    "new, match",
    [
        (diloco_config(4, 8), r"parallel\.replicas=2 \(this run: 4; each replica keeps its batch .* trainer\.batch_size=16"),
        ({**diloco_config(4, 16), "optim": {"outer": "none", "lr": 1e-3}}, r"only DiLoCo"),
        (diloco_config(4, 16, streaming=True), r"streaming data"),
        (diloco_config(4, 16, paths=["a", "b"]), r"mixture of stores"),
    ],
)  # fmt: skip
def test_replica_changes_that_cannot_continue_are_refused_with_the_reason(new, match):
    refusals, _ = config_changes(diloco_config(2, 8), new)
    assert any(re.search(match, r) for r in refusals), refusals


def test_the_batch_alone_still_cannot_change():
    refusals, _ = config_changes(diloco_config(2, 8), diloco_config(2, 16))
    assert refusals and refusals[0].startswith("trainer.batch_size=8")


# -- resumes through the Trainer: one spawn of 4 gloo ranks ----------------------------------------

K = 3  # outer steps 3, 6; the checkpoints the resumes start from (4, 5) are mid-window
BASE = ["optim.k=3", "trainer.eval_interval=0", "checkpoint.keep_latest=0", "trainer.log_interval=1"]
# Every multi-replica run sends int8 with error feedback: residuals are per-replica state that a
# new replica must NOT copy (it would send its source's unsent remainder twice); one replica sends nothing.
QUANT = ["optim.outer_quant=int8", "optim.error_feedback=true"]
# name: (replicas, trainer.batch_size, max_steps, checkpoint.interval, resume from)
RUNS = {
    "two": (2, 8, 7, 4, None),  # 2 x 2, windows of 2 per rank
    "four": (4, 16, 8, 5, "two/checkpoints/step_00000004"),  # 2 -> 4 (4 x 1)
    "one": (1, 4, 5, 0, "two/checkpoints/step_00000004"),  # 2 -> 1 (1 x 4): one replica continues
    "back": (2, 8, 6, 0, "four/checkpoints/step_00000005"),  # 4 -> 2 (2 x 2)
}


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _snapshot(trainer) -> dict:
    """The model and every optimizer state key, as full tensors (gathered within the replica)."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    state = trainer.optimizer.state
    return {
        "model": {n: _full(p) for p, n in names.items()},
        "optim": {n: {k: _full(v) for k, v in state[p].items() if isinstance(v, torch.Tensor)} for p, n in names.items()},
    }


def _trainer(root: Path, name: str, replicas: int, batch: int, max_steps: int, interval: int, resume: str | None,
             extra: list[str] = ()):  # fmt: skip
    import torch.distributed as dist

    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer
    from tests.conftest import make_config

    overrides = [*BASE, f"parallel.replicas={replicas}", f"trainer.batch_size={batch}", f"trainer.max_steps={max_steps}",
                 f"checkpoint.interval={interval}", *(QUANT if replicas > 1 else []), *extra]  # fmt: skip
    if resume:
        overrides.append(f"trainer.resume={root / resume}")
    # The corpus is tokenized once for all the runs.
    overrides.append(f"data.cache_dir={root / 'cache'}")
    cfg = make_config(root / name, overrides, world_size=dist.get_world_size())
    return Trainer(cfg, init_distributed("cpu", replicas=replicas))


def _fit_recording(trainer) -> list[torch.Tensor]:
    """fit(), keeping the input ids this rank read at each step (its micro-batches, in order)."""
    read: list[torch.Tensor] = []
    next_step = trainer.loader.next_step

    def recorded():
        batches = next_step()
        read.append(torch.cat([b["input_ids"].cpu() for b in batches]))
        return batches

    trainer.loader.next_step = recorded
    trainer.fit()
    return read


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _refusal(root: Path, *args, **kwargs) -> str:
    from snoo_train.checkpoint import CheckpointError

    try:
        _trainer(root, *args, **kwargs)
    except CheckpointError as e:
        return str(e)
    return "no refusal"


def _elastic_runs(rank: int, world_size: int, root: str) -> None:
    import torch.distributed as dist

    root = Path(root)
    out: dict = {"read": {}, "loaded": {}}
    for name, spec in RUNS.items():
        trainer = _trainer(root, name, *spec)
        if spec[4]:
            out["loaded"][name] = _snapshot(trainer)
        out["read"][name] = _fit_recording(trainer)
        if name == "four":  # after the outer step at 6 with 4 replicas: one slow copy everywhere
            out["four_final"] = _snapshot(trainer)
    # A checkpoint whose replicas disagree on the slow weights: replica 1's moved by 1e-3.
    bad = _trainer(root, "bad", 2, 8, 7, 4, "two/checkpoints/step_00000004")
    if bad.dist.replica == 1:
        p = next(iter(bad.model.parameters()))
        bad.optimizer.state[p]["snoo_slow"].to_local().add_(1e-3)
    bad.save_checkpoint(blocking=True)
    dist.barrier()
    before = _tree_digest(root)
    out["refusals"] = {
        "batch": _refusal(root, "refused_batch", 4, 8, 8, 0, "two/checkpoints/step_00000004"),
        "slow": _refusal(root, "refused_slow", 4, 16, 8, 0, "bad/checkpoints/step_00000004"),
    }
    dist.barrier()
    after = _tree_digest(root)
    out["unchanged"] = {k: after.get(k) == v for k, v in before.items()}
    torch.save(out, root / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def elastic(tmp_path_factory) -> dict:
    from tests.dist_utils import run_distributed

    root = tmp_path_factory.mktemp("elastic")
    run_distributed(_elastic_runs, 4, str(root))
    return {"root": root, "ranks": [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(4)]}


def saved_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read by torch's own converter (not the trainer's loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parent.parent / f"{checkpoint.name}.pt"
    if not target.exists():
        dcp_to_torch_save(checkpoint, target)
    return torch.load(target, weights_only=False)


def check_loaded(
    loaded: dict, saved: dict[str, torch.Tensor], source: int, saved_replicas: int, what: str, *, replica: int
) -> None:
    """The rule: model and every optimizer key from saved replica `source`; the slow weights and
    outer momentum equal in every saved replica; error-feedback residuals copied by the replicas
    that existed, zero on a new one (`replica` >= saved_replicas), absent with one replica."""
    for name, value in loaded["model"].items():
        assert torch.equal(value, saved[f"replica{source}/model/{name}"]), f"{what}: {name}"
    prefix = f"replica{source}/optim/state/"
    keys = {k[len(prefix):] for k in saved if k.startswith(prefix)}
    got = {f"{n}/{k}" for n, state in loaded["optim"].items() for k in state}
    assert got == (keys if any(k.endswith("snoo_residual") for k in got) else {k for k in keys if not k.endswith("snoo_residual")})
    for name, state in loaded["optim"].items():
        for key, value in state.items():
            if key == "snoo_residual" and replica >= saved_replicas:
                assert not value.any(), f"{what}: {name}/{key} of a new replica is not zero"
                continue
            for r in range(saved_replicas) if key in ("snoo_slow", "snoo_momentum") else (source,):
                assert torch.equal(value, saved[f"replica{r}/optim/state/{name}/{key}"]), f"{what}: {name}/{key}"


@pytest.mark.slow
def test_two_replicas_resume_as_four_then_as_two_again(elastic):
    root, ranks = elastic["root"], elastic["ranks"]
    saved = saved_tensors(root / "two/checkpoints/step_00000004")
    for rank in range(4):  # 4 x 1: replica = rank
        check_loaded(ranks[rank]["loaded"]["four"], saved, rank % 2, 2, f"four rank {rank}", replica=rank)
    # The residuals the new replicas did not copy were not zero (int8 left a remainder at step 3).
    assert any(saved[k].any() for k in saved if k.startswith("replica0/") and k.endswith("snoo_residual"))
    # Mid-window the two saved replicas' fast weights differ, so the rule is visible.
    name = next(iter(ranks[0]["loaded"]["four"]["model"]))
    assert not torch.equal(saved[f"replica0/model/{name}"], saved[f"replica1/model/{name}"])
    saved = saved_tensors(root / "four/checkpoints/step_00000005")
    for rank in range(4):  # 2 x 2: replica = rank // 2, continuing saved replica 0 or 1
        check_loaded(ranks[rank]["loaded"]["back"], saved, rank // 2, 4, f"back rank {rank}", replica=rank // 2)
    # After the outer step at 6, every one of the 4 replicas holds the same slow weights.
    finals = [r["four_final"]["optim"] for r in ranks]
    for name, state in finals[0].items():
        assert all(torch.equal(f[name]["snoo_slow"], state["snoo_slow"]) for f in finals[1:]), name


@pytest.mark.slow
def test_two_replicas_resume_as_one(elastic):
    ranks = elastic["ranks"]
    saved = saved_tensors(elastic["root"] / "two/checkpoints/step_00000004")
    for rank in range(4):  # 1 x 4: replica 0 continues
        check_loaded(ranks[rank]["loaded"]["one"], saved, 0, 2, f"one rank {rank}", replica=0)


@pytest.mark.slow
def test_surviving_replicas_read_what_they_would_have_read(elastic):
    ranks = elastic["ranks"]
    two = [r["read"]["two"] for r in ranks]  # steps 1..7 of the uninterrupted 2 x 2 run
    four = [r["read"]["four"] for r in ranks]  # steps 5..8
    replica = lambda reads, shards, r, i: torch.cat([reads[r * shards + s][i] for s in range(shards)])  # noqa: E731
    for step in (5, 6, 7):
        for r in (0, 1):
            assert torch.equal(four[r][step - 5], replica(two, 2, r, step - 1)), (step, r)
    # The new replicas read their own windows, not a copy of the old replicas' ones.
    rows = {tuple(row.tolist()) for r in range(4) for row in four[r][0]}
    assert len(rows) == 16
    one = [r["read"]["one"] for r in ranks]  # step 5, one replica over 4 ranks
    assert torch.equal(replica(one, 4, 0, 0), replica(two, 2, 0, 4))
    back = [r["read"]["back"] for r in ranks]  # step 6 after 4 -> 2: replicas 0 and 1 of "four"
    for r in (0, 1):
        assert torch.equal(replica(back, 2, r, 0), four[r][1])


@pytest.mark.slow
def test_refusals_give_one_line_and_change_no_file(elastic):
    for run in elastic["ranks"]:
        refusals = run["refusals"]
        assert "trainer.batch_size=16" in refusals["batch"] and "each replica keeps its batch" in refusals["batch"]
        assert "snoo_slow differs between saved replicas" in refusals["slow"], refusals["slow"]
        assert all("\n" not in r for r in refusals.values())
        assert run["unchanged"] and all(run["unchanged"].values())
    assert refusals == elastic["ranks"][0]["refusals"]


@pytest.mark.slow
def test_tokens_count_each_run_batch(elastic):
    # 4 steps of 8 windows of 64 tokens, then 16 windows a step with 4 replicas.
    records = [json.loads(line) for line in (elastic["root"] / "four/metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    assert steps == {s: 4 * 8 * 64 + (s - 4) * 16 * 64 for s in range(5, 9)}


@pytest.mark.slow
def test_two_replicas_resume_in_one_process(elastic, tmp_path):
    # 2 replicas x 2 ranks -> 1 replica, world size 1 (no process group): replica 0 continues.
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer
    from tests.conftest import make_config

    root = elastic["root"]
    overrides = [*BASE, "parallel.replicas=1", "trainer.batch_size=4", "trainer.max_steps=5", "checkpoint.interval=0",
                 f"trainer.resume={root / 'two/checkpoints/step_00000004'}", f"data.cache_dir={root / 'cache'}"]  # fmt: skip
    trainer = Trainer(make_config(tmp_path / "solo", overrides), init_distributed("cpu"))
    check_loaded(_snapshot(trainer), saved_tensors(root / "two/checkpoints/step_00000004"), 0, 2, "one process", replica=0)
    read = _fit_recording(trainer)
    two = [r["read"]["two"] for r in elastic["ranks"]]
    assert torch.equal(read[0], torch.cat([two[0][4], two[1][4]]))  # replica 0's windows of step 5
