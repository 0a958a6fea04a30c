"""The client's DMA regions (its guest RAM), as the ``MemoryMap`` our devices read and write.

Devices see memory only through ``MemoryMap.view`` (bounds-checked ranges), so the same
device code serves the ioreq path, vhost-user and vfio-user. A region is accessible only
when the client sent an fd we could map, readable and writable: a region without an fd
(QEMU's ROMs, or any memory it cannot share) and a read-only one are recorded, so that
DMA_UNMAP and the overlap rules work, but a device access there fails exactly like an
access outside guest RAM. We do not fetch such memory through DMA_READ/DMA_WRITE
messages: our devices touch guest memory synchronously through memoryviews, so that
would need a second data path; the first access there is logged, once per region.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from dataclasses import dataclass

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
            self.add(RamRegion(gpa=req.address, size=req.size, mm=region.mm))
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

    def find(self, address: int, size: int) -> DmaRegion | None:
        for m in self.maps:
            if m.address == address and m.size == size:
                return m
        return None

    def unmap(self, address: int, size: int) -> DmaRegion:
        """Remove the mapping that matches exactly (the protocol's rule)."""
        m = self.find(address, size)
        if m is None:
            raise Refused(errno.EINVAL, f"DMA_UNMAP {address:#x}+{size:#x} matches no mapping")
        self.maps.remove(m)
        if m.mm is not None:
            self._drop(m)
        return m

    def _drop(self, m: DmaRegion) -> None:
        i = self._starts.index(m.address)
        view = self._views.pop(i)
        self._regions.pop(i)
        self._starts.pop(i)
        try:
            view.release()
        except BufferError:
            pass  # a slice of it is still alive: the mapping goes with the last one
        try:
            assert m.mm is not None
            m.mm.close()
        except BufferError:
            pass
        m.mm = None

    def clear(self) -> None:
        """Forget every mapping (the client went away)."""
        for m in list(self.maps):
            self.unmap(m.address, m.size)

    def close(self) -> None:
        self.clear()
