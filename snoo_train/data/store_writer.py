"""Writing one split of a token store, shard by shard, so that an interrupted prepare resumes.

A `SplitWriter` appends documents to the open shard and closes it at the first document end at
or past `shard_tokens` (documents never straddle shards, so each shard's .idx is its own). Its
`state()` is a few numbers: the closed shards (name, tokens, documents, sha256) and how many
tokens and documents of the open shard are committed. A resumed writer truncates the open shard
to what was committed, so bytes written after the last progress save (a kill -9 mid-chunk) are
never read.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import numpy as np

from .store import sha256_file, shard_name


class SplitWriter:
    def __init__(self, root: str, split: str, dtype: np.dtype, shard_tokens: int, state: Optional[dict] = None):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, np.dtype(dtype), shard_tokens
        state = state or {"shards": [], "open": {"index": 0, "tokens": 0, "documents": 0}}
        self.shards: list[dict[str, Any]] = [dict(s) for s in state["shards"]]
        self.index = int(state["open"]["index"])
        self.tokens = int(state["open"]["tokens"])  # committed tokens in the open shard
        self.documents = int(state["open"]["documents"])
        self._bin = self._idx = None
        self._sha = hashlib.sha256()
        if self.tokens or self.documents:
            self._reopen()

    # -- files --

    def _paths(self, index: int) -> tuple[str, str]:
        base = os.path.join(self.root, shard_name(self.split, index))
        return base + ".bin", base + ".idx"

    def _reopen(self) -> None:
        """Continue the open shard of a resumed prepare: drop what was written after the last
        commit, and re-hash the committed prefix."""
        bin_path, idx_path = self._paths(self.index)
        for path, size in ((bin_path, self.tokens * self.dtype.itemsize), (idx_path, self.documents * 8)):
            with open(path, "r+b") as f:
                f.truncate(size)
        self._sha = hashlib.sha256()
        with open(bin_path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                self._sha.update(block)
        self._bin, self._idx = open(bin_path, "ab"), open(idx_path, "ab")

    def _open(self) -> None:
        bin_path, idx_path = self._paths(self.index)
        self._bin, self._idx = open(bin_path, "wb"), open(idx_path, "wb")
        self._sha = hashlib.sha256()

    def _close_shard(self) -> None:
        self._bin.close()
        self._idx.close()
        self._bin = self._idx = None
        self.shards.append(
            {
                "name": shard_name(self.split, self.index),
                "tokens": self.tokens,
                "documents": self.documents,
                "sha256": self._sha.hexdigest(),
            }
        )
        self.index, self.tokens, self.documents = self.index + 1, 0, 0

    # -- appending --

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> list[tuple[int, int]]:
        """Append documents (`tokens` concatenated, each `lengths[i]` long, EOS included).
        Returns (shard index, document index in that shard) for each document."""
        placed: list[tuple[int, int]] = []
        start = 0
        lengths = np.asarray(lengths, dtype=np.int64)
        while len(lengths):
            if self._bin is None:
                self._open()
            ends = np.cumsum(lengths)
            # The shard closes after the first document that brings it to shard_tokens.
            room = self.shard_tokens - self.tokens
            n = min(int(np.searchsorted(ends, room, side="left")) + 1, len(lengths))
            chunk = np.ascontiguousarray(tokens[start : start + int(ends[n - 1])], dtype=self.dtype)
            data = chunk.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self._bin.write(data)
            self._sha.update(data)
            self._idx.write((self.tokens + ends[:n]).astype("<u8").tobytes())
            placed += [(self.index, self.documents + i) for i in range(n)]
            self.tokens += int(ends[n - 1])
            self.documents += n
            start += int(ends[n - 1])
            lengths = lengths[n:]
            if self.tokens >= self.shard_tokens:
                self._close_shard()
        return placed

    def flush(self) -> None:
        for f in (self._bin, self._idx):
            if f is not None:
                f.flush()

    def state(self) -> dict[str, Any]:
        return {
            "shards": [dict(s) for s in self.shards],
            "open": {"index": self.index, "tokens": self.tokens, "documents": self.documents},
        }

    def finish(self) -> dict[str, Any]:
        """Close the last shard; the split's manifest entry."""
        if self._bin is not None and self.documents:
            self._close_shard()
        elif self._bin is not None:
            self._bin.close()
            self._idx.close()
            for path in self._paths(self.index):
                os.remove(path)
            self._bin = self._idx = None
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }

    def take_document(self, shard: int, doc: int) -> np.ndarray:
        """Remove document `doc` from closed shard `shard` and return its tokens: the held-out
        fallback of a corpus too small for any document to hash into validation (rewrites one
        shard, once, at the end)."""
        bin_path, idx_path = self._paths(shard)
        tokens = np.fromfile(bin_path, dtype=self.dtype.newbyteorder("<"))
        ends = np.fromfile(idx_path, dtype="<u8").astype(np.int64)
        lo, hi = (int(ends[doc - 1]) if doc else 0), int(ends[doc])
        taken = tokens[lo:hi].copy()
        kept = np.concatenate([tokens[:lo], tokens[hi:]])
        new_ends = np.concatenate([ends[:doc], ends[doc + 1 :] - (hi - lo)])
        kept.tofile(bin_path)
        new_ends.astype("<u8").tofile(idx_path)
        entry = self.shards[shard]
        entry.update(tokens=int(len(kept)), documents=int(len(new_ends)), sha256=sha256_file(bin_path))
        return taken
