"""A weighted mixture of token stores (`data=prepared 'data.paths=[a,b]' 'data.weights=[0.8,0.2]'`).

Global step `s` draws which store each of its B samples comes from, with a generator seeded by
(seed, s) alone: any rank computes any step's draws without the others, and the order does not
depend on the world size. Store k serves its samples in the order of a permutation of its windows
seeded by (seed, k, epoch); the only state is how many samples each store has served, saved in
the checkpoint, so resuming is index arithmetic. A store that runs out starts its next epoch with
a new permutation, and says so once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from .errors import DataError

log = logging.getLogger("snoo_train")

_MIX_STREAM = 0x313C  # separates the draws' seed sequence from the permutations'


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class Mixture:
    """The training sets of several stores and their weights; `take(step, B, lo, hi)` gives the
    windows of global samples [lo, hi) of step `step`, which must be asked for in step order."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], paths: Sequence[str], *, seed: int):
        self.datasets = list(datasets)
        w = np.asarray(weights, dtype=np.float64)
        self.probabilities = w / w.sum()
        self.seq_len = datasets[0].seq_len
        self.seed = seed
        self.names = _names(paths)
        for name, ds, p in zip(self.names, self.datasets, self.probabilities):
            if p > 0 and len(ds) == 0:
                raise DataError(f"data.paths: store {name} has no training window of data.seq_len+1={self.seq_len + 1} tokens")
        self.sizes = np.array([len(ds) for ds in self.datasets], dtype=np.int64)
        self.counts = np.zeros(len(self.datasets), dtype=np.int64)  # samples served, per store
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def draws(self, step: int, batch_size: int) -> np.ndarray:
        """The store of each of step `step`'s samples."""
        return _rng(self.seed, _MIX_STREAM, step).choice(len(self.datasets), size=batch_size, p=self.probabilities)

    def _permutation(self, store: int, epoch: int) -> np.ndarray:
        key = (store, epoch)
        if key not in self._perms:
            if epoch > 0 and (store, epoch - 1) in self._perms:
                log.info(
                    "data: store %s exhausted after %d windows: epoch %d starts with a new permutation",
                    self.names[store], self.sizes[store], epoch,
                )  # fmt: skip
            for old in [k for k in self._perms if k[0] == store and k[1] < epoch - 1]:
                del self._perms[old]  # a step spans at most two epochs of a store
            self._perms[key] = _rng(self.seed, store, epoch).permutation(int(self.sizes[store]))
        return self._perms[key]

    def take(self, step: int, batch_size: int, lo: int, hi: int) -> np.ndarray:
        """Windows of samples [lo, hi) of step `step`; then counts move past the whole step."""
        stores = self.draws(step, batch_size)
        rows = []
        for i in range(lo, hi):
            k = int(stores[i])
            # The i-th sample is the n-th one store k serves: those of earlier steps, then the
            # ones before it in this step.
            n = int(self.counts[k]) + int(np.count_nonzero(stores[:i] == k))
            epoch, within = divmod(n, int(self.sizes[k]))
            rows.append(self.datasets[k].take([self._permutation(k, epoch)[within]])[0])
        self.counts += np.bincount(stores, minlength=len(self.datasets))
        return np.stack(rows) if rows else np.empty((0, self.seq_len + 1), dtype=np.int64)

    def tokens_drawn(self) -> dict[str, int]:
        """Tokens (windows x seq_len) each store has served so far, for the metrics."""
        return {name: int(c) * self.seq_len for name, c in zip(self.names, self.counts)}


def _names(paths: Sequence[str]) -> list[str]:
    """Short names for logs and metrics: the store directory's name, numbered when two clash."""
    base = [os.path.basename(os.path.normpath(os.path.expanduser(str(p)))) for p in paths]
    return [b if base.count(b) == 1 else f"{i}:{b}" for i, b in enumerate(base)]
