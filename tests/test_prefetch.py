"""data.prefetch and data.pin_memory (snoo_train/data/prefetch.py): the steps a background
thread assembles ahead are bitwise the ones the plain BatchLoader gives on the caller's thread
(map-style data over epoch boundaries, a mixture of stores, streaming); the position a
checkpoint saves is that of the steps taken, not of those queued; an error surfaces at the step
that would have read it, with its message; no thread outlives its loader or its run."""

from __future__ import annotations

import gc
import json
import threading
import time
import traceback

import pytest
import torch

from snoo_train.config import ConfigError, validate_config
from snoo_train.data import BatchLoader, DataError, PrefetchLoader, pin_batches
from snoo_train.data.mixture import Mixture
from tests.conftest import STEPS, make_config, run_trainer, typed
from tests.test_data import indexed_dataset
from tests.test_data_streaming import corpus, loaders  # noqa: F401  (corpus: a fixture)
from tests.test_store import Indexed

THREAD = "snoo-prefetch"
KINDS = ["map", "mixture", "streaming"]


_EARLIER: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _threads_of_earlier_tests():
    """Prefetch threads other tests in this worker left running (a Trainer driven without fit()
    ends its thread only when it is collected) are not this test's."""
    _EARLIER.clear()
    _EARLIER.update(t for t in threading.enumerate() if t.name == THREAD)
    yield


def prefetch_threads() -> list[threading.Thread]:
    """The prefetch threads this test started that are still running."""
    return [t for t in threading.enumerate() if t.name == THREAD and t not in _EARLIER]


@pytest.fixture
def make_loader(corpus):  # noqa: F811
    """A fresh plain BatchLoader of one kind; every call gives one in the same start state."""
    files, _ = corpus
    made: list[BatchLoader] = []

    def make(kind: str) -> BatchLoader:
        if kind == "map":
            # 40 windows, 8 per step: 5 steps an epoch; rank 1 of 2, two micro-batches each.
            loader = BatchLoader(indexed_dataset(40, 4), global_batch_size=8, grad_accum=2, rank=1, world_size=2, seed=5)
        elif kind == "mixture":
            parts = [Indexed(30, 10_000), Indexed(200, 20_000)]
            mix = Mixture(parts, [1.0, 2.0], ["s0", "s1"], seed=5)
            loader = BatchLoader(mix, global_batch_size=8, grad_accum=1, rank=0, world_size=1, seed=5)
        else:
            loader = loaders(files, world_size=2, seed=5)[1]
        made.append(loader)
        return loader

    yield make
    for loader in made:
        loader.close()


def assert_same_steps(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        for gb, wb in zip(g, w):
            assert gb.keys() == wb.keys()
            for key in gb:
                assert gb[key].dtype == wb[key].dtype and torch.equal(gb[key], wb[key]), key


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- the same batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_prefetched_steps_are_bitwise_those_of_the_training_thread(make_loader, kind):
    """12 steps: over two epoch boundaries of the map-style data, past the small store's end in
    the mixture, across several shuffle blocks of the stream."""
    reference = make_loader(kind)
    want = [reference.next_step() for _ in range(12)]
    for steps in (0, 2):
        loader = PrefetchLoader(make_loader(kind), steps=steps, pin=False)
        assert_same_steps([loader.next_step() for _ in range(12)], want)
        assert loader.tokens_drawn() == reference.tokens_drawn()
        assert loader.state_dict() == reference.state_dict()
        assert loader.rank_state() == reference.rank_state()
        loader.close()
    assert not prefetch_threads()


# -- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_saved_position_is_that_of_the_steps_taken_not_queued(make_loader, kind):
    reference = make_loader(kind)
    want = [reference.next_step() for _ in range(11)]
    taken = 5
    first = PrefetchLoader(make_loader(kind), steps=2, pin=False)
    for _ in range(taken):
        first.next_step()
    # The thread has assembled the next steps already: the inner loader is past them.
    wait_until(lambda: first.loader.step >= taken + 2)
    state, rank_state = first.state_dict(), first.rank_state()
    assert state["step"] == taken
    if kind == "mixture":
        # What each store served in the steps taken, counted from the batches themselves.
        served = [int(x) // 10_000 for step in want[:taken] for mb in step for x in mb["input_ids"][:, 0]]
        assert first.tokens_drawn() == {"s0": served.count(1) * 3, "s1": served.count(2) * 3}
    first.close()

    # A new run resumes from the checkpoint (its JSON round trip), prefetching again.
    again = PrefetchLoader(make_loader(kind), steps=2, pin=False)
    again.load_state_dict(json.loads(json.dumps(state)))
    again.load_rank_state(json.loads(json.dumps(rank_state)))
    assert_same_steps([again.next_step() for _ in range(len(want) - taken)], want[taken:])
    again.close()


@pytest.mark.parametrize("kind", KINDS)
def test_loading_while_the_thread_runs_ahead_drops_the_queued_steps(make_loader, kind):
    """Loading the state taken so far (even without the stream's rank state) continues at
    the next step taken, not after the ones the thread had queued."""
    reference = make_loader(kind)
    want = [reference.next_step() for _ in range(8)]
    loader = PrefetchLoader(make_loader(kind), steps=2, pin=False)
    for _ in range(3):
        loader.next_step()
    wait_until(lambda: loader.loader.step >= 5)
    loader.load_state_dict(loader.state_dict())
    assert not prefetch_threads()
    assert_same_steps([loader.next_step() for _ in range(5)], want[3:])
    loader.close()


# -- errors and threads ----------------------------------------------------------------------------


class BreaksAt(Indexed):
    """Indexed windows whose `take` fails on its call number `at` (0-based), like a store
    whose shard turns out corrupt while training."""

    def __init__(self, at: int):
        super().__init__(64, 0, seq_len=3)
        self.at, self.calls = at, 0

    def take(self, idx):
        self.calls += 1
        if self.calls - 1 == self.at:
            raise DataError("token store shard_00003.bin: 12 bytes, expected 4096 (corrupt store)")
        return super().take(idx)


def broken_loader(at: int) -> BatchLoader:
    return BatchLoader(BreaksAt(at), global_batch_size=4, grad_accum=1, rank=0, world_size=1, seed=0)


def test_a_producer_error_surfaces_at_its_step_with_its_message_and_traceback():
    plain = broken_loader(3)
    want = [plain.next_step() for _ in range(3)]
    with pytest.raises(DataError) as plain_error:
        plain.next_step()

    loader = PrefetchLoader(broken_loader(3), steps=2, pin=False)
    assert_same_steps([loader.next_step() for _ in range(3)], want)
    with pytest.raises(DataError) as error:
        loader.next_step()
    assert str(error.value) == str(plain_error.value)
    # The frames of the producer thread down to the failing read are kept.
    assert "take" in [frame.name for frame in traceback.extract_tb(error.value.__traceback__)]
    # Asked again, the same error at once (the thread is gone: nothing to wait for).
    with pytest.raises(DataError, match="corrupt store"):
        loader.next_step()
    loader.close()
    assert not prefetch_threads()


def test_no_thread_outlives_its_loader(make_loader):
    loader = PrefetchLoader(make_loader("map"), steps=2, pin=False)
    loader.next_step()
    assert len(prefetch_threads()) == 1
    loader.close()
    assert not prefetch_threads()
    # A loader dropped without close() (a benchmark driving train_step by hand) ends its thread.
    dropped = PrefetchLoader(make_loader("map"), steps=2, pin=False)
    dropped.next_step()
    del dropped
    gc.collect()
    wait_until(lambda: not prefetch_threads(), timeout=5)


def test_pinning_pins_every_tensor_of_every_micro_batch(make_loader, monkeypatch):
    """Pinning needs CUDA; here `Tensor.pin_memory` is replaced by a recording copy, which
    must be what the loader hands out, for every tensor, on the producer thread."""
    pinned: dict[int, str] = {}

    def fake_pin(self):
        out = self.clone()
        pinned[id(out)] = threading.current_thread().name
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    want = [make_loader("map").next_step() for _ in range(1)]
    for steps, thread in ((0, threading.current_thread().name), (2, THREAD)):
        loader = PrefetchLoader(make_loader("map"), steps=steps, pin=True)
        got = [loader.next_step()]
        assert_same_steps(got, want)
        assert [pinned.get(id(t)) for mb in got[0] for t in mb.values()] == [thread] * 4
        loader.close()


def test_pin_memory_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [pin_batches("auto", cpu), pin_batches("auto", cuda)] == [False, True]
    assert [pin_batches("false", cuda), pin_batches("False", cuda), pin_batches("True", cuda)] == [False, False, True]


def test_bad_prefetch_settings_are_one_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as error:
        validate_config(typed(["data.pin_memory=true"]))
    assert str(error.value) == (
        "data.pin_memory=true pins batches for copies to a CUDA device, and no CUDA device is visible: "
        "use auto (pins only when training on CUDA) or false"
    )
    with pytest.raises(ConfigError, match=r"data.pin_memory='sometimes' is not allowed; choose one of auto, true, false"):
        validate_config(typed(["data.pin_memory=sometimes"]))
    with pytest.raises(ConfigError, match=r"data.prefetch=-1 must be >= 0"):
        validate_config(typed(["data.prefetch=-1"]))
    validate_config(typed(["data.pin_memory=false", "data.prefetch=0"]))


# -- through the trainer ---------------------------------------------------------------------------


def losses(trainer_run_dir) -> dict[int, float]:
    lines = (trainer_run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_a_prefetching_run_matches_prefetch_0_and_resumes_bitwise(tmp_path):
    """TINY (12 steps of SNOO(AdamW)): prefetching ahead gives prefetch=0's losses bit for bit,
    and a run resumed at step 7 from a prefetching run's checkpoint continues them bit for bit
    (the thread had assembled steps 8 and 9 when step 7 was saved)."""
    plain = run_trainer(tmp_path / "plain", ["data.prefetch=0", "checkpoint.interval=0"])
    assert plain.loader.steps == 0
    full = run_trainer(tmp_path / "full", ["data.prefetch=2", "checkpoint.interval=7"])
    assert not prefetch_threads()
    resumed = run_trainer(
        tmp_path / "resumed",
        ["data.prefetch=2", f"trainer.resume={tmp_path}/full/checkpoints/step_00000007", "checkpoint.interval=0"],
    )
    assert not prefetch_threads()
    want = losses(tmp_path / "plain")
    assert sorted(want) == list(range(1, STEPS + 1))
    assert losses(tmp_path / "full") == want
    got = losses(tmp_path / "resumed")
    assert sorted(got) == list(range(8, STEPS + 1)) and all(got[s] == want[s] for s in got)
    assert resumed.step == full.step == STEPS


def test_a_data_error_mid_run_stops_the_run_with_its_message_and_no_thread(tmp_path):
    from snoo_train.dist import init_distributed
    from snoo_train.trainer import Trainer

    trainer = Trainer(make_config(tmp_path / "run", ["data.prefetch=2", "checkpoint.interval=0"]), init_distributed("cpu"))
    inner, calls = trainer.loader.loader.next_step, []

    def next_step():
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise DataError("token store shard_00001.bin: checksum mismatch")
        return inner()

    trainer.loader.loader.next_step = next_step
    with pytest.raises(DataError, match="^token store shard_00001.bin: checksum mismatch$"):
        trainer.fit()
    assert trainer.step == 3 and set(calls) == {THREAD}
    assert not prefetch_threads()
