"""Training batches assembled ahead (`data.prefetch` steps) on a background thread, in pinned
host memory where the device is CUDA (`data.pin_memory`), so that the next step's batch is
ready, and its `non_blocking` copy truly asynchronous, while the device computes this one.

Exactness is the contract: the thread calls the same `BatchLoader.next_step` in the same order,
so the batches are bitwise those of `data.prefetch=0`. The loader's position saved in a
checkpoint is the one after the last step the training loop took, not after the ones queued
ahead: every queued step carries the position after it, and `state_dict()` /
`rank_state()` / `tokens_drawn()` answer from the last one taken."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch

from snoo_train.config import pin_memory_mode

from .background import Background
from .loader import BatchLoader

Batches = list[dict[str, torch.Tensor]]


def pin_batches(setting: str, device: torch.device) -> bool:
    """data.pin_memory: auto pins when training on CUDA; true and false as said (validate_config
    refuses true where CUDA is absent)."""
    mode = pin_memory_mode(setting)
    return mode == "true" or (mode == "auto" and device.type == "cuda")


class Position(NamedTuple):
    """Where the loader stands after a step: what a checkpoint and the metrics read."""

    state: dict
    rank_state: str
    tokens_drawn: dict[str, int]


def _position(loader: BatchLoader) -> Position:
    return Position(loader.state_dict(), loader.rank_state(), loader.tokens_drawn())


def _pinned(batches: Batches) -> Batches:
    return [{k: v.pin_memory() for k, v in batch.items()} for batch in batches]


def _steps(loader: BatchLoader, pin: bool, device: torch.device) -> Iterator[tuple[Batches, Position]]:
    """The loader's steps, each with the position after it (on the producer thread: the loader
    is touched by it alone while it runs). A free function, so that the thread does not keep
    the PrefetchLoader alive (its finalizer stops the thread)."""
    if pin and device.type == "cuda":
        # A new thread's current device is GPU 0: pinning there would open a CUDA context on
        # GPU 0 for every rank of the node (torch's DataLoader pins the same way).
        torch.cuda.set_device(device)
    while True:
        batches = loader.next_step()
        yield (_pinned(batches) if pin else batches), _position(loader)


class PrefetchLoader:
    """A BatchLoader's steps, `steps` of them assembled ahead on a daemon thread (0: on the
    caller's thread), pinned when `pin`. The same interface as BatchLoader for the trainer:
    `next_step`, `state_dict` / `load_state_dict`, `rank_state` / `load_rank_state`,
    `tokens_drawn`, `close`, `tokens_per_step`, `streaming`.

    An error raised while assembling a step is raised by the `next_step` that would have
    returned it. Loading a state stops the thread and drops what it queued (the loader is put
    back where the steps taken left it first, so a partial load, state without rank state,
    still continues from there); `close()` stops it too (the trainer calls it at the end of
    `fit`, on errors and on preemption)."""

    def __init__(self, loader: BatchLoader, *, steps: int, pin: bool, device: torch.device | None = None):
        """`device`: where the batches go (the producer thread pins for that CUDA device)."""
        if steps < 0:
            raise ValueError(f"data.prefetch={steps} must be >= 0")
        self.loader, self.steps, self.pin = loader, steps, pin
        self.device = device if device is not None else torch.device("cpu")
        self.tokens_per_step, self.streaming = loader.tokens_per_step, loader.streaming
        self._background: Background | None = None
        # The position after the last step taken, while the thread runs ahead of it.
        self._taken: Position | None = None
        self._finalizer: weakref.finalize | None = None

    def next_step(self) -> Batches:
        if self.steps == 0:
            batches = self.loader.next_step()
            return _pinned(batches) if self.pin else batches
        if self._background is None:
            self._taken = _position(self.loader)  # nothing taken yet: where the loader stands
            steps = _steps(self.loader, self.pin, self.device)
            self._background = Background(steps, self.steps, name="snoo-prefetch", ended="the training batches ended")
            # A loader dropped without close() (a benchmark driving train_step) ends its thread.
            self._finalizer = weakref.finalize(self, self._background.request_stop)
        batches, self._taken = self._background.get()
        return batches

    def _current(self) -> Position:
        return self._taken if self._background is not None else _position(self.loader)

    # Copies, as BatchLoader gives: the caller may keep or change them.
    def state_dict(self) -> dict:
        return copy.deepcopy(self._current().state)

    def rank_state(self) -> str:
        return self._current().rank_state

    def tokens_drawn(self) -> dict[str, int]:
        return dict(self._current().tokens_drawn)

    def load_state_dict(self, state: dict) -> None:
        self._halt(rewind=True)
        self.loader.load_state_dict(state)

    def load_rank_state(self, state: str) -> None:
        self._halt(rewind=True)
        self.loader.load_rank_state(state)

    def close(self) -> None:
        self._halt(rewind=False)
        self.loader.close()

    def _halt(self, *, rewind: bool) -> None:
        """Stop the thread; `rewind` puts the loader back where the steps taken left it."""
        if self._background is None:
            return
        self._finalizer.detach()
        self._background.stop()
        taken, self._background, self._taken = self._taken, None, None
        if rewind:
            self.loader.load_state_dict(taken.state)
            self.loader.load_rank_state(taken.rank_state)
