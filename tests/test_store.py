"""Token stores: `python -m snoo_train.data.prepare` and `data=prepared`.

The references are independent of the store code: the in-memory packer's arrays (pack_split),
the byte tokenizer's definition (UTF-8 bytes + EOS 256), numpy's own file reading, and the
binomial spread for the mixture proportions."""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from snoo_train.config import DataConfig, PrepareJob
from snoo_train.configs import compose_job
from snoo_train.data import BatchLoader, ByteTokenizer
from snoo_train.data.build import build_prepared, open_sources
from snoo_train.data.mixture import Mixture
from snoo_train.data.packing import pack_split
from snoo_train.data.prepare import prepare
from snoo_train.data.sources import read_stdlib
from snoo_train.data.store import TokenStore
from tests.conftest import TINY, entry_env, read_records, run_entry, run_trainer
from tests.test_data import make_docs, write_jsonl
from tests.test_faults import one_error_line, snapshot

DOCS = 120  # standard-library documents in the small stores: ~2 MB, a fraction of a second


def job(out: Path, *overrides: str) -> PrepareJob:
    return compose_job(
        "prepare",
        [f"prepare.out={out}", f"data.max_documents={DOCS}", "prepare.shard_tokens=300000", "prepare.progress=false", *overrides],
        PrepareJob,
    )


def prepare_cli(*args: str, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snoo_train.data.prepare", *args],
        cwd=cwd, env=env or entry_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "stdlib"
    prepare(job(out))
    return out


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer made by our own tokenizer trainer (offline)."""
    from snoo_train.config import TokenizerJob
    from snoo_train.data.train_tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_tokenizer(compose_job("train_tokenizer", ["data.max_documents=40", "tokenizer.vocab_size=600", f"tokenizer.out={out}"], TokenizerJob))
    return out


# -- prepare ----------------------------------------------------------------------------------


def test_the_store_holds_what_the_in_memory_path_packs(store):
    """Train and validation tokens, across shards, equal pack_split's arrays on the same corpus."""
    cfg = job(store).data
    listing = open_sources(cfg)[0]
    train, val, n_train, n_val = pack_split(read_stdlib(listing), ByteTokenizer(), cfg.val_fraction)
    manifest = json.loads((store / "manifest.json").read_text())
    for split, want, n in (("train", train, n_train), ("val", val, n_val)):
        info = manifest["splits"][split]
        shards = [np.fromfile(store / f"{s['name']}.bin", dtype="<u2") for s in info["shards"]]
        assert np.array_equal(np.concatenate(shards), want)
        assert (info["tokens"], info["documents"]) == (len(want), n)
        # Each shard's index ends each document with EOS, and documents never straddle shards.
        for s, tokens in zip(info["shards"], shards):
            ends = np.fromfile(store / f"{s['name']}.idx", dtype="<u8")
            assert len(ends) == s["documents"] and ends[-1] == len(tokens)
            assert (tokens[ends.astype(np.int64) - 1] == 256).all()
    assert len(manifest["splits"]["train"]["shards"]) > 3  # the test covers crossing shards
    assert manifest["tokenizer"] == {"name": "byte", "fingerprint": "byte-utf8-eos256", "vocab_size": 257, "eos_id": 256}
    assert manifest["dtype"] == "uint16" and manifest["data"]["max_documents"] == DOCS


def test_one_and_two_workers_write_byte_identical_stores(tmp_path, bpe_dir):
    a, b = tmp_path / "w1", tmp_path / "w2"
    common = [f"data.tokenizer={bpe_dir}", "data.max_documents=60", "prepare.chunk_documents=7"]
    prepare(job(a, *common, "prepare.workers=1"))
    prepare(job(b, *common, "prepare.workers=2", "prepare.chunk_documents=5"))
    assert snapshot(a) and {k.replace(str(a), ""): v for k, v in snapshot(a).items()} == {
        k.replace(str(b), ""): v for k, v in snapshot(b).items()
    }
    assert (a / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((a / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 600


def test_windows_read_across_shards(store):
    """A StoreDataset window is the flat array's slice, at shard boundaries too."""
    ts = TokenStore(str(store))
    flat = np.concatenate([np.fromfile(store / f"{s['name']}.bin", dtype="<u2") for s in ts.manifest["splits"]["train"]["shards"]])
    ds = ts.dataset("train", 64)
    assert len(ds) == (len(flat) - 1) // 64
    first_boundary = ts.manifest["splits"]["train"]["shards"][0]["tokens"]
    crossing = first_boundary // 64
    for i in (0, crossing, len(ds) - 1):
        assert np.array_equal(ds[i], flat[i * 64 : i * 64 + 65])
    assert np.array_equal(ds.take([crossing, 0]), np.stack([flat[crossing * 64 : crossing * 64 + 65], flat[:65]]))


def test_a_store_trains_to_the_in_memory_losses(tmp_path, store):
    """TINY from the store and from the standard library directly: the same batches, the same
    losses, bit for bit."""
    direct = run_trainer(tmp_path / "direct", [f"data.max_documents={DOCS}"])
    stored = run_trainer(tmp_path / "stored", ["data=prepared", f"data.path={store}", "data.max_documents=null"])
    want = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_records(tmp_path / "direct")]
    got = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_records(tmp_path / "stored")]
    assert got == want and direct.vocab_size == stored.vocab_size


def test_global_batches_do_not_depend_on_the_world_size(store):
    train, _ = build_prepared(DataConfig(source="prepared", path=str(store), tokenizer=None, seq_len=32), seed=3)

    def steps(world_size):
        ranks = [BatchLoader(train, global_batch_size=8, grad_accum=1, rank=r, world_size=world_size, seed=3) for r in range(world_size)]
        return [sum(([tuple(x) for x in lo.next_step()[0]["input_ids"].tolist()] for lo in ranks), []) for _ in range(5)]

    assert steps(1) == steps(2) == steps(4)


def test_resume_is_exact_at_two_ranks_and_continues_at_one(tmp_path, store):
    args = TINY + ["data=prepared", f"data.path={store}", "data.max_documents=null", "trainer.max_steps=8", "checkpoint.interval=4"]
    full = tmp_path / "full"
    assert run_entry(args + [f"hydra.run.dir={full}"], tmp_path, nproc=2).returncode == 0
    for name, nproc in (("ws2", 2), ("ws1", 1)):
        run = tmp_path / name
        shutil.copytree(full, run, ignore=shutil.ignore_patterns("step_00000008"))
        (run / "metrics.jsonl").write_text("".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:4]))
        proc = run_entry(args + [f"hydra.run.dir={run}", "trainer.resume=auto"], tmp_path, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        want = {r["step"]: r["loss"] for r in read_records(full) if r["step"] > 4 and "loss" in r}
        got = {r["step"]: r["loss"] for r in read_records(run) if r["step"] > 4 and "loss" in r}
        assert got.keys() == want.keys()
        if nproc == 2:
            assert got == want  # bitwise: same ranks, same data, same reductions
        else:
            assert all(math.isclose(got[s], want[s], rel_tol=1e-4) for s in want)  # another reduction order


# -- mixtures ---------------------------------------------------------------------------------


class Indexed:
    """A dataset whose window i is [base + i] * (T + 1): a sample names its store and index."""

    def __init__(self, n: int, base: int, seq_len: int = 3):
        self.n, self.base, self.seq_len = n, base, seq_len

    def __len__(self):
        return self.n

    def take(self, idx):
        return np.array([[self.base + int(i)] * (self.seq_len + 1) for i in idx], dtype=np.int64)


def mixture_loader(weights, seed=0, rank=0, world_size=1, sizes=(50, 400, 1000)):
    parts = [Indexed(n, 10_000 * (k + 1)) for k, n in enumerate(sizes[: len(weights)])]
    mix = Mixture(parts, weights, [f"s{k}" for k in range(len(weights))], seed=seed)
    return BatchLoader(mix, global_batch_size=16, grad_accum=1, rank=rank, world_size=world_size, seed=seed)


def drawn(loader, steps):
    return [int(x) for _ in range(steps) for x in loader.next_step()[0]["input_ids"][:, 0]]


def test_a_mixture_draws_each_store_in_its_weights_proportion():
    weights = [0.2, 0.5, 0.3]
    samples = drawn(mixture_loader(weights), 500)  # 8000 draws
    n = len(samples)
    for k, w in enumerate(weights):
        count = sum(1 for s in samples if s // 10_000 == k + 1)
        assert abs(count - n * w) < 4 * math.sqrt(n * w * (1 - w)), (k, count)
    # The small store (50 windows) went through several epochs: each a permutation of all of it.
    small = [s - 10_000 for s in samples if s // 10_000 == 1]
    for e in range(len(small) // 50):
        assert sorted(small[e * 50 : (e + 1) * 50]) == list(range(50))
    assert small[:50] != small[50:100]
    # A zero weight is never drawn.
    assert all(s // 10_000 != 1 for s in drawn(mixture_loader([0.0, 1.0, 1.0]), 50))


def test_a_mixture_is_deterministic_and_world_size_independent_and_resumes():
    weights = [1.0, 2.0, 1.0]
    want = drawn(mixture_loader(weights), 40)
    assert drawn(mixture_loader(weights), 40) == want
    assert drawn(mixture_loader(weights, seed=1), 40) != want
    ranks = [mixture_loader(weights, rank=r, world_size=2) for r in range(2)]
    two = [x for _ in range(40) for lo in ranks for x in drawn(lo, 1)]
    assert two == want
    first = mixture_loader(weights)
    drawn(first, 25)
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    again = mixture_loader(weights, rank=1, world_size=2)
    again.load_state_dict(state)
    assert drawn(again, 15) == [x for s in range(25, 40) for x in want[s * 16 + 8 : s * 16 + 16]]
    assert first.tokens_drawn() == {f"s{k}": int(c) * 3 for k, c in enumerate(first.mixture.counts)}


def test_a_mixture_run_logs_the_tokens_drawn_per_store(tmp_path, store):
    other = tmp_path / "other"
    prepare(job(other, "data.max_documents=30"))
    run_trainer(
        tmp_path / "mix",
        ["data=prepared", f"data.paths=[{store},{other}]", "data.weights=[3,1]", "data.max_documents=null"],
    )
    last = [r for r in read_records(tmp_path / "mix") if "loss" in r][-1]
    a, b = last["data/tokens/stdlib"], last["data/tokens/other"]
    assert a + b == last["tokens"] and a > b > 0


# -- bad input: one line, nothing saved changes ------------------------------------------------


def train_on(store_args: list[str], tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_entry(TINY + ["data.max_documents=null", "data=prepared", *store_args, f"hydra.run.dir={tmp_path / 'run'}", *extra], tmp_path, timeout=120)


def test_a_store_made_with_another_tokenizer_is_refused(tmp_path, store, bpe_dir):
    before = snapshot(store)
    proc = train_on([f"data.path={store}", f"data.tokenizer={bpe_dir}"], tmp_path)
    one_error_line(proc, f"data.tokenizer={bpe_dir}", "not the tokenizer the store", "'byte'")
    assert snapshot(store) == before


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing"])
def test_a_damaged_shard_is_named(tmp_path, store, damage):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    shard = copy / "train-00001.bin"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif damage == "flipped":
        data = bytearray(shard.read_bytes())
        data[100] ^= 1
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    before = snapshot(copy)
    proc = train_on([f"data.path={copy}", "data.verify_checksums=true"], tmp_path)
    one_error_line(proc, str(shard), "sha256" if damage == "flipped" else ("missing" if damage == "missing" else "bytes"))
    assert snapshot(copy) == before
    if damage == "flipped":  # sizes only, by default: a flipped bit passes the O(1) start-up check
        assert train_on([f"data.path={copy}", "trainer.max_steps=1"], tmp_path, "hydra.run.dir=" + str(tmp_path / "r2")).returncode == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["data.path=nowhere"], "nowhere does not exist"),
        (["data.paths=[a,b]", "data.weights=[1]"], "one weight per store"),
        (["data.paths=[a,b]", "data.weights=[1,-1]"], "must be >= 0"),
        (["data.paths=[a,b]", "data.weights=[0,0]"], "positive sum"),
        (["data.path=a", "data.paths=[a,b]", "data.weights=[1,1]"], "exactly one of data.path and data.paths"),
        (["data.path=a", "data.val_fraction=0.1"], "data.val_fraction is fixed when a store is prepared"),
    ],
)
def test_bad_store_arguments_are_one_line(tmp_path, args, message):
    one_error_line(train_on(args, tmp_path), message)


def test_prepare_refuses_to_overwrite_a_store(tmp_path, store):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    before = snapshot(copy)
    proc = prepare_cli(f"prepare.out={copy}", "data.max_documents=5", cwd=tmp_path)
    one_error_line(proc, "is a token store already", "prepare.overwrite=true")
    assert snapshot(copy) == before
    one_error_line(prepare_cli("data.max_documents=5", cwd=tmp_path), "prepare.out must name")


KILLER = """
import os, signal, sys
from snoo_train.data import store_writer, prepare
calls = 0
flush = store_writer.SplitWriter.flush
def flush_then_die(self):
    global calls
    flush(self)
    calls += 1
    if calls == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # after data is written, before progress records it
store_writer.SplitWriter.flush = flush_then_die
prepare.main(sys.argv[1:])
"""


def test_a_prepare_killed_mid_way_is_never_read_and_resumes_to_the_same_store(tmp_path, store):
    out = tmp_path / "killed"
    args = [f"prepare.out={out}", f"data.max_documents={DOCS}", "prepare.shard_tokens=300000", "prepare.chunk_documents=10", "prepare.progress=false"]
    env = dict(entry_env(), KILL_AT="15")  # 2 writers flush per chunk: dies in chunk 8 of 12
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and (tmp_path / "killed.partial" / "progress.json").is_file()
    one_error_line(train_on([f"data.path={out}"], tmp_path), "a prepare was interrupted", "rerun the same prepare command")
    stale = json.loads((tmp_path / "killed.lock").read_text())  # the killed prepare's record
    resumed = prepare_cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming an interrupted prepare" in resumed.stderr, resumed.stderr[-2000:]
    # The killed prepare's lock is stale (the kernel dropped it): taken over, naming its holder.
    assert f"took over the lock of a prepare that ended without releasing it ({stale}" in resumed.stderr
    assert {k.replace(str(out), ""): v for k, v in snapshot(out).items()} == {
        k.replace(str(store), ""): v for k, v in snapshot(store).items()
    }
    assert not (tmp_path / "killed.partial").exists()


PAUSER = """
import os, sys, time
from pathlib import Path
from snoo_train.data import store_writer, prepare
flush = store_writer.SplitWriter.flush
def flush_then_wait(self):
    flush(self)
    Path(os.environ["PAUSED"]).touch()  # chunks are committed: a live .partial directory
    while not Path(os.environ["GO"]).exists():
        time.sleep(0.05)
store_writer.SplitWriter.flush = flush_then_wait
prepare.main(sys.argv[1:])
"""


def test_a_second_prepare_into_one_output_is_refused_at_once_naming_the_first(tmp_path, store):
    out, paused, go = tmp_path / "busy", tmp_path / "paused", tmp_path / "go"
    args = [f"prepare.out={out}", f"data.max_documents={DOCS}", "prepare.shard_tokens=300000", "prepare.chunk_documents=10", "prepare.progress=false"]
    env = dict(entry_env(), PAUSED=str(paused), GO=str(go))
    first = subprocess.Popen([sys.executable, "-c", PAUSER, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        before = snapshot(tmp_path / "busy.partial", tmp_path / "busy.lock")
        start = time.perf_counter()
        second = prepare_cli(*args, cwd=tmp_path)
        elapsed = time.perf_counter() - start
        one_error_line(second, f"prepare.out={out} is in use by prepare pid {first.pid} on host {socket.gethostname()}", "choose another prepare.out")
        assert elapsed < 30, f"took {elapsed:.1f} s to refuse"
        assert snapshot(tmp_path / "busy.partial", tmp_path / "busy.lock") == before
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    # The first prepare, undisturbed, publishes the same store as one run alone.
    assert first.returncode == 0, stderr[-3000:]
    assert {k.replace(str(out), ""): v for k, v in snapshot(out).items()} == {
        k.replace(str(store), ""): v for k, v in snapshot(store).items()
    }


def test_a_partial_prepare_of_another_config_is_not_mixed_in(tmp_path):
    out = tmp_path / "s"
    (tmp_path / "s.partial").mkdir()
    (tmp_path / "s.partial" / "progress.json").write_text(json.dumps({"key": "another", "phase": 0}))
    before = snapshot(tmp_path / "s.partial")
    one_error_line(prepare_cli(f"prepare.out={out}", "data.max_documents=5", cwd=tmp_path), "interrupted prepare of a different config", "s.partial")
    assert snapshot(tmp_path / "s.partial") == before


def test_local_files_and_a_trained_tokenizer_prepare_and_train(tmp_path, bpe_dir):
    """docs/data.md's path end to end: local jsonl + our own tokenizer -> store -> training with the
    store's saved tokenizer (data.tokenizer unset)."""
    write_jsonl(tmp_path / "a.jsonl", make_docs(300, seed=5))
    out = tmp_path / "tokens"
    proc = prepare_cli("data=local", f"data.files=[{tmp_path / 'a.jsonl'}]", f"data.tokenizer={bpe_dir}", f"prepare.out={out}", "prepare.workers=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    proc = run_entry(TINY + ["data.max_documents=null", "data=prepared", f"data.path={out}", "data.seq_len=32", "trainer.max_steps=3", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vocab 640" in proc.stdout + proc.stderr  # 600 padded to a multiple of 64


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_dataset_prepares_streamed_or_downloaded_to_the_same_store(tmp_path, streaming):
    """data=hf (a dataset directory in the hub's layout, offline) with a named validation split."""
    root = tmp_path / "ds"
    root.mkdir()
    docs = make_docs(200, seed=7)
    write_jsonl(root / "train.jsonl", docs[:160])
    write_jsonl(root / "validation.jsonl", docs[160:])
    out = tmp_path / f"s{streaming}"
    prepare(job(out, "data=hf", f"data.path={root}", "data.val_split=validation", f"data.streaming={streaming}", "data.tokenizer=byte", "data.max_documents=null"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 160 and manifest["splits"]["val"]["documents"] == 40
    val = np.fromfile(out / "val-00000.bin", dtype="<u2")
    assert val.tolist() == [t for d in docs[160:] for t in list(d.encode()) + [256]]
    reference = tmp_path / "sFalse"
    if streaming and reference.exists():
        assert {k.replace(str(out), ""): v for k, v in snapshot(out).items()} == {
            k.replace(str(reference), ""): v for k, v in snapshot(reference).items()
        }


@pytest.mark.parametrize("tool,key", [("prepare", "workers: 1"), ("train_tokenizer", "vocab_size: 32000")])
def test_the_data_tools_answer_help_with_their_keys(tmp_path, tool, key):
    proc = subprocess.run([sys.executable, "-m", f"snoo_train.data.{tool}", "--help"], cwd=tmp_path, env=entry_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and key in proc.stdout and "data:" in proc.stdout, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing written
