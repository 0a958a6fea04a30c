"""The queue doorbells as ioeventfds: what the transport declares and the task that
answers them.

One eventfd per queue, declared at every notify address the function has (the legacy
QUEUE_NOTIFY register with the queue index as datamatch, the PIO notify BAR2 likewise,
the modern notify region's per-queue address with any value), where acrn-dm picks one
address per queue, so each interface a driver may use is fast. The bus registers them
while the driver has the device running (``pci/fastpath.py``); a task per queue turns a
signal into ``queue_notify``. The trapped registers keep working underneath.

A device that serves a queue on a data-plane thread (virtio-blk) takes the queue's
eventfd (``take``: a duplicate for the thread, and the loop stops watching it), so a kick
wakes that thread alone, as vhost-user's kick eventfd does. The device's reset stops the
thread; ``give_back`` then has the loop watch the eventfd again.
"""

from __future__ import annotations

import os

import trio

from ...pci.device import IoEvent
from ..device import VirtioDevice
from .layout import (
    L_QUEUE_NOTIFY,
    LEGACY_BAR,
    MODERN_BAR,
    NOTIFY_MULTIPLIER,
    NOTIFY_OFF,
    PIO_NOTIFY_BAR,
)


class Doorbells:
    """Queue notify eventfds of one function and their waiting tasks."""

    def __init__(self, queues: int, *, legacy: bool, pio_notify: bool,
                 modern: bool) -> None:
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(queues)]
        self.events: list[IoEvent] = []
        #: the loop's watcher of each queue's eventfd, while it watches it
        self._watchers: dict[int, trio.CancelScope] = {}
        self._taken: set[int] = set()  # queues a data-plane thread waits on instead
        self._nursery: trio.Nursery | None = None
        self._device: VirtioDevice | None = None
        for q, fd in enumerate(self.fds):
            if legacy:
                self.events.append(IoEvent(LEGACY_BAR, L_QUEUE_NOTIFY, 2, fd, q))
            if pio_notify:
                self.events.append(IoEvent(PIO_NOTIFY_BAR, 0, 2, fd, q))
            if modern:
                self.events.append(IoEvent(MODERN_BAR, NOTIFY_OFF + NOTIFY_MULTIPLIER * q, 2,
                                           fd))

    def start(self, nursery: trio.Nursery, device: VirtioDevice) -> None:
        self._nursery, self._device = nursery, device
        for i in range(len(self.fds)):
            if i not in self._taken:
                self._watch(i)

    def _watch(self, index: int) -> None:
        assert self._nursery is not None and self._device is not None
        scope = self._watchers[index] = trio.CancelScope()
        self._nursery.start_soon(self._wait, self._device, index, self.fds[index], scope)

    @staticmethod
    async def _wait(device: VirtioDevice, index: int, fd: int, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                device.queue_notify(index)

    def take(self, index: int) -> int | None:
        """A duplicate of queue ``index``'s eventfd for a data-plane thread (the thread
        closes it), which alone is woken by it from now on; None: no such queue."""
        if not 0 <= index < len(self.fds):
            return None
        fd = os.dup(self.fds[index])
        self._taken.add(index)
        scope = self._watchers.pop(index, None)
        if scope is not None:
            scope.cancel()
        return fd

    def give_back(self) -> None:
        """The data-plane threads have stopped (a reset): the loop watches again."""
        taken, self._taken = self._taken, set()
        if self._nursery is not None and self.fds:
            for i in taken:
                if i not in self._watchers:
                    self._watch(i)

    def close(self) -> None:
        for scope in self._watchers.values():
            scope.cancel()
        self._watchers.clear()
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                trio.lowlevel.notify_closing(fd)
            except RuntimeError:
                pass  # not inside trio (lspci builds without running)
            os.close(fd)


__all__ = ["Doorbells"]
