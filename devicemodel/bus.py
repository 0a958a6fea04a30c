"""Port and MMIO buses: address ranges → handlers, O(log n) lookup with a last-hit cache.

Handlers are synchronous: a request is answered while its vCPU waits, so a handler must
never block; slow work (disk, network) belongs to device tasks that handlers wake up.

A range is ``vcpu_safe`` when its handler may also run on a request thread behind the
loop gate (``loopgate.py``): it never calls trio and never blocks. The request is then
answered on the vCPU (or ACRN waiter) thread itself, with no hand-off to the loop. A
handler says so with a ``vcpu_safe = True`` attribute, or the caller of ``register``;
one that is safe for some accesses only (a virtio-pci BAR: its common configuration is
plain state, its status register starts and resets the device) has a
``vcpu_safe_access(offset, size, write)`` that says which.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class IoHandler(Protocol):
    """What a registered range answers. ``offset`` is relative to the range's base."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(Exception):
    """A registration that conflicts with another, or unregisters something absent."""


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    handler: IoHandler
    name: str
    vcpu_safe: bool = False
    #: for a range that is not ``vcpu_safe`` as a whole: ``(offset, size, write) -> bool``
    #: says which of its accesses are (a handler's ``vcpu_safe_access``), None: none
    vcpu_safe_access: Callable[[int, int, bool], bool] | None = None
    end: int = field(init=False)  # base + length (a field: read on every request)

    def __post_init__(self) -> None:
        object.__setattr__(self, "end", self.base + self.length)


class Bus:
    """Non-overlapping address ranges, sorted by base."""

    kind = "bus"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        #: the range the last lookup found (checked first: requests come in runs; the
        #: request server reads it directly on its hot path)
        self.last: BusRange | None = None
        self._fallbacks: list[BusRange] = []

    def add_fallback(self, base: int, length: int, handler: IoHandler, name: str = "") -> None:
        """Answer accesses inside [base, base+length) that hit no registered range
        (acrn-dm's fallback ranges, e.g. the PCI holes: reads all-ones, writes dropped)."""
        self._fallbacks.append(BusRange(base, length, handler, name,
                                        bool(getattr(handler, "vcpu_safe", False))))

    def _fallback(self, addr: int, size: int) -> BusRange | None:
        for r in self._fallbacks:
            if r.base <= addr and addr + size <= r.end:
                return r
        return None

    def register(self, base: int, length: int, handler: IoHandler, name: str = "", *,
                 vcpu_safe: bool | None = None) -> BusRange:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusError(f"{self.kind} range {base:#x}+{length:#x} ({name}) is out of bounds")
        i = bisect.bisect(self._bases, base)
        for j in (i - 1, i):
            if 0 <= j < len(self._ranges):
                r = self._ranges[j]
                if base < r.end and r.base < base + length:
                    raise BusError(
                        f"{self.kind} range {base:#x}+{length:#x} ({name}) overlaps "
                        f"{r.base:#x}+{r.length:#x} ({r.name})"
                    )
        if vcpu_safe is None:
            vcpu_safe = bool(getattr(handler, "vcpu_safe", False))
        rng = BusRange(base, length, handler, name, vcpu_safe,
                       getattr(handler, "vcpu_safe_access", None))
        self._ranges.insert(i, rng)
        self._bases.insert(i, base)
        return rng

    def unregister(self, base: int) -> BusRange:
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise BusError(f"no {self.kind} range registered at {base:#x}")
        rng = self._ranges.pop(i)
        self._bases.pop(i)
        if self.last is rng:
            self.last = None
        return rng

    def find(self, addr: int, size: int = 1) -> BusRange | None:
        """The range that wholly contains [addr, addr+size), else None."""
        last = self.last
        if last is not None and last.base <= addr and addr + size <= last.end:
            return last
        i = bisect.bisect(self._bases, addr) - 1
        if i < 0:
            return None
        r = self._ranges[i]
        if addr + size <= r.end:
            self.last = r
            return r
        return None

    def lookup(self, addr: int, size: int) -> BusRange | None:
        """The range that answers [addr, addr+size): a registered one, else a fallback."""
        last = self.last  # the last hit, checked here first: every request comes here
        if last is not None and last.base <= addr and addr + size <= last.end:
            return last
        return self.find(addr, size) or self._fallback(addr, size)

    def read(self, addr: int, size: int) -> int | None:
        """The handler's answer, or None when nothing is there (the caller returns all-ones)."""
        r = self.find(addr, size) or self._fallback(addr, size)
        if r is None:
            return None
        return r.handler.read(addr - r.base, size)

    def write(self, addr: int, size: int, value: int) -> bool:
        r = self.find(addr, size) or self._fallback(addr, size)
        if r is None:
            return False
        r.handler.write(addr - r.base, size, value)
        return True

    def ranges(self) -> list[BusRange]:
        return list(self._ranges)


class PortBus(Bus):
    kind = "port"

    def __init__(self) -> None:
        super().__init__(0x10000)


class MmioBus(Bus):
    kind = "mmio"

    def __init__(self) -> None:
        super().__init__(1 << 64)
