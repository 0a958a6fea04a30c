"""The front end's guest RAM, mapped from the fds of SET_MEM_TABLE, as a ``MemoryMap``.

Devices see guest memory only through ``MemoryMap.view`` (bounds-checked GPA ranges), so
the same device code serves the ioreq path and vhost-user. The one vhost-user twist is
that ring addresses arrive as the *front end's* virtual addresses; :meth:`uva_to_gpa`
turns them into guest-physical ones through the same table.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

from ..memory import GuestMemoryError, MemoryMap, RamRegion
from .protocol import MemRegion, ProtocolError


class VhostMemoryMap(MemoryMap):
    """Guest RAM regions mmap'd from the front end's fds, unmapped by :meth:`close`.

    It keeps ``MemoryMap.view`` as is, so queues may use ``spans()`` for their fast
    paths (QEMU sends one region for all of a pc machine's RAM below 4 GiB)."""

    def __init__(self, table: Sequence[MemRegion], fds: Sequence[int]) -> None:
        """Map every region; the fds are closed here whatever happens (mmap keeps its own)."""
        super().__init__()
        self.table = list(table)
        try:
            if len(fds) != len(table):
                raise ProtocolError(f"memory table has {len(table)} regions but {len(fds)} fds")
            for region, fd in zip(table, fds, strict=True):
                self._map(region, fd)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def _map(self, r: MemRegion, fd: int) -> None:
        if r.mmap_offset % mmap.ALLOCATIONGRANULARITY:
            # QEMU's regions are page aligned; mmap needs that, and so do we.
            raise ProtocolError(f"region at {r.guest_addr:#x}: mmap offset "
                                f"{r.mmap_offset:#x} is not page aligned")
        try:
            if os.fstat(fd).st_size < r.mmap_offset + r.size:
                raise ProtocolError(f"region at {r.guest_addr:#x} extends past its file")
            mm = mmap.mmap(fd, r.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=r.mmap_offset)
        except (OSError, OverflowError, ValueError) as e:
            raise ProtocolError(f"cannot map region at {r.guest_addr:#x}: {e}") from None
        try:
            self.add(RamRegion(gpa=r.guest_addr, size=r.size, mm=mm))
        except GuestMemoryError as e:
            mm.close()
            raise ProtocolError(str(e)) from None

    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """The guest address of the front end's user address ``uva`` (whole range inside)."""
        for r in self.table:
            if r.user_addr <= uva and uva + length <= r.user_addr + r.size:
                return r.guest_addr + (uva - r.user_addr)
        raise ProtocolError(f"user address {uva:#x}+{length:#x} is in no memory region")

    def close(self) -> None:
        """Unmap everything we can; a mapping still viewed elsewhere dies with its views."""
        for v in self._views:
            try:
                v.release()
            except BufferError:
                pass
        self._views.clear()
        maps = [r.mm for r in self._regions]
        self._regions.clear()
        self._starts.clear()
        for mm in maps:
            try:
                mm.close()
            except BufferError:
                pass

