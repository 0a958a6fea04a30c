"""A second CPU for page-cache copies the event loop would otherwise do alone.

The loop serves reads the page cache holds (``RWF_NOWAIT``, nowait.py) itself, where a
sequential stream is one memcpy after another: the loop's CPU is the limit. For two big
reads at once (or one big read in halves) the loop hands one ``preadv`` to this thread,
does the other itself and then waits for the pair. The thread's call is non-blocking too
(it fails with -1 instead of waiting for the disk), so the loop never waits longer than
for one copy it could have done inline; and since it always waits before it completes
the requests, no call is in flight once the loop moves on (guest memory cannot go away
under one).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence

_STOP = None


def preadv_nowait(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """Bytes read without waiting for the disk, or -1 (nothing to retry here: the loop
    falls back to its slow path for the whole group)."""
    try:
        return os.preadv(fd, views, offset, os.RWF_NOWAIT)
    except OSError:
        return -1


class CopyThread:
    """One daemon thread running one ``preadv_nowait`` at a time for the loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[int, Sequence[memoryview], int] | None] = \
            queue.SimpleQueue()
        self._results: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fd: int, views: Sequence[memoryview], offset: int) -> None:
        """Start a read; every ``submit`` must be followed by a :meth:`wait`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((fd, views, offset))

    def wait(self) -> int:
        """The submitted read's result (bytes, or -1)."""
        return self._results.get()

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(_STOP)
            thread.join()

    def _work(self) -> None:
        jobs, results = self._jobs, self._results
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            try:
                results.put(preadv_nowait(*job))
            except BaseException:  # never leave the loop waiting
                results.put(-1)
