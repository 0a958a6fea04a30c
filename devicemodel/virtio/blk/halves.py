"""A big read from the image copied on two CPUs by a data-plane thread and its helper.

A sequential 1 MiB read from the page cache is one memcpy of a MiB, ~70–180 µs of one CPU
here, and the guest waits for all of it; while it waits its vCPU is idle, so the copy can
use both host CPUs, as qemu-storage-daemon's worker threads do with the two or three
requests Linux makes of such a read. The request's iovec array (virtio/bulk.py) is split
at the entry nearest its middle: the helper (virtio/dataplane.py) reads the second half
while this thread reads the first, and the request completes only once both are in.
Writes stay one call: the image's inode lock serialises two buffered writes anyway.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from ..bulk import Bulk
from ..dataplane import helper
from .io import DiskImage
from .io.image import transfer_iov

#: reads at least this big are split (below it the hand-off costs more than half a copy)
SPLIT_MIN = 256 << 10


def read_bulk(image: DiskImage, b: Bulk, offset: int) -> bool:
    """Read ``b`` (``b.length`` bytes at ``offset``) into its buffers; False if it fell
    short or failed (the caller redoes it the general way, which retries and reports)."""
    h = helper() if b.length >= SPLIT_MIN and b.count >= 2 else None
    if h is None:
        return image.transfer_iov(False, b.iov, b.count, offset, b.length)
    ends = list(accumulate(b.lens[1:-1]))  # where each data buffer ends
    k = min(bisect_right(ends, b.length >> 1), b.count - 1)  # buffers in the first half
    if k == 0:  # one buffer holds most of it: nothing to share
        return image.transfer_iov(False, b.iov, b.count, offset, b.length)
    first = ends[k - 1]
    at = image.base + offset
    h.start(transfer_iov, False, image.fd, b.iov[16 * k:], b.count - k, at + first)
    try:
        got_first = transfer_iov(False, image.fd, b.iov[: 16 * k], k, at)
    finally:  # the helper's half lands before anything else happens
        got_second = h.finish()
    return got_first == first and got_second == b.length - first
