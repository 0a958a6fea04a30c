"""The sim backend's interrupt remapping: a remap table and the VT-d decoding of messages.

A multi-message MSI device sends one (address, data) pair with the message number in the
low data bits. Remapping hardware (VT-d) turns that into N independent interrupts: the
device is programmed once, in remappable format with SHV=1 and the base handle, and the
hardware uses entry ``base + k`` for message k (acrn-facts §5.5). That is what lets one
MSI capability stand behind N MSI-X table entries.

``SimRemapper`` is that service for one device on the sim backend: it reserves a block of
the sim's remap entries (aligned to its size, as ACRN reserves IRTEs) and plays the
hardware for the device's message writes (decodes the remappable address, adds the
subhandle, looks up the entry, or records a fault).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from .base import HypervisorError, MessageSource

log = logging.getLogger(__name__)

MSI_ADDR_BASE = 0xFEE0_0000
MSI_ADDR_FORMAT_REMAP = 1 << 4  # interrupt format: 1 = remappable
MSI_ADDR_SHV = 1 << 3  # subhandle valid: handle + data[15:0]
HANDLE_MAX = 1 << 16


@dataclass
class SimRemapEntry:
    """An interrupt-remapping entry: a device's raw message → the guest MSI to inject."""

    address: int
    data: int


class RemapHardware(Protocol):
    """What the remapper needs of the sim backend (the IOMMU's tables and state)."""

    state: str
    remap_table: dict[tuple[str, int], SimRemapEntry]
    #: handles reserved by some device, like ACRN's reserved IRTE bitmap
    remap_reserved: set[int]

    def remap_msi(self, source: str, handle: int) -> tuple[int, int] | None: ...


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


class SimRemapper:
    """A contiguous block of the sim's remap entries for one device's ``count`` messages."""

    def __init__(self, sim: RemapHardware, host: MessageSource, count: int) -> None:
        self.count = count
        self.sim = sim
        self.host = host
        self.source = host.name
        self.base = self._reserve(count)
        #: messages the "IOMMU" refused: not remappable, or no entry (VT-d faults)
        self.faults: list[tuple[int, int]] = []
        host.connect_interrupts(self.deliver)

    def _reserve(self, count: int) -> int:
        used = self.sim.remap_reserved
        for base in range(0, HANDLE_MAX, count):
            block = set(range(base, base + count))
            if not block & used:
                used |= block
                return base
        raise HypervisorError(f"sim remapping: no {count} free remap entries for "
                              f"{self.host.name}")

    def physical_message(self) -> tuple[int, int]:
        return remappable_address(self.base), 0

    def route(self, k: int, address: int, data: int) -> bool:
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
        for k in range(self.count):
            self.unroute(k)
        self.host.connect_interrupts(None)
        self.sim.remap_reserved -= set(range(self.base, self.base + self.count))


__all__ = [
    "SimRemapEntry", "SimRemapper", "decode_remappable", "remappable_address",
]
