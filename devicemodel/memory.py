"""Guest RAM: memfd-backed regions laid out as acrn-dm lays them out, GPA → memoryview.

acrn-dm's map: RAM at [0, lowmem) with lowmem = min(size, 2 GiB); the rest at 4 GiB.
Every guest-supplied address goes through ``view``, which checks bounds and overflow, so
a hostile guest can never make us touch memory outside its RAM.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

LOWMEM_LIMIT = 2 * GiB  # PCI_EMUL_MEMBASE32: the 32-bit PCI hole starts here
HIGHMEM_BASE = 4 * GiB
PCI_HOLE_END = 0xE000_0000
ECAM_BASE = 0xE000_0000
MIN_MEMSIZE = 128 * MiB
MEMSIZE_ALIGN = 2 * MiB
#: RAM above 2 GiB sits at 4 GiB and must end below the 64-bit PCI window at 256 GiB
#: (acrn-dm's PCI_EMUL_MEMBASE64; pci/bus.py MEM64_BASE), so the largest guest is 254 GiB.
#: acrn-dm itself has no such check: its RAM would overlap its own BAR window.
MAX_MEMSIZE = 256 * GiB - (HIGHMEM_BASE - LOWMEM_LIMIT)

E820_RAM = 1
E820_RESERVED = 2

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """A guest physical address range that is not (entirely) guest RAM."""


@dataclass
class RamRegion:
    """One contiguous run of guest RAM and the host mapping behind it."""

    gpa: int
    size: int
    mm: mmap.mmap
    fd: int = -1

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


class MemoryMap:
    """GPA → host bytes over a set of RAM regions, with bounds checks.

    The device model's own RAM and the sim hypervisor's record of what was mapped both use
    this, so tests and devices see guest memory the same way.
    """

    def __init__(self, regions: list[RamRegion] | None = None) -> None:
        self._regions: list[RamRegion] = []
        self._starts: list[int] = []
        self._views: list[memoryview] = []
        for r in regions or []:
            self.add(r)

    def add(self, region: RamRegion) -> None:
        for r in self._regions:
            if region.gpa < r.end and r.gpa < region.end:
                raise GuestMemoryError(
                    f"RAM region {region.gpa:#x}+{region.size:#x} overlaps {r.gpa:#x}+{r.size:#x}"
                )
        i = bisect.bisect(self._starts, region.gpa)
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)
        self._views.insert(i, memoryview(region.mm))

    @property
    def regions(self) -> list[RamRegion]:
        return list(self._regions)

    @property
    def total(self) -> int:
        return sum(r.size for r in self._regions)

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.view(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def spans(self) -> tuple[tuple[int, int, memoryview], ...] | None:
        """Every region as (gpa, end, view of the whole region), for a hot loop that inlines
        :meth:`view`'s check (``gpa <= addr and addr + length <= end``, then
        ``view[addr - gpa : addr + length - gpa]``).

        None when a subclass overrides :meth:`view`: it wants to see (or vet) every access.
        The tuple is a snapshot: take it again after the map changes.
        """
        if type(self).view is not MemoryMap.view:
            return None
        return tuple((r.gpa, r.end, v) for r, v in zip(self._regions, self._views, strict=True))

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of [gpa, gpa+length), which must lie in one RAM region."""
        if gpa < 0 or length < 0 or gpa + length > 0xFFFF_FFFF_FFFF_FFFF + 1:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        i = bisect.bisect(self._starts, gpa) - 1
        if i < 0:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")
        r = self._regions[i]
        off = gpa - r.gpa
        if off + length > r.size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")
        return self._views[i][off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u8(self, gpa: int) -> int:
        return _U8.unpack(self.view(gpa, 1))[0]

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack(self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack(self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack(self.view(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        _U8.pack_into(self.view(gpa, 1), 0, value & 0xFF)

    # Stores of 2 and 4 bytes go through a cast memoryview: one store, which another CPU
    # sees whole (``struct.pack_into`` zeroes its destination first: a ring index written
    # that way can be read as 0 in between).
    def write_u16(self, gpa: int, value: int) -> None:
        self.view(gpa, 2).cast("H")[0] = value & 0xFFFF

    def write_u32(self, gpa: int, value: int) -> None:
        self.view(gpa, 4).cast("I")[0] = value & 0xFFFF_FFFF

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self.view(gpa, 8), 0, value & 0xFFFF_FFFF_FFFF_FFFF)


def parse_memsize(text: str) -> int:
    """Parse ``-m``: a number with a K/M/G suffix (a bare number means bytes, unlike HEAD's bug)."""
    t = text.strip()
    if not t:
        raise ValueError("empty memory size")
    units = {"k": KiB, "m": MiB, "g": GiB, "b": 1}
    mult = 1
    if t[-1].lower() in units:
        mult = units[t[-1].lower()]
        t = t[:-1]
    # ASCII only: str.isdigit() takes "²", which int() refuses (as it does past 4300 digits)
    if not (t.isascii() and t.isdigit()):
        raise ValueError(f"memory size {text!r} is not a number with a K, M or G suffix")
    return int(t) * mult


def check_memsize(size: int) -> None:
    """acrn-dm's rules (at least 128 MiB, 2 MiB steps) and our ceiling, MAX_MEMSIZE; each
    message ends with its fix."""
    if size < MIN_MEMSIZE:
        raise ValueError(f"memory size {size // MiB} MiB is below the minimum of 128 MiB; "
                         "give at least 128M in 2M steps")
    if size > MAX_MEMSIZE:
        raise ValueError(f"more than the {MAX_MEMSIZE // GiB} GiB a guest can have (its RAM "
                         "must end below the 64-bit PCI window at 256 GiB); give at most "
                         f"{MAX_MEMSIZE // GiB}G")
    if size % MEMSIZE_ALIGN:
        raise ValueError("memory size must be a multiple of 2 MiB; give at least 128M in "
                         "2M steps")


def _memfd_region(gpa: int, size: int, name: str) -> RamRegion:
    """A region of our own RAM; sealed against resizing (as QEMU's memory-backend-memfd
    does), since the fd is handed to vhost-user peers and a shrunk file would fault here."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return RamRegion(gpa=gpa, size=size, mm=mm, fd=fd)


class GuestMemory(MemoryMap):
    """The VM's RAM: memfd-backed (shareable with vhost-user peers), sparse until touched."""

    def __init__(self, size: int, name: str = "guest-ram") -> None:
        check_memsize(size)
        self.size = size
        self.lowmem = min(size, LOWMEM_LIMIT)
        self.highmem = size - self.lowmem
        regions = [_memfd_region(0, self.lowmem, f"{name}-low")]
        if self.highmem:
            regions.append(_memfd_region(HIGHMEM_BASE, self.highmem, f"{name}-high"))
        super().__init__(regions)

    def e820(self) -> list[E820Entry]:
        """The e820 table a loader hands the guest (acrn-dm's layout, minus vSSRAM/GPU)."""
        table = [
            E820Entry(0, 0xA0000, E820_RAM),
            E820Entry(0xA0000, 0x100000 - 0xA0000, E820_RESERVED),
            E820Entry(0x100000, self.lowmem - 0x100000, E820_RAM),
            E820Entry(ECAM_BASE, HIGHMEM_BASE - ECAM_BASE, E820_RESERVED),
        ]
        if self.highmem:
            table.append(E820Entry(HIGHMEM_BASE, self.highmem, E820_RAM))
        return table

    def close(self) -> None:
        for v in self._views:
            v.release()
        for r in self.regions:
            try:
                r.mm.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping dies with it
            if r.fd >= 0:
                os.close(r.fd)
                r.fd = -1
