"""Streaming training data (`data.streaming=true`, hub or local sources): each rank reads its own
share of the documents, tokenizes them in a background thread, and can resume at any step for the
same small cost.

Per rank, the pipeline is

    documents (datasets.distributed.split_dataset_by_node: whole shards per rank when the source
        has a multiple of world_size shards, else every world_size-th document)
    -> drop held-out documents (the text-hash rule of the in-memory path)
    -> tokenize, pack into windows of seq_len + 1 tokens (packing.py's layout)
    -> shuffle in blocks of data.shuffle_buffer windows, each block permuted by
       (seed, rank, world size, epoch, block)

A block is a pure function of where it starts: the document stream's position
(`IterableDataset.state_dict()`), the tokens left over from the previous block, the epoch and the
block number. So the state after any window is (the start of its block, how many of the block's
windows were consumed), a few hundred bytes: a resume restores the stream at the block's start
and rebuilds that one block; it never re-reads what earlier blocks consumed.

The order depends on the world size (each rank owns a share of the stream), so a checkpoint of a
streaming run resumes at the same world size only; data=prepared resumes at any.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from .background import Background
from .errors import DataError
from .packing import num_windows, storage_dtype
from .sources import Source, check_text
from .split import is_validation
from .tokenizer import Tokenizer

# Documents tokenized per call: the tokenizer's batch API is much faster than one at a time.
_TOKENIZE_BATCH = 64


class BlockStart:
    """Where a block begins: everything needed to rebuild it."""

    def __init__(self, epoch: int, block: int, position: Optional[dict], pending: np.ndarray):
        self.epoch, self.block, self.position, self.pending = epoch, block, position, pending

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "block": self.block, "position": self.position, "pending": self.pending.tolist()}

    @classmethod
    def from_dict(cls, d: dict, dtype: np.dtype) -> BlockStart:
        return cls(int(d["epoch"]), int(d["block"]), d["position"], np.asarray(d["pending"], dtype=dtype))


class StreamingTrain:
    """The training side of a streamed source, before it is split among ranks: the loader asks
    for one rank's stream (`rank_stream`)."""

    def __init__(self, source: Source, tokenizer: Tokenizer, seq_len: int, *, val_fraction: float, block_windows: int):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.val_fraction, self.block_windows = val_fraction, block_windows

    def rank_stream(self, rank: int, world_size: int, seed: int) -> RankStream:
        return RankStream(
            self.source, self.tokenizer, self.seq_len, rank=rank, world_size=world_size, seed=seed,
            val_fraction=self.val_fraction, block_windows=self.block_windows,
        )  # fmt: skip


class RankStream:
    """One rank's training windows from a streamed source, produced ahead in a thread.

    `next_windows(n)` returns the next n windows; `state_dict()` is the position after the last
    window returned, and `load_state_dict` continues from such a position."""

    def __init__(
        self,
        source: Source,
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        val_fraction: float,
        block_windows: int,
        prefetch_windows: int = 256,
    ):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.val_fraction, self.block_windows = val_fraction, block_windows
        self.dtype = storage_dtype(tokenizer.vocab_size)
        self.prefetch_windows = prefetch_windows
        self._state = {"start": BlockStart(0, 0, None, np.empty(0, dtype=self.dtype)), "consumed": 0}
        self._thread: Optional[Background] = None
        self.documents_read = 0  # documents this rank took from the stream (tests, benchmarks)

    # -- the documents of this rank --

    def _documents(self, position: Optional[dict]):
        from datasets.distributed import split_dataset_by_node

        docs = self.source.documents.select_columns([self.source.text_field])
        mine = split_dataset_by_node(docs, rank=self.rank, world_size=self.world_size)
        if position is not None:
            mine.load_state_dict(position)
        return mine

    def _doc_batches(self, position: Optional[dict]) -> Iterator[list[tuple[str, dict]]]:
        """This rank's training documents from `position`, in batches, each with the stream
        position just after it."""
        mine = self._documents(position)
        batch: list[tuple[str, dict]] = []
        for example in mine:
            self.documents_read += 1
            text = check_text(self.source, example[self.source.text_field], None)
            if text and not is_validation(text, self.val_fraction):
                batch.append((text, copy.deepcopy(mine.state_dict())))
                if len(batch) == _TOKENIZE_BATCH:
                    yield batch
                    batch = []
        if batch:
            yield batch

    # -- blocks --

    def blocks(self, start: BlockStart) -> Iterator[tuple[BlockStart, np.ndarray]]:
        """(start of a block, its windows in shuffled order), from `start` on, epoch after epoch."""
        T, M = self.seq_len, self.block_windows
        eos = np.array([self.tokenizer.eos_id], dtype=self.dtype)
        while True:
            pending, position, windows = start.pending, start.position, []
            produced_in_epoch = start.block > 0 or len(pending) > 0
            for batch in self._doc_batches(start.position):
                ids = self.tokenizer.encode_batch([text for text, _ in batch])
                for (_, after), doc in zip(batch, ids):
                    pending = np.concatenate([pending, np.asarray(doc).astype(self.dtype, copy=False), eos])
                    position = after
                    n = num_windows(len(pending), T)
                    windows += [pending[i * T : i * T + T + 1] for i in range(n)]
                    pending = pending[n * T :].copy()
                    while len(windows) >= M:
                        yield start, self._shuffle(start, windows[:M])
                        produced_in_epoch = True
                        # The next block starts after this document, with what is left of it
                        # (windows past the block are turned back into pending tokens).
                        spill = windows[M:]
                        pending = np.concatenate([_unpack(spill)[:-1], pending]) if spill else pending
                        start = BlockStart(start.epoch, start.block + 1, copy.deepcopy(position), pending)
                        n = num_windows(len(pending), T)
                        windows = [pending[i * T : i * T + T + 1] for i in range(n)]
                        pending = pending[n * T :].copy()
            if windows:
                yield start, self._shuffle(start, windows)
                produced_in_epoch = True
            if not produced_in_epoch:
                raise DataError(f"{self.source.describe} yielded no training window for rank {self.rank}")
            start = BlockStart(start.epoch + 1, 0, None, np.empty(0, dtype=self.dtype))

    def _shuffle(self, start: BlockStart, windows: list[np.ndarray]) -> list[np.ndarray]:
        key = [self.seed, self.rank, self.world_size, start.epoch, start.block]
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key))).permutation(len(windows))
        return [windows[i] for i in order]

    # -- consuming --

    def _produce(self) -> Iterator[tuple[np.ndarray, dict]]:
        """Windows with the state after each, from the current state."""
        state = self._state
        skip = state["consumed"]
        for start, windows in self.blocks(state["start"]):
            for j in range(skip, len(windows)):
                yield windows[j], {"start": start, "consumed": j + 1}
            skip = 0

    def next_windows(self, n: int) -> np.ndarray:
        if self._thread is None:
            # blocks() cycles epochs: the stream never ends.
            self._thread = Background(
                self._produce(), self.prefetch_windows, name="snoo-stream", ended="the training stream ended"
            )
        out = []
        for _ in range(n):
            window, self._state = self._thread.get()
            out.append(window)
        return np.stack(out)

    def state_dict(self) -> dict[str, Any]:
        return {"start": self._state["start"].to_dict(), "consumed": self._state["consumed"]}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self._state = {"start": BlockStart.from_dict(state["start"], self.dtype), "consumed": int(state["consumed"])}

    def close(self) -> None:
        if self._thread is not None:
            self._thread.stop(timeout=5)
            self._thread = None


def _unpack(windows: list[np.ndarray]) -> np.ndarray:
    """The flat tokens that consecutive windows were cut from (they share one token)."""
    return np.concatenate([windows[0][:1]] + [w[1:] for w in windows])
