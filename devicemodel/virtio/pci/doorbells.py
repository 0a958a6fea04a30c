"""The queue doorbells as ioeventfds: what the transport declares and the task that
answers them.

One eventfd per queue, declared at every notify address the function has (the legacy
QUEUE_NOTIFY register with the queue index as datamatch, the PIO notify BAR2 likewise,
the modern notify region's per-queue address with any value), where acrn-dm picks one
address per queue, so each interface a driver may use is fast. The bus registers them
while the driver has the device running (``pci/fastpath.py``); a task per queue turns a
signal into ``queue_notify``. The trapped registers keep working underneath.
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
        for q, fd in enumerate(self.fds):
            if legacy:
                self.events.append(IoEvent(LEGACY_BAR, L_QUEUE_NOTIFY, 2, fd, q))
            if pio_notify:
                self.events.append(IoEvent(PIO_NOTIFY_BAR, 0, 2, fd, q))
            if modern:
                self.events.append(IoEvent(MODERN_BAR, NOTIFY_OFF + NOTIFY_MULTIPLIER * q, 2,
                                           fd))

    def start(self, nursery: trio.Nursery, device: VirtioDevice) -> None:
        for i, fd in enumerate(self.fds):
            nursery.start_soon(self._wait, device, i, fd)

    @staticmethod
    async def _wait(device: VirtioDevice, index: int, fd: int) -> None:
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            device.queue_notify(index)

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                trio.lowlevel.notify_closing(fd)
            except RuntimeError:
                pass  # not inside trio (lspci builds without running)
            os.close(fd)


__all__ = ["Doorbells"]
