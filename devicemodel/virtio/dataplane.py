"""One virtqueue served on its own thread, woken by the front end's kick eventfd itself.

A vhost-user front end kicks a ring by writing an eventfd and waits for the call eventfd.
Served from the event loop, a blocking request (virtio-blk writes: ext4 refuses
``RWF_NOWAIT`` for buffered writes) costs three cross-CPU wake-ups per request (kick to the
loop, loop to an I/O thread, back to the loop), which is most of a 1 MiB write's latency
here. A data-plane thread owns the queue instead: it waits on (a duplicate of) the kick
eventfd, serves the ring with blocking calls, and signals the call eventfd itself, as a
QEMU iothread does. The loop keeps the control plane; it stops the thread (and waits for
the request in progress) before it changes or unmaps anything the thread uses.

The thread is the only user of its queue while it runs. A kick that reaches the loop
anyway (the front end replaced the kick fd) is forwarded with :meth:`Dataplane.poke`.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from .queue import Virtqueue, VirtqueueError

log = logging.getLogger(__name__)


class Dataplane:
    """Serve ``q`` with ``serve(q)`` on a thread until :meth:`stop`.

    ``serve`` handles one batch of available requests and says whether there was one (so
    a stop waits for one batch at most); ``fail(reason)`` is called (on the thread) when it
    raises, after which the thread ends.
    ``kick_fd`` becomes the thread's own (it is closed by :meth:`stop`).
    """

    def __init__(self, name: str, q: Virtqueue, kick_fd: int,
                 serve: Callable[[Virtqueue], bool], fail: Callable[[str], None]) -> None:
        self.q = q
        self._kick = kick_fd
        os.set_blocking(kick_fd, False)  # a read after a wake-up another reader took waits not
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._serve = serve
        self._fail = fail
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        try:
            self._thread.start()
        except BaseException:
            os.close(self._wake)
            raise

    def poke(self) -> None:
        """Wake the thread to look at the ring (a kick that arrived through the loop)."""
        os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        """End the thread once the request in progress is done; idempotent."""
        if not self._stopping:
            self._stopping = True
            os.eventfd_write(self._wake, 1)
        if self._thread is not threading.current_thread():
            self._thread.join()
        for name in ("_kick", "_wake"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def _run(self) -> None:
        q = self.q
        poller = select.poll()
        poller.register(self._kick, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        try:
            while not self._stopping:
                if self._serve(q):
                    continue
                if q.enable_notification():  # more arrived while we re-armed kicks
                    continue
                poller.poll()
                for fd in (self._kick, self._wake):
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                q.disable_notification()
        except VirtqueueError as e:
            self._fail(str(e))
        except Exception as e:  # a bug must stop this device, not the process
            log.exception("%s crashed", threading.current_thread().name)
            self._fail(f"internal error: {e!r}")
