"""One process at a time: an exclusive lock on a file, held while a process uses what it guards
(a run directory: rundir.py; a token store being prepared: data/prepare.py).

An advisory `flock`: the kernel drops it when the holder exits, however it exits (kill -9 and
node failure included, on file systems that support flock), so a lock left behind by a dead
process is stale by construction and is taken over (`stale_holder` records whose it was). The
file records the holder's host and pid so that a refusal can name it. The file is left in place
on release, emptied: removing it would let a third process lock a new file while a second still
holds the old one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path


class ProcessLock:
    """`ProcessLock(path, what=..., holder=..., advice=..., error=...)`: `acquire` takes the lock
    or raises `error("<what> is in use by <holder> pid P on host H since ...: <advice>")`."""

    def __init__(self, path: str | os.PathLike, *, what: str, holder: str, advice: str, error: type[Exception]):
        self.path = Path(path)
        self.what, self.holder, self.advice, self.error = what, holder, advice, error
        self._fd: int | None = None
        self.stale_holder: dict | None = None  # a dead holder's record, when one was taken over

    def acquire(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise self.error(f"{self.path}: cannot lock {self.what} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self.error(f"{self.path}: cannot lock {self.what} ({e.strerror})") from e
            who = describe_holder(holder, self.holder) if holder else "another process"
            raise self.error(f"{self.what} is in use by {who}: {self.advice}") from None
        # Locked: anything recorded in the file is from a holder that ended without removing it.
        previous = _read_holder(fd)
        if previous:
            self.stale_holder = previous
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file: nobody holds it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        holder = json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict, noun: str) -> str:
    """'<noun> pid P on host H since <time>' from a lock file's record."""
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else ""
    return f"{noun} pid {holder.get('pid')} on host {holder.get('host')}{when}"
