"""Interrupt remapping for passthrough MSI: physical message k → the guest MSI of entry k.

A multi-message MSI device sends one (address, data) pair with the message number in the
low data bits. Remapping hardware (VT-d) turns that into N independent interrupts: the
device is programmed once, in remappable format with SHV=1 and the base handle, and the
hardware uses entry ``base + k`` for message k (acrn-facts §5.5). That is what lets one
MSI capability stand behind N MSI-X table entries.

``InterruptRemapper`` is that service for one device:

* ``SimRemapper``: the sim hypervisor's remap table (``SimHypervisor.remap_table``); it
  also plays the VT-d hardware for the device's message writes (decodes the remappable
  address, adds the subhandle, looks up the entry, or records a fault).
* ``IrqfdRemapper``: KVM/VFIO style: message k signals eventfd k, and an irqfd route
  turns it into entry k's guest MSI (the host kernel programs the physical message).
* On ACRN the hypervisor does it all (acrn-dm's mode: passthru/device.py only gives the
  virtual BAR an address), so there is no remapper object there.
"""

from __future__ import annotations

import logging
import os
import weakref
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from .host import HostPciDevice, PassthroughError

if TYPE_CHECKING:
    from ..context import VmContext
    from ..hsm.sim import SimHypervisor

log = logging.getLogger(__name__)

MSI_ADDR_BASE = 0xFEE0_0000
MSI_ADDR_FORMAT_REMAP = 1 << 4  # interrupt format: 1 = remappable
MSI_ADDR_SHV = 1 << 3  # subhandle valid: handle + data[15:0]
HANDLE_MAX = 1 << 16


def remappable_address(handle: int, *, shv: bool = True) -> int:
    """VT-d remappable MSI address: handle[14:0] in bits 19:5, handle[15] in bit 2."""
    if not 0 <= handle < HANDLE_MAX:
        raise ValueError(f"interrupt handle {handle} outside 0..{HANDLE_MAX - 1}")
    return (MSI_ADDR_BASE | (handle & 0x7FFF) << 5 | (handle >> 15) << 2
            | MSI_ADDR_FORMAT_REMAP | (MSI_ADDR_SHV if shv else 0))


def decode_remappable(address: int, data: int) -> int | None:
    """The remap-table index a message selects, or None for a non-remappable write."""
    if (address >> 20) != (MSI_ADDR_BASE >> 20) or not address & MSI_ADDR_FORMAT_REMAP:
        return None
    handle = ((address >> 5) & 0x7FFF) | ((address >> 2) & 1) << 15
    if address & MSI_ADDR_SHV:
        handle += data & 0xFFFF
    return handle if handle < HANDLE_MAX else None


class InterruptRemapper(ABC):
    """Routes the ``count`` messages of one passthrough device to guest MSIs."""

    def __init__(self, count: int) -> None:
        self.count = count

    @abstractmethod
    def physical_message(self) -> tuple[int, int] | None:
        """The (address, data) to program into the device once, or None when the host
        kernel programs the device itself (VFIO)."""

    @abstractmethod
    def route(self, k: int, address: int, data: int) -> bool:
        """Message k now raises the guest MSI (address, data). False: could not."""

    @abstractmethod
    def unroute(self, k: int) -> None: ...

    def close(self) -> None:
        for k in range(self.count):
            self.unroute(k)


# handles reserved per sim hypervisor, like ACRN's reserved IRTE bitmap
_SIM_RESERVED: weakref.WeakKeyDictionary[SimHypervisor, set[int]] = weakref.WeakKeyDictionary()


class SimRemapper(InterruptRemapper):
    """A contiguous block of the sim hypervisor's remap entries, aligned to its size (as
    ACRN reserves IRTEs), and the decoding VT-d does for the device's writes."""

    def __init__(self, sim: SimHypervisor, host: HostPciDevice, count: int) -> None:
        super().__init__(count)
        self.sim = sim
        self.host = host
        self.source = host.name
        self.base = self._reserve(count)
        #: messages the "IOMMU" refused: not remappable, or no entry (VT-d faults)
        self.faults: list[tuple[int, int]] = []
        host.connect_interrupts(self.deliver)

    def _reserve(self, count: int) -> int:
        used = _SIM_RESERVED.setdefault(self.sim, set())
        for base in range(0, HANDLE_MAX, count):
            block = set(range(base, base + count))
            if not block & used:
                used |= block
                return base
        raise PassthroughError(f"passthru {self.host.name}: no {count} free remap entries")

    def physical_message(self) -> tuple[int, int]:
        return remappable_address(self.base), 0

    def route(self, k: int, address: int, data: int) -> bool:
        from ..hsm.sim import SimRemapEntry

        if not 0 <= k < self.count:
            return False
        self.sim.remap_table[(self.source, self.base + k)] = SimRemapEntry(address, data)
        return True

    def unroute(self, k: int) -> None:
        self.sim.remap_table.pop((self.source, self.base + k), None)

    def deliver(self, address: int, data: int) -> None:
        """A message write from the device, as the remapping hardware sees it."""
        handle = decode_remappable(address, data)
        ok = (
            handle is not None
            and self.base <= handle < self.base + self.count
            and self.sim.state not in ("none", "destroyed")
            and self.sim.remap_msi(self.source, handle) is not None
        )
        if not ok:
            self.faults.append((address, data))
            log.debug("remap fault from %s: %#x/%#x", self.source, address, data)

    def close(self) -> None:
        super().close()
        self.host.connect_interrupts(None)
        used = _SIM_RESERVED.get(self.sim)
        if used is not None:
            used -= set(range(self.base, self.base + self.count))


class IrqfdRemapper(InterruptRemapper):
    """KVM/VFIO: eventfd k per message, routed to the guest by an irqfd."""

    def __init__(self, ctx: VmContext, host: HostPciDevice, count: int) -> None:
        super().__init__(count)
        self.ctx = ctx
        self.host = host
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self._routes: dict[int, tuple[int, int]] = {}
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
        try:
            self.ctx.irq.irqfd(self.fds[k], address, data)
        except Exception as e:
            log.warning("passthru %s: irqfd for message %d failed: %s", self.host.name, k, e)
            return False
        self._routes[k] = (address, data)
        return True

    def unroute(self, k: int) -> None:
        if self._routes.pop(k, None) is not None:
            try:
                self.ctx.irq.irqfd(self.fds[k], 0, 0, deassign=True)
            except Exception as e:
                log.debug("irqfd deassign failed: %s", e)

    def close(self) -> None:
        super().close()
        try:
            self.host.message_eventfds(None)
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def remapping_missing(ctx: VmContext) -> str | None:
    """Why this backend cannot remap a passthrough device's MSI, or None if it can."""
    hv = ctx.hv
    if hasattr(hv, "remap_table") and hasattr(hv, "remap_msi"):
        return None
    if ctx.irq.supports_eventfds:
        return None
    return f"the {hv.name} backend offers no interrupt remapping (needs the sim remap " \
        "table or irqfd)"


def remapper_for(ctx: VmContext, host: HostPciDevice, count: int,
                 *, prefer: str | None = None) -> InterruptRemapper:
    """The remapper the backend offers: the sim's table, or irqfd routes."""
    hv = ctx.hv
    if prefer != "irqfd" and hasattr(hv, "remap_table") and hasattr(hv, "remap_msi"):
        return SimRemapper(hv, host, count)  # type: ignore[arg-type]
    if ctx.irq.supports_eventfds:
        return IrqfdRemapper(ctx, host, count)
    raise PassthroughError(f"passthru {host.name}: {remapping_missing(ctx)}")


__all__ = [
    "InterruptRemapper", "IrqfdRemapper", "SimRemapper", "decode_remappable",
    "remappable_address", "remapper_for", "remapping_missing",
]
