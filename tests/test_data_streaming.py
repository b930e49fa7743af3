"""Streaming (`data.streaming=true`): each rank tokenizes about its own share of the stream, in a
background thread; a resume rebuilds one block, whatever the step; the order is exact at the
same world size.

The documents carry markers (`<doc0042>`), so a window names the documents it came from, and a
counting tokenizer records which documents were tokenized, by which rank, on which thread."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from snoo_train.config import DataConfig
from snoo_train.data import BatchLoader, ByteTokenizer, build_datasets
from tests.test_data import make_docs, markers, write_jsonl

SEQ = 16


class CountingTokenizer(ByteTokenizer):
    """The byte tokenizer, recording every document it encodes and the thread that asked."""

    def __init__(self):
        self.documents: list[str] = []
        self.threads: set[str] = set()

    def encode_batch(self, texts):
        self.documents += list(texts)
        self.threads.add(threading.current_thread().name)
        return super().encode_batch(texts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four jsonl files (four stream shards) of 100 marked documents each."""
    root = tmp_path_factory.mktemp("stream_local")
    docs = make_docs(400, seed=3)
    files = []
    for f in range(4):
        files.append(root / f"part{f}.jsonl")
        write_jsonl(files[-1], docs[f * 100 : (f + 1) * 100])
    return [str(p) for p in files], docs


def cfg(files, **kw) -> DataConfig:
    base = dict(source="local", files=list(files), streaming=True, seq_len=SEQ, val_fraction=0.1, shuffle_buffer=8)
    base.update(kw)
    return DataConfig(**base)


def loaders(files, *, world_size=1, seed=0, batch=8, tok=None, **kw):
    train, _ = build_datasets(cfg(files, **kw), tok or ByteTokenizer(), seed=seed)
    return [
        BatchLoader(train, global_batch_size=batch, grad_accum=1, rank=r, world_size=world_size, seed=seed)
        for r in range(world_size)
    ]


def rows(step) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for mb in step for row in mb["input_ids"]]


def test_deterministic_for_a_seed_and_shuffled_by_it(corpus):
    files, _ = corpus
    (a,), (b,), (c,) = loaders(files), loaders(files), loaders(files, seed=1)
    want = [rows(a.next_step()) for _ in range(10)]
    assert [rows(b.next_step()) for _ in range(10)] == want
    assert [rows(c.next_step()) for _ in range(10)] != want
    # The block shuffle reorders windows but keeps the multiset of a block.
    (d,) = loaders(files, shuffle_buffer=1)
    first_block = sorted(sum(want[:1], []))
    assert sorted(sum([rows(d.next_step())], [])) == first_block


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_tokenizes_about_its_own_share_in_a_background_thread(corpus, world_size):
    files, docs = corpus
    toks = [CountingTokenizer() for _ in range(world_size)]
    ranks = [
        loaders(files, world_size=world_size, tok=tok)[r]  # rank r's loader, its own tokenizer
        for r, tok in enumerate(toks)
    ]
    seen = [set() for _ in ranks]
    for _ in range(30):
        for r, loader in enumerate(ranks):
            for row in rows(loader.next_step()):
                seen[r] |= markers(bytes(t for t in row if t < 256).decode(errors="replace"))
    tokenized = [{m for d in tok.documents for m in markers(d)} for tok in toks]
    # Disjoint shares: no document is tokenized by two ranks, and each rank trains on its own.
    for r in range(world_size):
        for q in range(r):
            assert not tokenized[r] & tokenized[q]
        assert seen[r] <= tokenized[r]
    # Each rank tokenized about 1/W of what all ranks tokenized together (it consumed the same
    # number of windows), and no rank tokenized on the training thread.
    total = sum(len(t.documents) for t in toks)
    for tok in toks:
        assert abs(len(tok.documents) / total - 1 / world_size) < 0.1 / world_size
        assert tok.threads == {"snoo-stream"}
    for loader in ranks:
        loader.close()


def resumed_at(files, step: int, world_size: int = 1):
    """Loaders run to `step`, their state taken, and fresh loaders (counting tokenizers) resumed."""
    first = loaders(files, world_size=world_size)
    for _ in range(step):
        for loader in first:
            loader.next_step()
    states = [(loader.state_dict(), loader.rank_state()) for loader in first]
    for loader in first:
        loader.close()
    toks = [CountingTokenizer() for _ in range(world_size)]
    again = [loaders(files, world_size=world_size, tok=t)[r] for r, t in enumerate(toks)]
    for loader, (state, rank_state) in zip(again, states):
        loader.load_state_dict(state)
        # The checkpoint holds the rank's position as JSON.
        loader.load_rank_state(json.loads(json.dumps(rank_state)))
    return again, toks


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_exact_at_the_same_world_size(corpus, world_size):
    files, _ = corpus
    straight = loaders(files, world_size=world_size)
    want = [[rows(loader.next_step()) for loader in straight] for _ in range(12)]
    again, _ = resumed_at(files, 5, world_size)
    assert [[rows(loader.next_step()) for loader in again] for _ in range(7)] == want[5:]


def test_resume_does_not_tokenize_what_was_consumed_before_it(corpus):
    """A resume rebuilds the block it stopped in: the documents tokenized to continue are about
    the same at step 2 and at step 60 (past a whole epoch of this rank), far fewer than all
    consumed before step 60."""
    files, _ = corpus
    cost = {}
    for step in (2, 300):
        (loader,), (tok,) = resumed_at(files, step)
        loader.next_step()
        loader.close()
        cost[step] = len(tok.documents)
    (straight,) = loaders(files, tok=(counter := CountingTokenizer()))
    for _ in range(300):
        straight.next_step()
    straight.close()
    consumed = len(counter.documents)
    # To continue: the documents of the block it stopped in, read in tokenizer batches of 64,
    # plus what the producer reads ahead (its prefetch queue): the same bound at any step.
    assert cost[300] <= cost[2] + 64
    assert cost[300] < consumed / 3


def test_heldout_documents_are_dropped_before_tokenizing(corpus):
    from snoo_train.data.split import is_validation

    files, docs = corpus
    tok = CountingTokenizer()
    (loader,) = loaders(files, tok=tok, val_fraction=0.25)
    for _ in range(40):
        loader.next_step()
    loader.close()
    held = {d for d in docs if is_validation(d, 0.25)}
    assert held and not held & set(tok.documents)


def test_an_empty_stream_is_one_clear_error(tmp_path):
    from snoo_train.data import DataError

    path = tmp_path / "empty.jsonl"
    write_jsonl(path, ["", ""])
    (loader,) = loaders([str(path)])
    with pytest.raises(DataError, match="yielded no training window"):
        loader.next_step()
    loader.close()


def test_windows_are_the_packed_documents(corpus):
    """With one block per window (no shuffle) the stream is the documents of this rank, in
    order, each followed by EOS, cut into windows that share one token (packing.py's layout)."""
    files, docs = corpus
    (loader,) = loaders(files[:1], shuffle_buffer=1, val_fraction=0.0, batch=1)
    got = [rows(loader.next_step())[0] for _ in range(20)]
    loader.close()
    stream = []
    for d in docs[:100]:
        stream += list(d.encode()) + [256]
    want = [tuple(stream[i * SEQ : i * SEQ + SEQ]) for i in range(20)]
    assert got == want
    assert np.array(got).shape == (20, SEQ)


def test_a_streaming_run_resumes_exactly_at_two_ranks_and_refuses_another_world_size(tmp_path, corpus):
    """Through the entry point: every rank's stream position is gathered into the checkpoint;
    resumed at 2 ranks the losses continue bit for bit; at 1 rank the resume is refused with the
    reason, and nothing saved changes."""
    import shutil

    from tests.conftest import TINY, read_records, run_entry
    from tests.test_faults import one_error_line, saved_state

    files, _ = corpus
    args = TINY + ["data=local", f"data.files=[{','.join(files)}]", "data.streaming=true", "data.max_documents=null",
                   "data.shuffle_buffer=16", "data.seq_len=32", "trainer.max_steps=8", "checkpoint.interval=4"]  # fmt: skip
    full = tmp_path / "full"
    proc = run_entry(args + [f"hydra.run.dir={full}"], tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "resumed"
    shutil.copytree(full, run, ignore=shutil.ignore_patterns("step_00000008"))
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:4]))
    before = saved_state(run)
    refused = run_entry(args + [f"hydra.run.dir={run}", "trainer.resume=auto"], tmp_path, nproc=1)
    one_error_line(refused, "written by 2 ranks streaming", "resumes at that world size only", "data=prepared")
    assert saved_state(run) == before
    proc = run_entry(args + [f"hydra.run.dir={run}", "trainer.resume=auto"], tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {r["step"]: r["loss"] for r in read_records(full) if r["step"] > 4 and "loss" in r}
    got = {r["step"]: r["loss"] for r in read_records(run) if r["step"] > 4 and "loss" in r}
    assert got == want and len(want) == 4
