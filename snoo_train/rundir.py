"""Guarding a run directory: one run at a time, nothing of an earlier run overwritten, and room
for the checkpoints before the first step rather than a traceback at the first save.

Rank 0 takes these decisions before anything is written into the run directory; the trainer
shares the outcome with the other ranks, so every rank stops with the same one-line message.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from snoo_train.checkpoint import LATEST, CheckpointError, complete_checkpoints
from snoo_train.dist import DistInfo, agree
from snoo_train.lock import ProcessLock

LOCK_FILE = ".lock"
ARCHIVE_DIR = "archive"


class RunDirError(CheckpointError):
    """The run directory cannot be used as asked (held by another run, holds an earlier run,
    not writable, too little space). A CheckpointError: it guards what checkpoints rely on."""


class RunDirLock(ProcessLock):
    """An exclusive lock on a run directory (`<run_dir>/.lock`), held while a run uses it; a
    lock left by a dead run is taken over (snoo_train/lock.py)."""

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__(
            Path(run_dir) / LOCK_FILE,
            what=str(Path(run_dir)),
            holder="run",
            advice="two runs in one run directory would overwrite each other's checkpoints and metrics; wait "
            "for it to finish, stop it, or choose another hydra.run.dir",
            error=RunDirError,
        )


def lock_run_dir(run_dir: str, dist: DistInfo) -> RunDirLock | None:
    """Rank 0 takes the run directory's lock (after proving it writable); every rank raises
    the same RunDirError if it cannot. Returns the lock on rank 0, None elsewhere."""
    held: list[RunDirLock] = []  # the lock stays on rank 0: its file descriptor is this process's

    def take() -> None:
        check_writable(run_dir, "the run directory")
        held.append(RunDirLock(run_dir).acquire())

    agree(dist, take, (RunDirError,))
    return held[0] if held else None


# -- an earlier run in the directory --------------------------------------------------------------


def earlier_run_files(run_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, metrics_file: str) -> list[Path]:
    """What a fresh start would overwrite or mix with: complete checkpoints (and the `latest`
    pointer), and a metrics file that holds records."""
    found: list[Path] = list(complete_checkpoints(ckpt_dir))
    if found and (Path(ckpt_dir) / LATEST).exists():
        found.append(Path(ckpt_dir) / LATEST)
    metrics = Path(run_dir) / metrics_file
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics)
    return found


def guard_fresh_start(
    run_dir: str | os.PathLike,
    ckpt_dir: str | os.PathLike,
    metrics_file: str,
    *,
    archive: bool,
    why: str,
) -> Path | None:
    """Before a run starts at step 1 in `run_dir`: refuse if an earlier run's checkpoints or
    metrics are there (`why` says why this run starts fresh), or with `archive` move them (and
    the earlier summary) into `<run_dir>/archive/<time>/`. Returns the archive directory."""
    found = earlier_run_files(run_dir, ckpt_dir, metrics_file)
    if not found:
        return None
    if not archive:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise RunDirError(
            f"{run_dir} holds an earlier run ({names}) and {why}: starting at step 1 here would "
            "overwrite its checkpoints and mix its metrics. Choose a new hydra.run.dir, resume it "
            "with trainer.resume=auto, or pass trainer.archive_previous_run=true to move it into "
            f"{Path(run_dir) / ARCHIVE_DIR}/ first"
        )
    dest = Path(run_dir) / ARCHIVE_DIR / time.strftime("%Y-%m-%d_%H-%M-%S")
    while dest.exists():  # two archives in one second
        dest = dest.with_name(dest.name + "_")
    dest.mkdir(parents=True)
    movable = [Path(ckpt_dir), Path(run_dir) / metrics_file, Path(run_dir) / "summary.json"]
    for path in movable:
        if path.exists():
            os.replace(path, dest / path.name)  # same file system: a rename, nothing copied
    return dest


# -- room to write --------------------------------------------------------------------------------


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """Create `directory` if needed and prove a file can be written in it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        with open(probe, "w") as f:
            f.write("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"{what} {directory} is not writable: {e.strerror or e}") from None


def check_free_space(directory: str | os.PathLike, needed_bytes: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise RunDirError(
            f"{what} {directory} has {free / 2**30:.2f} GiB free; one checkpoint of this run needs "
            f"about {needed_bytes / 2**30:.2f} GiB. Free some space, or point checkpoint.dir elsewhere"
        )
