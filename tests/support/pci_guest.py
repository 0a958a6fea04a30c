"""A guest-side PCI enumerator that replays what Linux does (drivers/pci/probe.c), through
the sim hypervisor's scriptable vCPU.

Linux: read vendor/device (0xFFFF = nothing), header type (bit 7 = look at functions
1-7), class; size each BAR with decoding turned off (write all-ones, read, restore);
walk the capability list from 0x34. Drivers then enable decoding and program MSI/MSI-X.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from devicemodel.hsm.sim import SimHypervisor, SimVcpu
from devicemodel.vm import Vm, running

ECAM = 0xE000_0000


@dataclass
class GuestBar:
    idx: int
    io: bool
    is64: bool
    prefetch: bool
    addr: int
    size: int


@dataclass
class GuestFunc:
    bus: int
    dev: int
    func: int
    vendor: int
    device: int
    class_code: int
    header: int
    bars: list[GuestBar] = field(default_factory=list)
    caps: list[tuple[int, int]] = field(default_factory=list)  # (offset, id)

    def cap(self, cap_id: int) -> int:
        return next(off for off, cid in self.caps if cid == cap_id)


class PciGuest:
    """Config access by CF8/CFC (default) or ECAM MMIO, and Linux's enumeration steps."""

    def __init__(self, g: SimVcpu, *, ecam: bool = False) -> None:
        self.g = g
        self.ecam = ecam

    async def read(self, bdf: tuple[int, int, int], reg: int, size: int) -> int:
        b, d, f = bdf
        if self.ecam:
            return await self.g.mmio_read(ECAM | b << 20 | d << 15 | f << 12 | reg, size)
        return await self.g.pci_cfg_read(b, d, f, reg, size)

    async def write(self, bdf: tuple[int, int, int], reg: int, size: int, value: int) -> None:
        b, d, f = bdf
        if self.ecam:
            await self.g.mmio_write(ECAM | b << 20 | d << 15 | f << 12 | reg, size, value)
        else:
            await self.g.pci_cfg_write(b, d, f, reg, size, value)

    async def probe(self, bdf: tuple[int, int, int]) -> GuestFunc | None:
        ids = await self.read(bdf, 0, 4)
        if ids & 0xFFFF in (0xFFFF, 0):
            return None
        header = await self.read(bdf, 0x0E, 1)
        cls = await self.read(bdf, 0x08, 4) >> 8
        return GuestFunc(*bdf, ids & 0xFFFF, ids >> 16, cls, header)

    async def scan(self, bus: int = 0) -> list[GuestFunc]:
        found: list[GuestFunc] = []
        for dev in range(32):
            fn0 = await self.probe((bus, dev, 0))
            if fn0 is None:
                continue
            found.append(fn0)
            if fn0.header & 0x80:
                for func in range(1, 8):
                    fn = await self.probe((bus, dev, func))
                    if fn is not None:
                        found.append(fn)
        for fn in found:
            await self.size_bars(fn)
            await self.walk_caps(fn)
        return found

    async def size_bars(self, fn: GuestFunc) -> None:
        """pci_read_bases/__pci_read_base with decoding off."""
        bdf = (fn.bus, fn.dev, fn.func)
        cmd = await self.read(bdf, 0x04, 2)
        await self.write(bdf, 0x04, 2, cmd & ~0x3)
        idx = 0
        fn.bars = []
        while idx < 6:
            reg = 0x10 + 4 * idx
            orig = await self.read(bdf, reg, 4)
            await self.write(bdf, reg, 4, 0xFFFF_FFFF)
            sz = await self.read(bdf, reg, 4)
            await self.write(bdf, reg, 4, orig)
            io = bool(orig & 1)
            is64 = not io and (orig & 0x6) == 0x4
            if is64:
                orig_hi = await self.read(bdf, reg + 4, 4)
                await self.write(bdf, reg + 4, 4, 0xFFFF_FFFF)
                sz_hi = await self.read(bdf, reg + 4, 4)
                await self.write(bdf, reg + 4, 4, orig_hi)
                base = (orig_hi << 32) | (orig & ~0xF)
                mask = ((sz_hi << 32) | (sz & ~0xF))
            else:
                base = orig & (~0x3 if io else ~0xF) & 0xFFFF_FFFF
                mask = sz & (0xFFFC if io else 0xFFFF_FFF0)
            if mask:
                size = mask & -mask
                fn.bars.append(GuestBar(idx, io, is64, bool(orig & 0x8) and not io, base, size))
            idx += 2 if is64 else 1
        await self.write(bdf, 0x04, 2, cmd)

    async def walk_caps(self, fn: GuestFunc) -> None:
        bdf = (fn.bus, fn.dev, fn.func)
        fn.caps = []
        if not await self.read(bdf, 0x06, 2) & 0x10:
            return
        pos = await self.read(bdf, 0x34, 1)
        ttl = 48
        while pos >= 0x40 and ttl:
            pos &= ~3
            ent = await self.read(bdf, pos, 2)
            if ent & 0xFF == 0xFF:
                break
            fn.caps.append((pos, ent & 0xFF))
            pos = ent >> 8
            ttl -= 1


@asynccontextmanager
async def sim_vm(*slots: str, mem: str = "256M",
                 extra: tuple[str, ...] = ()) -> AsyncIterator[tuple[Vm, SimHypervisor, PciGuest]]:
    """A running VM on the sim hypervisor with ``-s`` slots; yields (vm, sim, guest)."""
    sim = SimHypervisor()
    args = ["-m", mem, *extra]
    for s in slots:
        args += ["-s", s]
    async with running([*args, "vm1"], hypervisor=sim) as vm:
        yield vm, sim, PciGuest(sim.guest(0))
