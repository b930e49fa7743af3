"""Tokenize documents and pack them into fixed windows of `seq_len + 1` tokens.

Documents are concatenated, each followed by EOS, into one flat token array; window `i` is
`tokens[i*T : i*T + T + 1]` for `T = seq_len`. Consecutive windows share one token, so
every token except the very first is a label exactly once (inputs = w[:-1], labels = w[1:]).
The flat array is stored as uint16 whenever the vocabulary fits (4x smaller than int64:
the whole standard library is about 60 MB per rank) and can be a read-only memmap.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Optional

import numpy as np

from .errors import DataError
from .sources import Source, iter_texts
from .split import document_hash
from .tokenizer import Tokenizer


def storage_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


class PackedDataset:
    """Map-style windows over a flat token array: `len`, and `ds[i]` -> array of T+1 tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, num_documents: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_documents = num_documents
        self.num_tokens = int(tokens.shape[0])
        n = num_windows(self.num_tokens, seq_len)
        if n:
            # A strided read-only view: no copy, works on a memmap.
            view = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
            self._windows = view[::seq_len][:n]
        else:
            self._windows = np.empty((0, seq_len + 1), dtype=tokens.dtype)

    def __len__(self) -> int:
        return int(self._windows.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(self._windows[i])

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Windows at `indices` as one (len(indices), T+1) array."""
        return np.asarray(self._windows[np.asarray(indices, dtype=np.int64)])


def _with_eos(ids: np.ndarray, eos: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.concatenate([np.asarray(ids).astype(dtype, copy=False), eos])


def pack_split(
    source: Source, tokenizer: Tokenizer, val_fraction: float
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Flat train and validation token arrays (+ their document counts) from one source.

    If `val_fraction > 0` but no document hashed below it (a tiny corpus, e.g. a capped test
    run), the document with the smallest hash is held out anyway, so evaluation always has
    data; the choice is still a pure function of the texts.
    """
    dtype = storage_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    lowest: Optional[tuple[float, int]] = None  # (hash, index into train)
    for texts in iter_texts(source):
        hashes = [document_hash(t) for t in texts] if val_fraction > 0 else [1.0] * len(texts)
        for h, ids in zip(hashes, tokenizer.encode_batch(texts)):
            if h < val_fraction:
                val.append(_with_eos(ids, eos, dtype))
            else:
                if lowest is None or h < lowest[0]:
                    lowest = (h, len(train))
                train.append(_with_eos(ids, eos, dtype))
    if not train and not val:
        raise DataError(f"{source.describe} produced no non-empty documents")
    if val_fraction > 0 and not val and len(train) > 1:
        val.append(train.pop(lowest[1]))
    if not train:
        raise DataError(
            f"{source.describe}: all {len(val)} documents were held out for validation "
            f"(data.val_fraction={val_fraction}); add documents, lower data.val_fraction, or for a "
            "single text file use data.sample_by=paragraph or line"
        )
    return _concat(train, dtype), _concat(val, dtype), len(train), len(val)


def pack_documents(source: Source, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """One flat token array from all of a source's documents (a named validation split)."""
    dtype = storage_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    docs = [
        _with_eos(ids, eos, dtype)
        for texts in iter_texts(source)
        for ids in tokenizer.encode_batch(texts)
    ]
    return _concat(docs, dtype), len(docs)


def _concat(arrays: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype)


class StreamingPackedDataset:
    """Windows packed on the fly from a streamed source, in stream order: the validation side of
    `data.streaming=true` (`head`: the same first windows at every evaluation, on every rank).
    Training streams per rank instead (streaming.py).

    `keep_validation`: None keeps every document, True only the held-out ones, False only
    the training ones (by the same text hash as the map-style split); held-out documents are
    chosen before tokenizing, so the rest are never tokenized here.
    """

    def __init__(
        self,
        source: Source,
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        keep_validation: Optional[bool] = None,
        val_fraction: float = 0.0,
        shuffle_buffer: int = 10000,
    ):
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.keep_validation = keep_validation
        self.val_fraction = val_fraction
        self.shuffle_buffer = shuffle_buffer
        self._head: list[np.ndarray] = []
        self._head_complete = False  # the whole stream is shorter than what was asked for

    def _keep(self, text: str) -> bool:
        if self.keep_validation is None:
            return True
        held_out = self.val_fraction > 0 and document_hash(text) < self.val_fraction
        return held_out == self.keep_validation

    def windows(self, epoch: int = 0) -> Iterator[np.ndarray]:
        docs = self.source.documents
        if hasattr(docs, "set_epoch"):
            # A shuffled hub stream reorders its shards and documents per epoch (seed + epoch).
            docs.set_epoch(epoch)
        return self._pack(iter_texts(self.source))

    def head(self, n: int) -> list[np.ndarray]:
        """The first `n` windows in stream order (epoch 0), read once and kept: evaluation
        asks for the same windows every time."""
        if len(self._head) < n and not self._head_complete:
            self._head = list(itertools.islice(self.windows(0), n))
            self._head_complete = len(self._head) < n
        return self._head[:n]

    def _pack(self, batches: Iterable[list[str]]) -> Iterator[np.ndarray]:
        T = self.seq_len
        dtype = storage_dtype(self.tokenizer.vocab_size)
        eos = np.array([self.tokenizer.eos_id], dtype=dtype)
        pending = np.empty(0, dtype=dtype)
        for texts in batches:
            texts = [t for t in texts if self._keep(t)]
            if not texts:
                continue
            parts = [pending] + [
                _with_eos(ids, eos, dtype) for ids in self.tokenizer.encode_batch(texts)
            ]
            pending = np.concatenate(parts)
            n = num_windows(len(pending), T)
            for i in range(n):
                yield pending[i * T : i * T + T + 1].copy()
            # The last window's final token starts the next window, as in the map-style layout.
            pending = pending[n * T :]
