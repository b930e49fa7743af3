"""Where a pipeline rank idles: the time torch's pipeline schedules spend blocked in their
point-to-point waits (a stage waiting for the activations or gradients of its neighbour), next
to the time of the schedule's whole step. Their ratio is the rank's measured bubble fraction
(bench/comm.py --layouts --pp).

Every schedule of torch.distributed.pipelining (1F1B, GPipe, the looped ones) waits on its
sends and receives through one module function, `_wait_batch_p2p`; the first `attach` wraps it
to count into the clock of the schedule whose step is running. On CUDA the device queue is
drained before and after each wait, so the host time is the device's idle time (the host would
otherwise only queue the wait); on CPU (gloo) a wait blocks the host already.
"""

from __future__ import annotations

import time

import torch
from torch.distributed.pipelining import schedules

_active: list[WaitClock] = []  # the clock of the schedule step now running (one at a time)


def _timed_wait(works) -> None:
    if not _active:
        _original_wait(works)
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _original_wait(works)
    if cuda:
        torch.cuda.synchronize()
    _active[-1].wait_s += time.perf_counter() - t0


_original_wait = getattr(schedules, "_wait_batch_p2p", None)


def _install() -> None:
    """Route the schedules' waits through the clocks (once; waits outside a timed step pass through)."""
    if _original_wait is None:
        raise RuntimeError("torch.distributed.pipelining.schedules has no _wait_batch_p2p to time: this torch is not supported")
    schedules._wait_batch_p2p = _timed_wait


class WaitClock:
    """Seconds one rank's schedule spent in its steps and, within them, in point-to-point waits."""

    def __init__(self) -> None:
        self.wait_s = self.step_s = 0.0
        self.steps = 0

    def attach(self, schedule) -> None:
        """Time every later `schedule.step` (and the waits inside it) on this clock."""
        _install()
        step = schedule.step

        def timed_step(*args, **kwargs):
            _active.append(self)
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.step_s += time.perf_counter() - t0
                self.steps += 1
                _active.pop()

        schedule.step = timed_step

    def bubble(self) -> float | None:
        """The share of the schedule's time this rank sat waiting on its neighbours."""
        return self.wait_s / self.step_s if self.step_s else None
