"""An iterator run ahead in a daemon thread: the streaming tokenizer (streaming.py) and the
training loader's prefetch (prefetch.py) both produce this way."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

from .errors import DataError

log = logging.getLogger("snoo_train")

_DONE = object()


class Background:
    """Runs `items` in a daemon thread named `name`, at most `size` items queued ahead.

    `get()` returns the items in order. An exception raised by the iterator is raised by the
    `get` that would have returned the item it stood in for (the same object, its traceback
    from the producer's frames kept), and again by every later `get`: the consumer sees it
    at the same point as if it had run the iterator itself, and never waits on a dead thread.
    An iterator that ends makes `get` raise DataError(`ended`)."""

    def __init__(self, items: Iterator, size: int, *, name: str, ended: str):
        if size < 1:
            raise ValueError(f"Background needs a queue of at least one item, got size={size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._ended = ended
        self._last = None  # the exception or end the thread finished with, once seen
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name=name)
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue `item` (waiting while the queue is full: no polling, the thread sleeps until
        the consumer takes one, or stop empties the queue); False once asked to stop."""
        self._queue.put(item)
        return not self._stop.is_set()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the consumer
            self._put(err)
            return
        self._put(_DONE)

    def get(self):
        item = self._last if self._last is not None else self._queue.get()
        if isinstance(item, BaseException):
            self._last = item
            raise item
        if item is _DONE:
            self._last = item
            raise DataError(self._ended)
        return item

    def request_stop(self) -> None:
        """Ask the thread to end after its next item, without waiting (safe from any thread).
        The queue is emptied: a thread waiting to put its item goes on, puts it, and ends, and
        after the flag is set it puts at most one item, which the emptied queue has room for."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the thread to end and wait for it: it finishes the item it is making first."""
        self.request_stop()
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            log.warning("data: the %s thread did not end within %.0f s; leaving it (a daemon)", self._thread.name, timeout)
