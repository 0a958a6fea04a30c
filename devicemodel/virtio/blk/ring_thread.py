"""virtio-blk queues served on a data-plane thread (virtio/dataplane.py) with blocking I/O.

When the transport hands over a queue's kick eventfd (vhost-user), a thread owns the
queue: it takes a batch in ring order and serves each request right there, so a request
costs no hand-off between threads. A plain read or write (header, data, status byte in
the RAM at GPA 0) goes straight to the image; anything else through the general request
code with ``DirectIo``, whose coroutines never suspend. No copy thread here: measured
through QEMU, a second copier only took CPU from the guest's vCPU thread (0.85 of
qemu-storage-daemon with it, 0.86 without).
"""

from __future__ import annotations

from typing import Protocol

from ...ratelimit import RateLimitedLog
from ..queue import DescriptorChain, Virtqueue
from .io import SECTOR, BlockIo, DiskImage, run_now
from .request import (
    HDR,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Request,
    iovecs,
    parse,
)

BATCH = 32  # requests taken (and completed with one interrupt) at a time


class ThreadDevice(Protocol):
    """What a data-plane thread uses of the device (``VirtioBlk``)."""

    glog: RateLimitedLog
    image: DiskImage | None
    direct: BlockIo | None

    @property
    def writeback(self) -> bool: ...

    def signal(self, q: Virtqueue) -> None: ...

    async def execute(self, req: Request, io: BlockIo | None) -> tuple[int, int]: ...

    def io_error(self, error: OSError) -> None: ...


def serve_blocking(dev: ThreadDevice, q: Virtqueue) -> bool:
    """A batch of ``q``'s requests in ring order; False when the ring was empty."""
    chains = q.pop_batch(BATCH)
    if not chains:
        return False
    used: list[tuple[int, int]] = []
    try:
        for chain in chains:
            used.append((chain.head, _request(dev, q, chain)))
    finally:  # a malformed request fails the device, but the ones before it are done
        if used:
            q.add_used_batch(used)
            dev.signal(q)
    return True


def _request(dev: ThreadDevice, q: Virtqueue, chain: DescriptorChain) -> int:
    """Serve one request; the bytes written to the driver (status byte included)."""
    lens = chain.lens
    lo = q.low_ram[1]
    image = dev.image
    if (image is not None and lo is not None and chain.low and len(lens) >= 3
            and lens[0] == 16 and lens[-1] == 1):  # header, data, status: no general parsing
        addrs = chain.addrs
        rtype, _, sector = HDR.unpack_from(lo, addrs[0])
        nd = len(lens)
        if rtype == VIRTIO_BLK_T_IN and chain.nreadable == 1:
            length = chain.writable_len - 1
        elif rtype == VIRTIO_BLK_T_OUT and chain.nreadable == nd - 1 and not image.ro:
            length = chain.readable_len - 16
        else:
            length = -1
        if length >= 0 and image.in_range(sector * SECTOR, length):
            views = iovecs(lo, addrs, lens, nd - 1)
            try:
                if rtype == VIRTIO_BLK_T_IN:
                    image.read(views, sector * SECTOR)
                else:
                    image.write(views, sector * SECTOR, not dev.writeback)
            except OSError as e:
                dev.io_error(e)
                lo[addrs[-1]] = VIRTIO_BLK_S_IOERR
                return 1
            lo[addrs[-1]] = VIRTIO_BLK_S_OK
            return (length if rtype == VIRTIO_BLK_T_IN else 0) + 1
    req = parse(chain)
    status, written = run_now(dev.execute(req, dev.direct))
    req.status_view[0] = status
    return written + 1
