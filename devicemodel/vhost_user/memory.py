"""The front end's guest RAM, mapped from the fds of SET_MEM_TABLE, as a ``MemoryMap``.

Devices see guest memory only through ``MemoryMap.view`` (bounds-checked GPA ranges), so
the same device code serves the ioreq path and vhost-user. The one vhost-user twist is
that ring addresses arrive as the *front end's* virtual addresses; :meth:`uva_to_gpa`
turns them into guest-physical ones through the same table.

The files are the front end's: it can truncate one while we have it mapped. Each region
is checked against its file's size when it is mapped and guarded (``memguard``) for as
long as it is: a page that vanishes later reads as zeros instead of killing us with
SIGBUS, and ``fault_fd`` is signalled so the back end can drop the front end.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

from .. import memguard
from ..memory import GuestMemoryError, MemoryMap, RamRegion
from .protocol import MemRegion, ProtocolError


class VhostMemoryMap(MemoryMap):
    """Guest RAM regions mmap'd from the front end's fds, unmapped by :meth:`close`.

    It keeps ``MemoryMap.view`` as is, so queues may use ``spans()`` for their fast
    paths (QEMU sends one region for all of a pc machine's RAM below 4 GiB)."""

    def __init__(self, table: Sequence[MemRegion], fds: Sequence[int],
                 fault_fd: int | None = None) -> None:
        """Map every region; the fds are closed here whatever happens (mmap keeps its own).
        ``fault_fd`` (an eventfd, the caller's) is signalled when a region shrinks under us;
        without one the map makes (and closes) its own."""
        super().__init__()
        self.table = list(table)
        self._own_fault_fd = fault_fd is None
        self.fault_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) \
            if fault_fd is None else fault_fd
        self.guarded: list[memguard.GuardedRegion] = []
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
        self.guarded.append(memguard.guard(mm, f"region at {r.guest_addr:#x}", self.fault_fd))

    def shrunk(self) -> str | None:
        """Which region lost pages under us (its file was truncated), if one did."""
        for g in self.guarded:
            if g.faulted:
                return f"{g.name} (+{g.faults[0]:#x})"
        return None

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
        for mm, g in zip(maps, self.guarded, strict=False):
            try:
                mm.close()
            except BufferError:  # still mapped: stays guarded, but wakes nobody now
                g.notify_fd = -1
            else:  # unmapped: nothing can fault there any more
                memguard.unguard(g)
        self.guarded.clear()
        if self._own_fault_fd and self.fault_fd >= 0:
            os.close(self.fault_fd)
            self.fault_fd = -1

