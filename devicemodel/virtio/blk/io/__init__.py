"""Block I/O on a disk image, for any device that moves sectors (virtio-blk; AHCI next).

Nothing here knows virtio: a device parses its own requests and submits reads, writes,
flushes, discards and write-zeroes on guest-memory views.

- ``image.py``: ``DiskImage``, the open file or block device (size, ``range=`` window,
  read-only fallback, the system calls, flush/discard/write-zeroes with the file
  system's fallbacks).
- ``engine.py``: the ``BlockIo`` interface and where the blocking work runs
  (``ThreadIo``: a runner the device gives, its thread pool or its ordered I/O thread;
  ``DirectIo``: the calling data-plane thread).
- ``nowait.py``: the event loop's non-blocking fast path (``RWF_NOWAIT``), with
  ``copier.py``'s second CPU for big reads.
"""

from __future__ import annotations

from .engine import BlockIo, DirectIo, Runner, ThreadIo, run_now
from .image import IOV_MAX, SECTOR, DiskImage, Write
from .nowait import NowaitIo

__all__ = ["IOV_MAX", "SECTOR", "BlockIo", "DirectIo", "DiskImage", "NowaitIo", "Runner",
           "ThreadIo", "Write", "run_now"]
