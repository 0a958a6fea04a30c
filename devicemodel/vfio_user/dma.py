"""The client's DMA regions (its guest RAM), as the ``MemoryMap`` our devices read and write.

Devices see memory only through ``MemoryMap.view`` (bounds-checked ranges), so the same
device code serves the ioreq path, vhost-user and vfio-user. A region is accessible only
when the client sent an fd we could map, readable and writable: a region without an fd
(QEMU's ROMs, or any memory it cannot share) and a read-only one are recorded, so that
DMA_UNMAP and the overlap rules work, but a device access there fails exactly like an
access outside guest RAM. We do not fetch such memory through DMA_READ/DMA_WRITE
messages: our devices touch guest memory synchronously through memoryviews, so that
would need a second data path; the first access there is logged, once per region.

The files are the client's: it can truncate one while we have it mapped. Every mapped
region is guarded (``memguard``): a page that vanishes reads as zeros instead of killing
the server with SIGBUS, and ``fault_fd`` is signalled so the session drops the client.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from dataclasses import dataclass

from .. import memguard
from ..memory import MemoryMap, RamRegion
from .protocol import DMA_READ_FLAG, DMA_WRITE_FLAG, MAX_DMA_MAPS, PAGE_SIZE, DmaMap, Refused

log = logging.getLogger(__name__)

_LIMIT = 1 << 64


@dataclass
class DmaRegion:
    """One DMA_MAP the client made."""

    address: int
    size: int
    flags: int
    offset: int
    mm: mmap.mmap | None = None
    #: (st_dev, st_ino) of the file it maps, to recognise the same pages mapped again
    file_id: tuple[int, int] | None = None
    guard: memguard.GuardedRegion | None = None

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def accessible(self) -> bool:
        return self.mm is not None


class DmaMemory(MemoryMap):
    """Guest memory as the client mapped it; starts empty, changes with DMA_MAP/UNMAP."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[DmaRegion] = []
        #: signalled when a mapped region shrinks under us (see ``shrunk``)
        self.fault_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def map(self, req: DmaMap, fd: int | None) -> DmaRegion:
        """Add one mapping. ``fd`` (if any) is closed here whatever happens."""
        try:
            return self._map(req, fd)
        finally:
            if fd is not None:
                os.close(fd)

    def _map(self, req: DmaMap, fd: int | None) -> DmaRegion:
        where = f"DMA_MAP {req.address:#x}+{req.size:#x}"
        if req.flags & ~(DMA_READ_FLAG | DMA_WRITE_FLAG):
            raise Refused(errno.EINVAL, f"{where}: unknown flags {req.flags:#x}")
        if req.size == 0 or req.address + req.size > _LIMIT or req.offset + req.size > _LIMIT:
            raise Refused(errno.EINVAL, f"{where}: empty or past the end of the address space")
        if (req.address | req.size | req.offset) & (PAGE_SIZE - 1):
            raise Refused(errno.EINVAL, f"{where}: not aligned to {PAGE_SIZE} bytes "
                          f"(offset {req.offset:#x})")
        for m in self.maps:
            if req.address < m.end and m.address < req.address + req.size:
                raise Refused(errno.EEXIST, f"{where} overlaps {m.address:#x}+{m.size:#x}")
        if len(self.maps) >= MAX_DMA_MAPS:
            raise Refused(errno.ENOSPC, f"{where}: already {MAX_DMA_MAPS} mappings")
        region = DmaRegion(req.address, req.size, req.flags, req.offset)
        rw = DMA_READ_FLAG | DMA_WRITE_FLAG
        if fd is not None and req.flags & rw == rw:
            region.mm = self._mmap(fd, req, where)
            st = os.fstat(fd)
            region.file_id = (st.st_dev, st.st_ino)
            self.add(RamRegion(gpa=req.address, size=req.size, mm=region.mm))
            region.guard = memguard.guard(region.mm, where.removeprefix("DMA_MAP "),
                                          self.fault_fd)
        elif fd is not None:
            log.info("%s is not read-write (flags %#x): devices may not use it", where,
                     req.flags)
        else:
            log.info("%s has no fd: devices may not use it (no DMA_READ/WRITE path)", where)
        self.maps.append(region)
        self.maps.sort(key=lambda m: m.address)
        return region

    @staticmethod
    def _mmap(fd: int, req: DmaMap, where: str) -> mmap.mmap:
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise Refused(errno.EBADF, f"{where}: {e}") from None
        # a regular file or a memfd: anything else (an eventfd, a socket) has no pages
        # we could map, and a short file would SIGBUS us on the first touch past its end
        if not (st.st_mode & 0o170000 == 0o100000) or st.st_size < req.offset + req.size:
            raise Refused(errno.EINVAL, f"{where}: the fd is not a file of at least "
                          f"{req.offset + req.size:#x} bytes")
        try:
            return mmap.mmap(fd, req.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=req.offset)
        except (OSError, OverflowError, ValueError) as e:
            raise Refused(errno.EINVAL, f"{where}: cannot map it: {e}") from None

    def spans(self) -> None:
        """No inline fast path: every buffer access goes through :meth:`view`, so an access
        into a region the client has just unmapped fails instead of using a cached view."""
        return None

    def covers_same(self, old: DmaRegion, start: int, length: int) -> bool:
        """Whether [start, start+length) is mapped now by one accessible region that shows
        the same pages ``old`` showed there (same file, same file offset)."""
        for m in self.maps:
            if m.accessible and m.address <= start and start + length <= m.end:
                return (m.file_id == old.file_id and old.file_id is not None
                        and m.offset - m.address == old.offset - old.address)
        return False

    def within(self, address: int, size: int) -> list[DmaRegion]:
        """The mappings DMA_UNMAP of [address, address+size) removes: the spec asks for
        an exact match, QEMU (behind a vIOMMU) invalidates whole ranges, so we follow
        Linux's type1 rule: every mapping inside the range goes, a range that would
        split a mapping is refused, a range with nothing in it removes nothing."""
        if size == 0 or address + size > _LIMIT:
            raise Refused(errno.EINVAL, f"DMA_UNMAP {address:#x}+{size:#x}: bad range")
        end = address + size
        inside = []
        for m in self.maps:
            if m.address < end and address < m.end:
                if not (address <= m.address and m.end <= end):
                    raise Refused(errno.EINVAL, f"DMA_UNMAP {address:#x}+{size:#x} would "
                                  f"split the mapping {m.address:#x}+{m.size:#x}")
                inside.append(m)
        return inside

    def unmap(self, m: DmaRegion) -> None:
        """Remove a mapping: no new access reaches it. Views taken before (a started
        queue's rings) keep the pages mapped until they are dropped; the caller stops
        whatever might still use them first (ServedDevice.release)."""
        self.maps.remove(m)
        if m.mm is None:
            return
        i = self._starts.index(m.address)
        del self._views[i], self._regions[i], self._starts[i]
        try:
            m.mm.close()
        except BufferError:  # a view is alive: the mapping goes with the last one, and
            if m.guard is not None:  # stays guarded until then, waking nobody
                m.guard.notify_fd = -1
        else:
            if m.guard is not None:
                memguard.unguard(m.guard)
        m.mm = None

    def shrunk(self) -> str | None:
        """Which mapped region lost pages under us (its file was truncated), if one did."""
        for m in self.maps:
            if m.guard is not None and m.guard.faulted:
                return f"{m.guard.name} (+{m.guard.faults[0]:#x})"
        return None

    def clear(self) -> None:
        """Forget every mapping (the client went away)."""
        for m in list(self.maps):
            self.unmap(m)

    def close(self) -> None:
        self.clear()
        if self.fault_fd >= 0:
            os.close(self.fault_fd)
            self.fault_fd = -1
