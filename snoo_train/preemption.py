"""Preemption: turn SIGTERM / SIGUSR1 into "finish this step, save, exit for a requeue".

SLURM sends SIGUSR1 ahead of a time limit when asked (`#SBATCH --signal=B:USR1@180`, forwarded
to the workers by launch/), and SIGTERM on preemption or `scancel`; torchrun forwards SIGTERM to
its workers. The handler only sets a flag: the training loop checks it between steps on every
rank (one all-reduce, so all ranks stop at the same step even if only one was signalled),
saves a checkpoint and exits with REQUEUE_EXIT_CODE, which launch/slurm.sbatch turns into
`scontrol requeue`.

torchrun reports any failing worker as its own exit status 1, so the launchers also pass
SNOO_EXIT_STATUS_FILE: rank 0 writes the requeue status there before exiting.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later".
REQUEUE_EXIT_CODE = 75
EXIT_STATUS_FILE_ENV = "SNOO_EXIT_STATUS_FILE"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the training loop after the preemption checkpoint is on disk, or before the
    first step when the signal came during start-up (`before_start`: nothing new to save)."""

    def __init__(self, step: int, signum: int, checkpoint: str | None, *, before_start: bool = False):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        name = signal.Signals(signum).name if signum else "a peer rank's signal"
        if before_start:
            where = f"resumes from {checkpoint}" if checkpoint else "starts from step 1 (no checkpoint yet)"
            message = f"received {name} during start-up, before step {step + 1}: nothing to save; the requeued job {where}"
        else:
            where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (checkpointing disabled)"
            message = f"received {name}: stopped after step {step}, saved {where}"
        super().__init__(message)


class PreemptionHandler:
    """Installs flag-setting handlers for SIGTERM and SIGUSR1 (main thread only); `close()`
    restores the previous handlers."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.signum = 0
        self._previous: dict[int, object] = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application): no handler
                pass

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


_PROCESS_HANDLER: PreemptionHandler | None = None


def install_process_handler() -> PreemptionHandler:
    """The entry point's handler, installed first thing (before torch is imported), for the
    whole process: a preemption signal during start-up is remembered, not fatal, and the trainer
    exits for a requeue before its first step."""
    global _PROCESS_HANDLER
    if _PROCESS_HANDLER is None:
        _PROCESS_HANDLER = PreemptionHandler()
    return _PROCESS_HANDLER


def process_handler() -> PreemptionHandler | None:
    return _PROCESS_HANDLER


def report_requeue_status() -> None:
    """Tell a launcher that hides the workers' exit status (torchrun) that a requeue is due."""
    path = os.environ.get(EXIT_STATUS_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(f"{REQUEUE_EXIT_CODE}\n")
