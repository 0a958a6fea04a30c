"""Interrupt remapping for a passthrough device's MSI: physical message k → a guest MSI.

The backend supplies the remapper (``hsm.base.InterruptRemapper``: the sim's remap
table in ``hsm/sim_remap.py``; ``IrqfdRemapper`` here for KVM/VFIO, where message k
signals eventfd k and an irqfd route turns it into the guest MSI; none on ACRN, whose
hypervisor does it). On top of it:

* ``RemapRoutes``: the routes of one device (made on first use, cached, dropped at reset),
  shared by the passthrough MSI capability (``passthru/msi.py``) and vMSI-X on MSI.
* ``RemapDelivery``: the MSI-X delivery of vMSI-X on MSI. The guest's table entry k routes
  physical message k; the physical per-vector mask bits mirror what the guest may receive
  now; the PBA the guest reads is the device's own pending bits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from collections.abc import Callable
from typing import Protocol

from ..hsm.base import InterruptRemapper, MessageSource
from ..ratelimit import RateLimitedLog
from .msix import MsixDelivery
from .services import Eventfds

log = logging.getLogger(__name__)


class PhysicalVectors(Protocol):
    """The device's multi-message MSI as remapping drives it (``passthru.host.HostMsi``)."""

    @property
    def mask(self) -> int: ...

    def set_mask(self, value: int) -> None: ...

    @property
    def pending(self) -> int: ...

    def program(self, address: int, data: int) -> None: ...


class IrqfdRemapper:
    """KVM/VFIO: the device signals eventfd k for message k; an irqfd routes it.

    The host kernel owns the device's MSI here (VFIO_DEVICE_SET_IRQS enabled all ``count``
    messages, and Linux writes the mask register from its own cached copy), so masking is
    done on our side of the eventfd (``hold``): a held vector's irqfd is detached and its
    messages wait in the eventfd (``pending``); releasing it attaches the irqfd again,
    which delivers what waited (KVM's irqfd_assign, as the sim, looks at the count first).
    Every vector starts held."""

    #: the kernel programs the device (see docs/vmsix-on-msi.md, "Who writes the MSI
    #: capability")
    kernel_programs_msi = True

    def __init__(self, eventfds: Eventfds, host: MessageSource, count: int) -> None:
        self.count = count
        self.eventfds = eventfds
        self.host = host
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self._routes: dict[int, tuple[int, int]] = {}  # wanted
        self._attached: set[int] = set()  # irqfds registered now
        self._held = (1 << count) - 1
        try:
            host.message_eventfds(self.fds)
        except BaseException:
            self._close_fds()
            raise

    def physical_message(self) -> None:
        return None

    def route(self, k: int, address: int, data: int) -> bool:
        if not 0 <= k < self.count:
            return False
        if self._routes.get(k) == (address, data):
            return True
        self.unroute(k)
        self._routes[k] = (address, data)
        if not self._held >> k & 1 and not self._attach(k):
            del self._routes[k]
            return False
        return True

    def unroute(self, k: int) -> None:
        self._detach(k)
        self._routes.pop(k, None)

    def hold(self, mask: int) -> None:
        """Vectors whose bit is set wait in their eventfd; the others reach the guest."""
        mask &= (1 << self.count) - 1
        changed, self._held = self._held ^ mask, mask
        for k in range(self.count):
            if changed >> k & 1:
                if mask >> k & 1:
                    self._detach(k)
                elif k in self._routes:
                    self._attach(k)

    @property
    def held(self) -> int:
        return self._held

    def pending(self) -> int:
        """Held vectors with a message waiting (the eventfd is readable; nothing is read)."""
        bits = 0
        poller = select.poll()
        for k, fd in enumerate(self.fds):
            if self._held >> k & 1:
                poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(0):
            bits |= 1 << self.fds.index(fd)
        return bits

    def discard_pending(self) -> None:
        """Forget every message waiting (a reset: the next guest must not receive them)."""
        for fd in self.fds:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)

    def _attach(self, k: int) -> bool:
        if k in self._attached:
            return True
        address, data = self._routes[k]
        try:
            self.eventfds.irqfd(self.fds[k], address, data)
        except Exception as e:
            log.warning("passthru %s: irqfd for message %d failed: %s", self.host.name, k, e)
            return False
        self._attached.add(k)
        return True

    def _detach(self, k: int) -> None:
        if k in self._attached:
            self._attached.discard(k)
            try:
                self.eventfds.irqfd(self.fds[k], 0, 0, deassign=True)
            except Exception as e:
                log.debug("irqfd deassign failed: %s", e)

    def close(self) -> None:
        for k in range(self.count):
            self.unroute(k)
        try:
            self.host.message_eventfds(None)
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class IrqfdRemapperFactory:
    """What assembly hands devices as the remapper of a backend with eventfds (KVM)."""

    kernel_programs_msi = True

    def __init__(self, eventfds: Eventfds) -> None:
        self.eventfds = eventfds

    def __call__(self, source: MessageSource, count: int) -> IrqfdRemapper:
        return IrqfdRemapper(self.eventfds, source, count)


def kernel_programs_msi(factory: object) -> bool:
    """Whether the remappers ``factory`` makes leave the device's MSI capability to the
    host kernel (VFIO), so the device model must never write it."""
    return bool(getattr(factory, "kernel_programs_msi", False))


class RemapRoutes:
    """The routes of one device's ``count`` messages through the backend's remapper."""

    def __init__(self, name: str, count: int,
                 factory: Callable[[int], InterruptRemapper]) -> None:
        self.name = name
        self.count = count
        self._factory = factory
        self.remapper: InterruptRemapper | None = None
        #: message k → the guest MSI it raises now
        self.routes: dict[int, tuple[int, int]] = {}
        #: the device was given its physical message (done once, at the first route)
        self.programmed = False
        self._rl = RateLimitedLog(log)

    def get_remapper(self) -> InterruptRemapper | None:
        """The remapper, made on first use; None if the backend cannot give one (logged:
        a guest write must not fail, the messages just stay masked)."""
        if self.remapper is None:
            try:
                self.remapper = self._factory(self.count)
            except Exception as e:
                self._rl.warning("passthru %s: no interrupt remapping: %s", self.name, e)
                return None
        return self.remapper

    def route(self, k: int, address: int, data: int) -> bool:
        remapper = self.get_remapper()
        if remapper is None:
            return False
        if self.routes.get(k) == (address, data):
            return True
        if remapper.route(k, address, data):
            self.routes[k] = (address, data)
            return True
        self.routes.pop(k, None)
        return False

    def unroute(self, k: int) -> None:
        if self.routes.pop(k, None) is not None and self.remapper is not None:
            self.remapper.unroute(k)

    def unroute_all(self) -> None:
        for k in list(self.routes):
            self.unroute(k)

    def program_once(self, program: Callable[[int, int], None]) -> None:
        """Give the device the message the remapper wants, the first time only."""
        if self.programmed or self.remapper is None:
            return
        phys = self.remapper.physical_message()
        if phys is not None:
            program(*phys)
        self.programmed = True

    def reset(self) -> None:
        self.unroute_all()
        self.programmed = False

    def close(self) -> None:
        self.routes.clear()
        self.programmed = False
        remapper, self.remapper = self.remapper, None
        if remapper is not None:
            remapper.close()


class RemapDelivery(MsixDelivery):
    """vMSI-X on MSI: the guest's MSI-X table drives the device's multi-message MSI
    (acrn-facts §5.5 remap_one_vmsix_entry_on_msi, with §5.7's improvements)."""

    def __init__(self, physical: PhysicalVectors, routes: RemapRoutes,
                 on_enable: Callable[[bool], None]) -> None:
        self.physical = physical
        self.routes = routes
        self.count = routes.count
        self._on_enable = on_enable

    def entry_written(self, vector: int) -> None:
        """Mask physical k, route entry k if the guest unmasked it, program the device's
        message once, then let the physical mask follow the guest's."""
        table = self.table
        assert table is not None
        self.physical.set_mask(self.physical.mask | 1 << vector)
        address, data, masked = table.entry(vector)
        if not masked and self.routes.route(vector, address, data):
            self.routes.program_once(self.physical.program)
        self._sync_masks()

    def control_changed(self, enabled_changed: bool) -> None:
        table = self.table
        assert table is not None
        if enabled_changed:
            # every physical vector is masked while MSI-X is off, so nothing escapes here
            self._on_enable(table.enabled)
        self._sync_masks()

    def pending(self, own: int) -> int:
        """The device's pending bits: the messages it holds because they are masked."""
        return self.physical.pending & ((1 << self.count) - 1)

    def _sync_masks(self) -> None:
        """Physical mask = every vector the guest may not receive right now."""
        table = self.table
        allow = 0
        if table is not None and table.enabled and not table.function_masked \
                and self.routes.programmed:
            for k in self.routes.routes:
                if not table.masked(k):
                    allow |= 1 << k
        want = ((1 << self.count) - 1) & ~allow
        if self.physical.mask != want:
            self.physical.set_mask(want)

    def reset(self) -> None:
        self.routes.reset()
        self._sync_masks()

    def close(self) -> None:
        self.routes.close()


__all__ = ["IrqfdRemapper", "IrqfdRemapperFactory", "PhysicalVectors", "RemapDelivery",
           "RemapRoutes", "kernel_programs_msi"]
