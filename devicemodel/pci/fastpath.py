"""Eventfd fast paths a function declares and the bus wires (design.md §2).

A device declares its doorbells (``device.IoEvent``: BAR, offset, length, datamatch, the
eventfd it waits on) and whether its MSI-X vectors should be irqfd-backed; it arms the doorbells
when the driver starts it and disarms them at reset. ``FastPaths`` (one per bus) turns
that into the backend's registrations: each armed doorbell at its BAR's current guest
address while the BAR is decoded, moved when the BAR moves, dropped when it is
unmapped, the device reset or closed. A registration that fails is logged and left out:
the trapped register still works, only the fast path is lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..irq.delivery import IrqfdDelivery
from ..irq.services import Eventfds, MsiSink
from ..ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from .device import PciDevice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Registration:
    fd: int
    address: int
    length: int
    pio: bool
    datamatch: int | None


class FastPaths:
    """The eventfd registrations of every function on one bus."""

    def __init__(self, eventfds: Eventfds | None, msi: MsiSink | None) -> None:
        self.eventfds = eventfds
        self.msi = msi
        self._registered: dict[int, set[_Registration]] = {}
        self._rl = RateLimitedLog(log)

    def wire(self, dev: PciDevice) -> None:
        """Give a function that asked for irqfd-backed MSI-X vectors their eventfds."""
        msix = dev.msix
        if msix is None or not msix.wants_irqfd or self.eventfds is None or self.msi is None:
            return
        msix.table.set_delivery(IrqfdDelivery(self.eventfds, self.msi, msix.entries,
                                              dev.name))

    def sync(self, dev: PciDevice) -> None:
        """Make the backend's ioeventfds match what ``dev`` wants now."""
        if self.eventfds is None:
            return
        key = id(dev)
        have = self._registered.get(key, set())
        want = self._wanted(dev)
        if want == have:
            return
        for r in have - want:
            try:
                self.eventfds.ioeventfd(r.fd, r.address, r.length, pio=r.pio,
                                        datamatch=r.datamatch, deassign=True)
            except Exception as e:
                self._rl.warning("%s: ioeventfd deassign at %#x failed: %s", dev.name,
                                 r.address, e)
        now = have & want
        for r in want - have:
            try:
                self.eventfds.ioeventfd(r.fd, r.address, r.length, pio=r.pio,
                                        datamatch=r.datamatch)
            except Exception as e:
                # the trapped notify register still works: only the fast path is lost
                self._rl.warning("%s: ioeventfd at %#x failed: %s", dev.name, r.address, e)
                continue
            now.add(r)
        if now:
            self._registered[key] = now
        else:
            self._registered.pop(key, None)

    @staticmethod
    def _wanted(dev: PciDevice) -> set[_Registration]:
        want: set[_Registration] = set()
        if not dev.ioevents_armed:
            return want
        for ev in dev.ioevents:
            bar = dev.bar(ev.bar)
            if bar is None or bar.mapped_at is None:
                continue
            want.add(_Registration(ev.fd, bar.mapped_at + ev.offset, ev.length, bar.is_io,
                                   ev.datamatch))
        return want


__all__ = ["FastPaths"]
