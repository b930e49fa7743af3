"""Per-rank training batches and fixed evaluation batches.

The global sample order is a function of the seed alone: global step `s` consumes global
samples `[s*B, (s+1)*B)`, and rank `r` of `W` keeps the contiguous slice
`[r*B/W, (r+1)*B/W)` of them, split into `grad_accum` micro-batches. So the ranks are
disjoint, their union is the single-process batch, and a run can resume on another world
size. Only the step counter is state: a resumed loader recomputes where it was (a mixture of
stores adds how many samples each store served; mixture.py).

DiLoCo replicas (`replicas` R > 1) are workers with their own data streams: replica `r` reads
stripe `r` (`b = B/R` windows) of each global batch, split over its ranks the same way, which
is the slicing above. The layout (`streams`, the replica count the run started with, and `b`)
is part of the loader's state and outlives a resume with another replica count (each replica
keeps its batch of `b` windows): replica `r < streams` keeps reading stripe `r`, exactly as
without the change; a replica `r >= streams` reads stripe `r % streams` of pass `r // streams`,
a permutation seeded by (seed, epoch, pass) (docs/checkpoints.md, elastic replicas).

Streaming data is the exception: each rank reads its own share of the stream (streaming.py), so
its order depends on the world size and each rank's position is part of the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import torch

from .errors import DataError
from .mixture import Mixture
from .packing import StreamingPackedDataset
from .streaming import StreamingTrain

# Validation windows are visited in a fixed shuffled order (not file order, which would
# evaluate on the alphabetically first few documents only), the same for every training seed.
_EVAL_SEED = 0x5EED


def _to_batch(windows: np.ndarray) -> dict[str, torch.Tensor]:
    t = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    # Labels are already shifted: position i of `labels` is the token after input i.
    return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}


def _check_layout(batch_size: int, rank: int, world_size: int, grad_accum: int = 1) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    if grad_accum < 1:
        raise DataError(f"trainer.grad_accum={grad_accum} must be >= 1")
    if batch_size < 1 or batch_size % (world_size * grad_accum):
        raise DataError(
            f"trainer.batch_size={batch_size} must be a positive multiple of world_size x "
            f"trainer.grad_accum = {world_size} x {grad_accum}"
        )


class BatchLoader:
    """Training batches for one rank: `next_step()` gives `grad_accum` micro-batches of
    `global_batch_size // (world_size * grad_accum)` windows each.

    Map-style data: epoch `e` visits a permutation of all windows seeded by (seed, e); the
    last `len % B` windows of each permutation are skipped so a step never spans epochs.
    Mixtures of stores: mixture.py. Streaming data: this rank's share of the stream, in shuffled
    blocks (streaming.py), `global_batch_size // world_size` windows per step.
    """

    def __init__(
        self,
        train,
        *,
        global_batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        replicas: int = 1,
    ):
        _check_layout(global_batch_size, rank, world_size, grad_accum)
        if replicas < 1 or world_size % replicas or global_batch_size % replicas:
            raise DataError(f"{replicas} replicas must divide world_size={world_size} and the batch {global_batch_size}")
        self.train = train
        self.global_batch_size = global_batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.micro_batch_size = global_batch_size // (world_size * grad_accum)
        self.tokens_per_step = global_batch_size * train.seq_len
        self.streaming = isinstance(train, StreamingTrain)
        self.mixture = train if isinstance(train, Mixture) else None
        self.step = 0
        # This rank's replica and place in it; the layout: `streams` stripes of `stream_batch`.
        self.replicas = replicas
        self.replica, self.replica_rank = divmod(rank, world_size // replicas)
        self.stream_batch = global_batch_size // replicas
        self.streams = replicas
        if self.mixture is not None:
            self.num_samples = -1  # per store: the mixture's sizes
        elif self.streaming:
            self.num_samples = -1
            self.stream = train.rank_stream(rank, world_size, seed)
        else:
            self.num_samples = len(train)
            if self.num_samples < global_batch_size:
                raise DataError(
                    f"the training set has {self.num_samples} windows of data.seq_len+1="
                    f"{train.seq_len + 1} tokens, fewer than one global batch "
                    f"(trainer.batch_size={global_batch_size}); lower trainer.batch_size or "
                    "data.seq_len, or use more data"
                )
            self._perm_key = (-1, -1)
            self._perm = np.empty(0, dtype=np.int64)

    @property
    def layout_batch(self) -> int:
        """The global batch of the layout: `streams` stripes (this run's batch until an
        elastic resume changes the replica count)."""
        return self.streams * self.stream_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.layout_batch

    # ---- global order -------------------------------------------------------------------

    def _permutation(self, epoch: int, pass_: int) -> np.ndarray:
        if (epoch, pass_) != self._perm_key:
            # Pass 0 is the run's own order; later passes (replicas beyond `streams`) reshuffle.
            entropy = [self.seed, epoch] if pass_ == 0 else [self.seed, epoch, pass_]
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
            self._perm = rng.permutation(self.num_samples)
            self._perm_key = (epoch, pass_)
        return self._perm

    def _global_indices(self, step: int, pass_: int = 0) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        B = self.layout_batch
        return self._permutation(epoch, pass_)[within * B : (within + 1) * B]

    # ---- public -------------------------------------------------------------------------

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        per_rank = self.global_batch_size // self.world_size
        pass_, stripe = divmod(self.replica, self.streams)
        lo = stripe * self.stream_batch + self.replica_rank * per_rank
        hi = lo + per_rank
        if self.mixture is not None:
            mine = self.mixture.take(self.step, self.layout_batch, lo, hi)
        elif self.streaming:
            mine = self.stream.next_windows(hi - lo)
        else:
            mine = self.train.take(self._global_indices(self.step, pass_)[lo:hi])
        self.step += 1
        b = self.micro_batch_size
        return [_to_batch(mine[i * b : (i + 1) * b]) for i in range(self.grad_accum)]

    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.num_samples,
            "streams": self.streams,
            "stream_batch": self.stream_batch,
        }
        if self.mixture is not None:
            # Where each store is: the draws of later steps follow from the seed alone.
            state["mixture_counts"] = [int(c) for c in self.mixture.counts]
            state["mixture_sizes"] = [int(n) for n in self.mixture.sizes]
        return state

    def tokens_drawn(self) -> dict[str, int]:
        """Tokens served by each store of a mixture (empty for one source)."""
        return self.mixture.tokens_drawn() if self.mixture is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was. A checkpoint from before the layout was saved had one
        stream per replica; the caller gives its `streams` (the saved run's replica count)."""
        streams = int(state.get("streams", self.replicas))
        saved = {
            "seed": int(state["seed"]),
            "num_samples": int(state["num_samples"]),
            "stream_batch": int(state.get("stream_batch", int(state["global_batch_size"]) // streams)),
        }
        for key, value in saved.items():
            if value != getattr(self, key):
                raise DataError(
                    f"cannot resume the data loader: the checkpoint has {key}={value}, "
                    f"this run has {getattr(self, key)} (the data order would not continue)"
                )
        if streams != self.replicas and (self.streaming or self.mixture is not None):
            raise DataError(
                f"cannot resume {streams} data streams with {self.replicas} replicas: "
                + ("streaming data is read per rank" if self.streaming else "a mixture of stores draws per global batch")
            )
        self.streams = streams
        if self.mixture is not None:
            sizes = [int(n) for n in state.get("mixture_sizes", [])]
            if sizes != [int(n) for n in self.mixture.sizes]:
                raise DataError(
                    f"cannot resume the data mixture: the checkpoint's stores had {sizes} training windows, "
                    f"this run's have {[int(n) for n in self.mixture.sizes]} (other stores, order or data.seq_len)"
                )
            self.mixture.counts = np.asarray(state["mixture_counts"], dtype=np.int64)
        self.step = int(state["step"])

    def rank_state(self) -> str:
        """This rank's own position (streaming only), saved per rank in the checkpoint: one JSON
        string, since its shape (the datasets stream's nested state) varies with the source."""
        return json.dumps(self.stream.state_dict() if self.streaming else {})

    def load_rank_state(self, state: str) -> None:
        if self.streaming:
            self.stream.load_state_dict(json.loads(state))

    def close(self) -> None:
        if self.streaming:
            self.stream.close()


def eval_batches(
    val, *, batch_size: int, num_batches: int, rank: int, world_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the first `num_batches` global validation batches, identical on
    every call. A validation set smaller than `num_batches * batch_size` windows is cycled;
    an empty one yields nothing (val_fraction=0), on every rank alike."""
    _check_layout(batch_size, rank, world_size)
    per_rank = batch_size // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    wanted = batch_size * num_batches

    if isinstance(val, StreamingPackedDataset):
        windows = val.head(wanted)
        order = np.arange(len(windows))
    else:
        windows = val
        order = np.random.Generator(np.random.PCG64(_EVAL_SEED)).permutation(len(val))

    def generate() -> Iterator[dict[str, torch.Tensor]]:
        if len(order) == 0:
            return
        for g in range(num_batches):
            idx = order[(np.arange(g * batch_size + lo, g * batch_size + hi)) % len(order)]
            if hasattr(windows, "take"):
                yield _to_batch(windows.take(idx))
            else:
                yield _to_batch(np.stack([windows[i] for i in idx]))

    return generate()
