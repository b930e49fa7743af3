"""On-disk cache of packed token arrays (opt-in with `data.cache_dir`).

The flat token arrays are cached, not the windows, so one entry serves every `seq_len`.
The key covers everything that changes the tokens: the source's input fingerprint (files,
sizes, mtimes, Python version for the standard library), the tokenizer's fingerprint, the
validation rule and a format version. Entries are written to a temporary directory and
renamed into place, so ranks that build at the same time never read a half-written entry,
and loaded as read-only memmaps, so ranks on one node share the pages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

FORMAT_VERSION = 1


def cache_key(**parts) -> str:
    blob = json.dumps({"version": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def load(cache_dir: str, key: str) -> Optional[tuple[np.ndarray, np.ndarray, dict]]:
    entry = os.path.join(os.path.expanduser(cache_dir), key)
    try:
        with open(os.path.join(entry, "meta.json")) as f:
            meta = json.load(f)
        train = np.load(os.path.join(entry, "train.npy"), mmap_mode="r")
        val = np.load(os.path.join(entry, "val.npy"), mmap_mode="r")
    except (OSError, ValueError):
        return None
    return train, val, meta


def save(cache_dir: str, key: str, train: np.ndarray, val: np.ndarray, meta: dict) -> None:
    root = os.path.expanduser(cache_dir)
    os.makedirs(root, exist_ok=True)
    entry = os.path.join(root, key)
    if os.path.isdir(entry):
        return
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
    try:
        np.save(os.path.join(tmp, "train.npy"), train)
        np.save(os.path.join(tmp, "val.npy"), val)
        # meta.json last: its presence marks a complete entry.
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        os.rename(tmp, entry)
    except OSError:
        # Another rank renamed its copy first, or the disk is read-only: the cache is an
        # optimisation, never a reason to stop training.
        pass
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
