"""The event loop's own I/O on an image: the page cache only, never waiting for the disk.

A thread hand-off costs far more than copying a cached 4 KiB block, so a read the page
cache holds (``RWF_NOWAIT``) is done right on the loop, and so is a writeback-mode write
the file system takes without waiting. Whatever this cannot do (-1 / False) the caller
hands to a thread (engine.py). Big reads use a second CPU: two at once, or one in halves
(copier.py), since a sequential stream is otherwise limited by the loop's memcpy.
"""

from __future__ import annotations

import threading

from .copier import CopyThread
from .image import DiskImage


class NowaitIo:
    """Non-blocking reads and writes of ``image`` for the event loop."""

    def __init__(self, image: DiskImage, name: str) -> None:
        self.image = image
        self.name = name
        self._copier: CopyThread | None = None
        #: the copier serves one caller at a time (the loop, or one of several data-plane
        #: threads); a caller that finds it busy copies alone
        self._copier_free = threading.Lock()

    @property
    def can_read(self) -> bool:
        return self.image.nowait_read

    @property
    def can_write(self) -> bool:
        return self.image.nowait_write and not self.image.ro

    def read(self, views: list[memoryview], offset: int) -> int:
        """Bytes read from the page cache, or -1 (not cached, or not possible here)."""
        return self.image.try_read(views, offset)

    def write(self, views: list[memoryview], offset: int, length: int) -> bool:
        """Whether all ``length`` bytes went into the page cache without waiting."""
        return self.image.try_write(views, offset, length)

    def read_two(self, first: list[memoryview], first_offset: int,
                 second: list[memoryview], second_offset: int) -> tuple[int, int]:
        """Two reads at once, the first on the copier's CPU: bytes of each, or -1."""
        if not self._copier_free.acquire(False):
            return self.image.try_read(first, first_offset), self.image.try_read(
                second, second_offset)
        try:
            copier = self._copy_thread()
            copier.submit(self.image.fd, first, self.image.base + first_offset)
            try:
                got_second = self.image.try_read(second, second_offset)
            finally:  # the thread's read lands before anything else happens
                got_first = copier.wait()
        finally:
            self._copier_free.release()
        return got_first, got_second

    def read_halves(self, views: list[memoryview], offset: int, length: int) -> int:
        """One read of two or more buffers in two halves (split at a buffer boundary),
        one on each CPU: ``length``, or -1 if either half fell short."""
        half = length // 2
        k, first = 1, len(views[0])
        while k < len(views) - 1 and first + len(views[k]) <= half:
            first += len(views[k])
            k += 1
        got_first, got_second = self.read_two(views[:k], offset, views[k:], offset + first)
        return length if got_first == first and got_second == length - first else -1

    def close(self) -> None:
        if self._copier is not None:
            self._copier.close()
            self._copier = None

    def _copy_thread(self) -> CopyThread:
        if self._copier is None:
            self._copier = CopyThread(f"{self.name}-copy")
        return self._copier
