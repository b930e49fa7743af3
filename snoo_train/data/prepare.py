"""Tokenize a data config once, in parallel, into a token store (store.py) that training
memory-maps with `data=prepared`.

    python -m snoo_train.data.prepare data=local 'data.files=[corpus/*.jsonl]' data.tokenizer=gpt2 \\
        prepare.out=tokens/corpus prepare.workers=16

The documents are read in source order and cut into fixed chunks of `prepare.chunk_documents`;
a process pool tokenizes the chunks and the results are written back in chunk order, so the
store is byte-identical for any number of workers. The held-out documents (the same text-hash
rule as the in-memory path, or a named hub split) go to their own shards. Everything is written
under `<out>.partial/`, with a progress file saved after every chunk; an interrupted prepare
(kill -9 included) resumes from it when run again with the same config, and the directory is
renamed to `<out>` only once complete, so training never reads a half-written store. One
prepare at a time holds `<out>.lock`: a second one into the same output is refused at once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from snoo_train.config import PREPARE_TIME_KEYS, ConfigError, PrepareJob, _check_data
from snoo_train.lock import ProcessLock

from .build import fallback_tokenizer, open_hf, open_sources
from .errors import DataError
from .packing import storage_dtype
from .sources import Source, iter_texts, read_stdlib
from .split import document_hash
from .store import FORMAT, MANIFEST, TOKENIZER_DIR, VERSION, partial_dir
from .store_writer import SplitWriter
from .tokenizer import Tokenizer, build_tokenizer
from .tool import run_tool

log = logging.getLogger("snoo_train.prepare")

PROGRESS = "progress.json"
# Chunks queued ahead of the writer, per worker: enough to keep every worker busy, bounded so
# that reading never runs ahead of tokenizing by more than a few chunks.
_IN_FLIGHT_PER_WORKER = 4


# ---- tokenizing one chunk (in a worker process, or inline with one worker) ----------------

_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(name: str) -> None:
    global _TOKENIZER
    # One tokenizer thread per worker process: the parallelism is the pool's.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = build_tokenizer(name)


def tokenize_chunk(texts: list[str], val_fraction: float, all_val: bool) -> dict[str, Any]:
    """Token ids of a chunk, split into training and held-out documents: per side the flat tokens
    (each document followed by EOS), the document lengths, and for the training side the lowest
    document hash and its position (the small-corpus fallback)."""
    tok = _TOKENIZER
    dtype = storage_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    hashes = [document_hash(t) for t in texts] if val_fraction > 0 and not all_val else [1.0] * len(texts)
    out: dict[str, Any] = {"lowest": None}
    sides: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for h, ids in zip(hashes, tok.encode_batch(texts)):
        side = "val" if all_val or h < val_fraction else "train"
        sides[side].append(np.concatenate([np.asarray(ids).astype(dtype, copy=False), eos]))
        if side == "train" and (out["lowest"] is None or h < out["lowest"][0]):
            out["lowest"] = (h, len(sides["train"]) - 1)
    for side, docs in sides.items():
        out[side] = (
            np.concatenate(docs) if docs else np.empty(0, dtype=dtype),
            np.array([len(d) for d in docs], dtype=np.int64),
        )
    return out


def _tokenize_task(task: tuple[list[str], float, bool]) -> dict[str, Any]:
    return tokenize_chunk(*task)


# ---- the job ------------------------------------------------------------------------------


def check_job(job: PrepareJob) -> None:
    p, d = job.prepare, job.data
    if not p.out:
        raise ConfigError("prepare.out must name the store directory to write (prepare.out=tokens/corpus)")
    if d.source == "prepared":
        raise ConfigError("data=prepared reads a store; prepare reads a source: data=stdlib, local or hf")
    for key in ("workers", "shard_tokens", "chunk_documents"):
        if getattr(p, key) < 1:
            raise ConfigError(f"prepare.{key}={getattr(p, key)} must be >= 1")
    if d.cache_dir:
        raise ConfigError("data.cache_dir caches the in-memory path's tokens; prepare writes a store instead (prepare.out)")
    if d.verify_checksums:
        raise ConfigError("data.verify_checksums checks a store when training reads it (data=prepared); prepare writes the checksums")
    _check_data(d)


def recorded_data(d) -> dict[str, Any]:
    """The data keys that decide a store's bytes (recorded in its manifest, and keying an
    interrupted prepare): not the ones that only shape training (seq_len, shuffle_buffer)."""
    keys = ("source", "path", "tokenizer") + PREPARE_TIME_KEYS
    return {k: getattr(d, k) for k in sorted(keys)}


def job_key(job: PrepareJob, tokenizer: Tokenizer) -> str:
    """Everything that changes the bytes of the store; an interrupted prepare resumes only under
    the same key. (The number of workers and the chunk size change nothing.)"""
    blob = json.dumps(
        [VERSION, recorded_data(job.data), tokenizer.fingerprint, job.prepare.shard_tokens],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _check_out(job: PrepareJob) -> str:
    """The store path, refusing to overwrite a complete store unless asked."""
    out = os.path.normpath(os.path.expanduser(job.prepare.out))
    if os.path.exists(out) and not job.prepare.overwrite:
        if os.path.isfile(os.path.join(out, MANIFEST)):
            raise DataError(f"prepare.out={job.prepare.out} is a token store already; pass prepare.overwrite=true to replace it")
        if not os.path.isdir(out) or os.listdir(out):
            raise DataError(
                f"prepare.out={job.prepare.out} exists and is not an empty directory; choose another path "
                "or pass prepare.overwrite=true to replace it"
            )
    return out


class Progress:
    """`<out>.partial/progress.json`: what is committed, saved atomically after every chunk."""

    def __init__(self, partial: str, key: str, overwrite: bool):
        self.path = os.path.join(partial, PROGRESS)
        self.state: dict[str, Any] = {"key": key, "phase": 0, "documents": 0, "writers": {}, "lowest": None}
        if os.path.isdir(partial):
            saved = self._read()
            if saved is not None and saved.get("key") == key:
                self.state = saved
                log.info("resuming an interrupted prepare from %s: %d documents of phase %d done", partial, saved["documents"], saved["phase"])
                return
            if not overwrite:
                what = "of a different config or prepare version" if saved is not None else "with no readable progress.json"
                raise DataError(
                    f"{partial} holds an interrupted prepare {what}; delete it, or pass "
                    "prepare.overwrite=true to start over"
                )
            shutil.rmtree(partial)
        os.makedirs(partial)

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def save(self, **fields) -> None:
        self.state.update(fields)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)


def _phases(job: PrepareJob) -> list[tuple[Source, float, bool]]:
    """(source, held-out fraction, all documents held out) in the order they are written: the
    training source split by the text-hash rule; or, with a named hub validation split, the
    training split whole and then the validation split whole."""
    d = job.data
    if d.source == "hf" and d.streaming:
        # Stream the hub dataset through the tokenizers instead of downloading the split first.
        train, val = open_hf(d, d.split, streaming=True), (open_hf(d, d.val_split, streaming=True) if d.val_split else None)
    else:
        listing, train, val, _ = open_sources(d)
        if train is None:
            train = read_stdlib(listing)
    if val is None:
        return [(train, d.val_fraction, False)]
    return [(train, 0.0, False), (val, 0.0, True)]


def _chunks(source: Source, size: int, skip: int) -> Iterator[list[str]]:
    """The source's non-empty documents in chunks of `size`, after the first `skip` (read, not
    tokenized: a resumed prepare does not tokenize again what it committed)."""
    pending: list[str] = []
    for texts in iter_texts(source):
        if skip:
            drop = min(skip, len(texts))
            texts, skip = texts[drop:], skip - drop
        pending += texts
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def _results(pool, tasks: Iterator[tuple], workers: int) -> Iterator[dict[str, Any]]:
    """Tokenized chunks in submission order, at most a few chunks per worker in flight."""
    if pool is None:
        yield from map(_tokenize_task, tasks)
        return
    in_flight: collections.deque = collections.deque()
    for task in tasks:
        in_flight.append(pool.apply_async(_tokenize_task, (task,)))
        if len(in_flight) >= workers * _IN_FLIGHT_PER_WORKER:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def _total_documents(source: Source) -> Optional[int]:
    try:
        return len(source.documents)
    except TypeError:  # a stream: unknown until read
        return None


def _start_pool(job: PrepareJob, tokenizer: Tokenizer):
    """A pool of `prepare.workers` tokenizer processes; None for one worker (tokenize inline)."""
    global _TOKENIZER
    if job.prepare.workers == 1:
        _TOKENIZER = tokenizer
        return None
    # fork: the workers start in milliseconds, without importing the project again.
    return multiprocessing.get_context("fork").Pool(
        job.prepare.workers, initializer=_init_worker, initargs=(job.data.tokenizer,)
    )


def _write_phase(job, phase, source, val_fraction, all_val, skip, writers, progress, pool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=_total_documents(source), initial=skip, unit="doc", file=sys.stderr,
        disable=not job.prepare.progress, desc="prepare", dynamic_ncols=True,
    )  # fmt: skip
    tasks = ((chunk, val_fraction, all_val) for chunk in _chunks(source, job.prepare.chunk_documents, skip))
    done = skip
    try:
        for result in _results(pool, tasks, job.prepare.workers):
            lowest = progress.state["lowest"]
            placed = writers["train"].add(*result["train"])
            if result["lowest"] is not None and (lowest is None or result["lowest"][0] < lowest[0]):
                lowest = [result["lowest"][0], *placed[result["lowest"][1]]]
            writers["val"].add(*result["val"])
            for writer in writers.values():
                writer.flush()
            n = len(result["train"][1]) + len(result["val"][1])
            done += n
            # The data first, then the record of it: a kill between the two loses one chunk's
            # work, never reads bytes that were not committed.
            progress.save(phase=phase, documents=done, writers={s: w.state() for s, w in writers.items()}, lowest=lowest)
            bar.update(n)
            bar.set_postfix(tokens=f"{sum(_committed(w) for w in writers.values()):,}", refresh=False)
    finally:
        bar.close()


def _committed(writer: SplitWriter) -> int:
    return sum(s["tokens"] for s in writer.shards) + writer.tokens


def _finish(job, tokenizer, writers, progress, phases, partial: str) -> dict[str, Any]:
    """Close the shards, hold out one document if none hashed into validation (as the in-memory
    path does), save the tokenizer and write the manifest: the store is complete."""
    describe = phases[0][0].describe
    train = writers["train"].finish()
    named_val = len(phases) > 1
    lowest = progress.state["lowest"]
    if train["documents"] == 0 and not named_val and writers["val"].documents + len(writers["val"].shards) == 0:
        raise DataError(f"{describe} produced no non-empty documents")
    if not named_val and job.data.val_fraction > 0 and not writers["val"].shards and not writers["val"].documents:
        if train["documents"] > 1:
            taken = writers["train"].take_document(lowest[1], lowest[2])
            writers["val"].add(taken, np.array([len(taken)]))
            train = writers["train"].finish()
    val = writers["val"].finish()
    if train["documents"] == 0:
        raise DataError(
            f"{describe}: all {val['documents']} documents were held out for validation "
            f"(data.val_fraction={job.data.val_fraction}); add documents, lower data.val_fraction, or for a "
            "single text file use data.sample_by=paragraph or line"
        )
    if hasattr(tokenizer, "save"):
        tokenizer.save(os.path.join(partial, TOKENIZER_DIR))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": {
            "name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        },  # fmt: skip
        "dtype": storage_dtype(tokenizer.vocab_size).name,
        "splits": {"train": train, "val": val},
        "source": describe,
        "data": recorded_data(job.data),
        "prepare": {"shard_tokens": job.prepare.shard_tokens},
    }
    with open(os.path.join(partial, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return manifest


def _publish(partial: str, out: str) -> None:
    """Rename the complete store into place (replacing an old one only now, when asked)."""
    os.remove(os.path.join(partial, PROGRESS))
    for name in os.listdir(partial):
        fd = os.open(os.path.join(partial, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    old = None
    if os.path.exists(out):
        old = out + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def lock_output(out: str) -> ProcessLock:
    """One prepare per output: `<out>.lock` (beside the store, which is renamed into place, and
    its `.partial` directory, which a resume reuses). Two prepares would both resume one
    `.partial` and write the same shards; the second is refused at once, naming the first. A
    lock left by a killed prepare is taken over: its `.partial` resumes."""
    return ProcessLock(
        out + ".lock",
        what=f"prepare.out={out}",
        holder="prepare",
        advice="two prepares into one store would write the same shards; wait for it to finish, stop it, "
        "or choose another prepare.out",
        error=DataError,
    )


def prepare(job: PrepareJob) -> dict[str, Any]:
    """Write the store `job.prepare.out`; returns a summary (documents, tokens, seconds)."""
    check_job(job)
    # The store records the tokenizer by name: null means the source's usual one here.
    job.data.tokenizer = job.data.tokenizer or fallback_tokenizer(job.data)
    out = os.path.normpath(os.path.expanduser(job.prepare.out))
    with lock_output(out) as lock:
        if lock.stale_holder:
            log.warning("took over the lock of a prepare that ended without releasing it (%s)", lock.stale_holder)
        return _prepare_locked(job)


def _prepare_locked(job: PrepareJob) -> dict[str, Any]:
    out = _check_out(job)
    tokenizer = build_tokenizer(job.data.tokenizer)
    dtype = storage_dtype(tokenizer.vocab_size)
    partial = partial_dir(out)
    progress = Progress(partial, job_key(job, tokenizer), job.prepare.overwrite)
    writers = {
        split: SplitWriter(partial, split, dtype, job.prepare.shard_tokens, progress.state["writers"].get(split))
        for split in ("train", "val")
    }
    t0 = time.perf_counter()
    phases = _phases(job)
    pool = _start_pool(job, tokenizer)
    try:
        for phase, (source, val_fraction, all_val) in enumerate(phases):
            if phase >= progress.state["phase"]:
                skip = progress.state["documents"] if phase == progress.state["phase"] else 0
                _write_phase(job, phase, source, val_fraction, all_val, skip, writers, progress, pool)
                progress.save(phase=phase + 1, documents=0)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    manifest = _finish(job, tokenizer, writers, progress, phases, partial)
    _publish(partial, out)
    seconds = time.perf_counter() - t0
    splits = manifest["splits"]
    tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    log.info(
        "prepared %s: %d train + %d val documents, %d tokens (%s) in %d+%d shards, %.1f s, %.0f tokens/s",
        out, splits["train"]["documents"], splits["val"]["documents"], tokens, manifest["dtype"],
        len(splits["train"]["shards"]), len(splits["val"]["shards"]), seconds, tokens / max(seconds, 1e-9),
    )  # fmt: skip
    return {"out": out, "tokens": tokens, "documents": splits["train"]["documents"] + splits["val"]["documents"], "seconds": seconds}


def main(argv: Optional[list[str]] = None) -> None:
    run_tool(
        "prepare", PrepareJob, __doc__, prepare, argv,
        interrupted="interrupted: the committed chunks are kept; run the same command again to resume",
    )  # fmt: skip


if __name__ == "__main__":
    main()
