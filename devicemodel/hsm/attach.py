"""The ACRN waiter: one long-lived thread in ATTACH_IOREQ_CLIENT for the VM's life.

The HSM's request wait cannot be polled (acrn-facts §1.5 step 3: ATTACH sleeps until the
client's pending bitmap is non-empty), so a thread must sit in it. Borrowing a thread per
wake (``trio.to_thread``) cost about 100 µs a request; this thread stays:

1. ATTACH (blocking, the GIL released), the ioctl returns: a request is pending;
2. the request server's ``scan_here`` answers what it can on this thread (handlers that
   are safe off the loop, while the loop sleeps; ``loopgate.py``) and NOTIFYs them; if
   that was everything, straight back to 1 with no wake of the loop at all;
3. otherwise the loop is woken through an eventfd it waits on (measured the cheapest
   wake from a thread: 18 µs a round trip here against 28 µs for
   ``run_sync_soon``), and the thread waits until the loop asks for the next ATTACH,
   since ATTACH returns at once while the loop has not completed what it was handed.

A result that ends serving (-ENODEV: the client is being destroyed; any other error)
ends the thread; the next ``attach`` starts a new one (a new client).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

import trio

from .base import InlineServer

log = logging.getLogger(__name__)


class AttachWaiter:
    """Runs ``attach()`` (the blocking ATTACH ioctl: 0 or -errno) on its own thread and
    hands the loop each result that needs it."""

    def __init__(self, attach: Callable[[], int], name: str = "acrn-attach") -> None:
        self._attach = attach
        self._name = name
        #: the request server's offer, while it serves (read by the thread each wake)
        self.inline: InlineServer | None = None
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._go = threading.Lock()  # released: the loop wants the next ATTACH
        self._go.acquire()
        self._lock = threading.Lock()  # the result and the eventfd's lifetime
        self._result: int | BaseException | None = None
        self._handed = False  # the loop took a result: the thread waits for a go
        self._closed = False
        self._thread: threading.Thread | None = None
        #: wakes the loop got (requests it served) and rounds served on the thread
        self.loop_wakes = 0
        self.served_here = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def has_result(self) -> bool:
        """A result waits for the loop (even if the thread has ended since)."""
        return self._result is not None

    async def wait(self) -> int | BaseException:
        """The next result for the loop: 0 (slots are pending for it), -errno, or the
        exception the thread's serving raised."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        elif self._handed:  # the loop has finished with the last hand-off
            self._handed = False
            self._go.release()
        efd = self._efd
        while True:
            with self._lock:
                result = self._result
                self._result = None
            if result is not None:
                self._handed = True
                self.loop_wakes += 1
                return result
            await trio.lowlevel.wait_readable(efd)
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                pass

    # --- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            ret = self._attach()
            if ret == 0 or ret == -errno.EINTR:
                inline = self.inline
                if inline is not None:
                    try:
                        if inline.scan_here():
                            self.served_here += 1
                            continue  # all answered here: nothing for the loop
                    except BaseException as e:  # e.g. NOTIFY failed: the loop decides
                        ret = e  # type: ignore[assignment]
            if not self._hand_over(ret):
                return
            if isinstance(ret, BaseException) or ret not in (0, -errno.EINTR):
                return  # the end of serving: the loop gets the result, the thread ends
            self._go.acquire()
            if self._closed:
                return

    def _hand_over(self, result: int | BaseException) -> bool:
        with self._lock:
            if self._efd < 0:
                return False
            self._result = result
            os.eventfd_write(self._efd, 1)
        return True

    # --- teardown ---------------------------------------------------------------------------
    def stop(self) -> None:
        """No ATTACH after the one in progress; the thread ends once that returns."""
        with self._lock:
            self._closed = True
        try:
            self._go.release()
        except RuntimeError:
            pass  # released already (the loop had asked for the next ATTACH)

    def close(self) -> None:
        """``stop``, wait for the thread (so first make its ATTACH return: destroy the
        client), release the eventfd. Safe from the loop or any other thread."""
        self.stop()
        with self._lock:
            efd, self._efd = self._efd, -1
        if efd >= 0:
            try:
                trio.lowlevel.notify_closing(efd)
            except RuntimeError:
                pass  # not inside trio
            os.close(efd)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
            if thread.is_alive():
                log.debug("%s still in ATTACH after close", self._name)


__all__ = ["AttachWaiter"]
