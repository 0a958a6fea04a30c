"""A device's own long-lived I/O thread: blocking calls run there in submission order.

``trio.to_thread.run_sync`` costs about 100 µs of CPU per call here (thread-cache
dispatch, a thread rename, a capacity limiter, outcome wrapping) - more than writing a
MiB into the page cache. A device that must block on every request (ext4 refuses
``RWF_NOWAIT`` for buffered writes, so every virtio-blk write blocks) hands its batches
to one thread through a ``SimpleQueue`` instead, and the thread wakes the waiting task
with ``run_sync_soon``. One thread also keeps the device's writes in order across a
reset: a new activation's writes queue behind any the old one left in flight.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = object()


class IoThread:
    """Run blocking callables one after another on a dedicated daemon thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread; like ``trio.to_thread.run_sync`` the caller cannot
        be cancelled away before the call has finished (the call owns guest memory)."""
        self._ensure_started()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        self._jobs.put((fn, args, token, task))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the thread once the jobs already queued are done."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(_STOP)
            thread.join()

    def _ensure_started(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    t = threading.Thread(target=self._work, name=self.name, daemon=True)
                    t.start()
                    self._thread = t

    def _work(self) -> None:
        jobs = self._jobs
        reschedule = trio.lowlevel.reschedule
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            fn, args, token, task = job
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(reschedule, task, result)
            except trio.RunFinishedError:  # the loop is gone; nobody waits any more
                pass
