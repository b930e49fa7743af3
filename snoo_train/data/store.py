"""Token stores: a corpus tokenized once (`python -m snoo_train.data.prepare`) and memory-mapped
by training (`data=prepared`).

A store is a directory:

    manifest.json          what made the store and what it holds; written last, so its presence
                           marks a complete store
    tokenizer/             the Hugging Face tokenizer that made it (absent for `byte`)
    train-00000.bin        flat tokens, little-endian uint16 (vocabulary <= 65,536) or uint32:
                           documents one after another, each followed by EOS
    train-00000.idx        uint64: the end offset of each document in the shard
    val-00000.bin / .idx   the held-out documents, the same layout

Each split reads as one flat token array across its shards, exactly the array the in-memory path
packs (packing.py), so window `i` is `tokens[i*T : i*T + T + 1]` and a store trains on the same
batches as `pack_split` on the same corpus. Opening a store reads the manifest and stats the
shards; tokens are paged in only when a window is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from .errors import DataError
from .packing import num_windows

FORMAT = "snoo-train-token-store"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


def partial_dir(root: str) -> str:
    """Where `prepare` writes a store until it is complete (then renamed to `root`)."""
    return os.path.normpath(root) + ".partial"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def sha256_file(path: str, limit: Optional[int] = None) -> str:
    """The sha256 of a file (of its first `limit` bytes), read in 8 MiB blocks."""
    digest = hashlib.sha256()
    left = os.path.getsize(path) if limit is None else limit
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(8 << 20, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


class StoreError(DataError):
    """A store that is missing, incomplete, damaged or made for another tokenizer."""


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a complete store; a clear StoreError for anything else at `path`."""
    root = os.path.expanduser(path)
    manifest = os.path.join(root, MANIFEST)
    if not os.path.isfile(manifest):
        partial = partial_dir(root)
        if os.path.isdir(partial):
            raise StoreError(
                f"no complete token store at {path}: a prepare was interrupted (its partial output is "
                f"{partial}); rerun the same prepare command to finish it"
            )
        what = "is not a token store (no manifest.json)" if os.path.isdir(root) else "does not exist"
        raise StoreError(f"{path} {what}; make one with python -m snoo_train.data.prepare prepare.out={path}")
    try:
        with open(manifest) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise StoreError(f"{manifest} is unreadable ({err}); prepare the store again") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{manifest} is not a snoo-train token store manifest")
    if meta.get("version") != VERSION:
        raise StoreError(
            f"{path} is a version {meta.get('version')} token store; this snoo-train reads version {VERSION}: "
            "prepare it again"
        )
    return meta


class ShardedTokens:
    """One split of a store as a flat read-only token array across its memory-mapped shards."""

    def __init__(self, root: str, split: str, info: dict[str, Any], dtype: np.dtype, *, verify: bool):
        self.split = split
        self.num_documents = int(info["documents"])
        self.shards: list[np.ndarray] = []
        ends = []
        for shard in info["shards"]:
            path = os.path.join(root, shard["name"] + ".bin")
            expected = int(shard["tokens"]) * dtype.itemsize
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != expected:
                found = "is missing" if size is None else f"has {size} bytes"
                raise StoreError(
                    f"shard {path} {found}, the manifest says {expected} bytes "
                    f"({shard['tokens']} tokens): the store is damaged; prepare it again"
                )
            if verify and sha256_file(path) != shard["sha256"]:
                raise StoreError(
                    f"shard {path}: its sha256 does not match the manifest: the store is damaged; prepare it again"
                )
            # np.memmap cannot map an empty file; an empty shard (an empty split) holds nothing.
            self.shards.append(
                np.memmap(path, dtype=dtype, mode="r") if expected else np.empty(0, dtype=dtype)
            )
            ends.append((ends[-1] if ends else 0) + int(shard["tokens"]))
        self._ends = np.asarray(ends, dtype=np.int64)
        self.num_tokens = int(ends[-1]) if ends else 0
        self.dtype = dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] of the flat split, across shard boundaries."""
        parts = []
        shard = int(np.searchsorted(self._ends, start, side="right"))
        while start < stop:
            first = int(self._ends[shard - 1]) if shard else 0
            end = min(stop, int(self._ends[shard]))
            parts.append(self.shards[shard][start - first : end - first])
            start, shard = end, shard + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class StoreDataset:
    """Map-style windows of `seq_len + 1` tokens over one split of a store; the interface of
    packing.PackedDataset (`len`, `ds[i]`, `take`), reading only the windows asked for."""

    def __init__(self, tokens: ShardedTokens, seq_len: int, *, name: str):
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name  # the store, in logs and metrics
        self.num_documents = tokens.num_documents
        self.num_tokens = tokens.num_tokens
        self._len = num_windows(self.num_tokens, seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self._len:
            raise IndexError(i)
        T = self.seq_len
        return np.array(self.tokens.read(i * T, i * T + T + 1))

    def take(self, indices) -> np.ndarray:
        """Windows at `indices` as one (len(indices), T+1) array."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.seq_len + 1), dtype=self.tokens.dtype)
        for row, i in enumerate(indices):
            out[row] = self.tokens.read(int(i) * self.seq_len, int(i) * self.seq_len + self.seq_len + 1)
        return out


class TokenStore:
    """A complete store, opened: its manifest and one ShardedTokens per split."""

    def __init__(self, path: str, *, verify_checksums: bool = False):
        self.path = path
        self.root = os.path.expanduser(path)
        self.manifest = read_manifest(path)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer = self.manifest["tokenizer"]
        self.splits = {
            split: ShardedTokens(self.root, split, self.manifest["splits"][split], self.dtype, verify=verify_checksums)
            for split in SPLITS
        }

    @property
    def tokenizer_dir(self) -> Optional[str]:
        d = os.path.join(self.root, TOKENIZER_DIR)
        return d if os.path.isdir(d) else None

    def dataset(self, split: str, seq_len: int) -> StoreDataset:
        return StoreDataset(self.splits[split], seq_len, name=os.path.basename(os.path.normpath(self.root)))
