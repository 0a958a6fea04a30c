"""Where a vector's message goes: injected through the backend, or an irqfd's eventfd;
and per-vector eventfds for a function whose table a peer owns.

* ``InjectDelivery``: the backend injects the entry's (address, data) (INJECT_MSI).
* ``IrqfdDelivery``: one eventfd per vector whose irqfd route carries the entry's current
  message; signalling it is the whole delivery (KVM/ACRN inject in the kernel). The route
  is made the first time the vector is delivered, follows the guest's rewrites of the
  entry, and is used only while the vector is deliverable: a masked vector stays in the
  table's PBA. A route that cannot be made falls back to injecting.
* ``EventfdVectors``: the peer emulates the table itself (QEMU's vfio-user client does)
  and hands over one eventfd per vector plus mask/unmask actions; a masked vector is held
  and signalled once on unmask.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import trio

from .. import peerfd
from ..ratelimit import RateLimitedLog
from .msix import MsixDelivery
from .services import Eventfds, MsiSink

log = logging.getLogger(__name__)

# An eventfd write takes about a microsecond; os.eventfd_write releases the GIL around it,
# and a data-plane thread then waits up to a switch interval (5 ms) to get it back while
# the loop or another thread runs (measured: 1.2 ms per signal on bench/virtio_blk.py's
# data-plane thread). A PyDLL call keeps the GIL for the syscall.
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.write.restype = ctypes.c_ssize_t
_ONE = ctypes.c_uint64(1)
_ONE_PTR = ctypes.addressof(_ONE)


def signal_eventfd(fd: int) -> bool:
    """Add 1 to eventfd ``fd`` holding the GIL; False if the write failed."""
    return _libc.write(fd, _ONE_PTR, 8) == 8


class InjectDelivery(MsixDelivery):
    """Each message is injected by the backend."""

    def __init__(self, sink: MsiSink) -> None:
        self.sink = sink

    def deliver(self, vector: int, address: int, data: int) -> None:
        self.sink.inject_msi(address, data)


class IrqfdDelivery(MsixDelivery):
    """Each vector signals its own eventfd, routed by an irqfd to the entry's message."""

    def __init__(self, eventfds: Eventfds, fallback: MsiSink, entries: int,
                 name: str = "msix") -> None:
        self.eventfds = eventfds
        self.fallback = fallback
        self.name = name
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(entries)]
        #: the message each vector's irqfd carries now (None: no route)
        self.routes: list[tuple[int, int] | None] = [None] * entries
        #: messages that went out through an eventfd
        self.sent = 0
        self._rl = RateLimitedLog(log)

    def deliver(self, vector: int, address: int, data: int) -> None:
        if self.routes[vector] != (address, data):
            self._assign(vector, address, data)
        if self.routes[vector] is not None and signal_eventfd(self.fds[vector]):
            self.sent += 1
            return
        self.fallback.inject_msi(address, data)

    def entry_written(self, vector: int) -> None:
        """A routed, unmasked vector follows the guest's new message at once."""
        table = self.table
        route = self.routes[vector]
        if table is None or route is None or table.masked(vector):
            return
        address, data, _ = table.entry(vector)
        if route != (address, data):
            self._assign(vector, address, data)

    def _assign(self, vector: int, address: int, data: int) -> None:
        self._deassign(vector)
        try:
            self.eventfds.irqfd(self.fds[vector], address, data)
        except Exception as e:
            self._rl.warning("%s: irqfd for vector %d failed (%s); injecting directly",
                             self.name, vector, e)
            return
        self.routes[vector] = (address, data)

    def _deassign(self, vector: int) -> None:
        route = self.routes[vector]
        self.routes[vector] = None
        if route is None:
            return
        try:
            self.eventfds.irqfd(self.fds[vector], route[0], route[1], deassign=True)
        except Exception as e:
            self._rl.warning("%s: irqfd deassign for vector %d failed: %s", self.name,
                             vector, e)

    def reset(self) -> None:
        """The table goes back to all-masked: the routes go."""
        for v in range(len(self.routes)):
            self._deassign(v)

    def close(self) -> None:
        self.reset()
        fds, self.fds = self.fds, []
        self.routes = []
        for fd in fds:
            _close_fd(fd)


class EventfdVectors:
    """Per-vector eventfds of a function whose MSI-X (or MSI) table a peer emulates.

    ``set_fds`` installs the peer's eventfds (vfio-user SET_IRQS, action TRIGGER);
    ``mask``/``unmask`` are its MASK/UNMASK actions. ``send`` may be called from any
    thread: a vector without an eventfd is dropped, a masked one held and signalled once
    when unmasked.
    """

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self._lock = threading.Lock()
        self._fds: list[int | None] = [None] * vectors
        self._masked = 0
        self._pending = 0
        self.sent = 0
        #: vectors raised while the peer had no eventfd for them (it tore them down)
        self.dropped = 0

    @property
    def pending(self) -> int:
        return self._pending

    def set_fds(self, start: int, fds: list[int | None]) -> None:
        """Vectors ``start..`` signal these eventfds (None: that vector is torn down)."""
        with self._lock:
            for i, fd in enumerate(fds):
                if 0 <= start + i < self.vectors:
                    self._fds[start + i] = fd
                    if fd is None:
                        self._pending &= ~(1 << (start + i))

    def mask(self, vector: int) -> None:
        with self._lock:
            if 0 <= vector < self.vectors:
                self._masked |= 1 << vector

    def unmask(self, vector: int) -> None:
        with self._lock:
            if not 0 <= vector < self.vectors:
                return
            self._masked &= ~(1 << vector)
            if self._pending >> vector & 1:
                self._signal(vector)

    def send(self, vector: int) -> bool:
        with self._lock:
            if not 0 <= vector < self.vectors or self._fds[vector] is None:
                self.dropped += 1
                return False
            if self._masked >> vector & 1:
                self._pending |= 1 << vector
                return False
            return self._signal(vector)

    def _signal(self, vector: int) -> bool:
        fd = self._fds[vector]
        self._pending &= ~(1 << vector)
        if fd is None:
            return False
        # the peer's fd: never a write that can block (peerfd), a full one already has
        # a wake-up pending
        if peerfd.signal_fd(fd) not in (peerfd.Sent.SENT, peerfd.Sent.PENDING):
            return False
        self.sent += 1
        return True


def _close_fd(fd: int) -> None:
    try:
        trio.lowlevel.notify_closing(fd)
    except RuntimeError:
        pass  # not inside trio (built without running, or another thread)
    os.close(fd)


__all__ = ["EventfdVectors", "InjectDelivery", "IrqfdDelivery"]
