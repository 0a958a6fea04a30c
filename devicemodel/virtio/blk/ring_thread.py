"""virtio-blk queues served on a data-plane thread (virtio/dataplane.py) with blocking I/O.

When the transport hands over a queue's kick eventfd (vhost-user; virtio-pci with the
hypervisor's ioeventfds), a thread owns the queue: it takes a batch in ring order and
serves each request right there, so a request costs no hand-off between threads. Linux's
usual request (one indirect table: header, one data buffer, status byte in the RAM at
GPA 0) is popped without a chain object and goes straight to the image; reads that
continue one another become one ``preadv``, copied on two CPUs once it is big (the
page-cache memcpy is a sequential stream's limit, as on the loop); anything else goes
through the general request code with ``DirectIo``, whose coroutines never suspend.
Batches of 16 complete with one interrupt each: with Linux's 32 requests in flight the
driver refills one half while the other is served.
"""

from __future__ import annotations

import os
from typing import Protocol

from ...ratelimit import RateLimitedLog
from ..bulk import Bulk
from ..queue import DescriptorChain, Triple, Virtqueue
from .io import SECTOR, BlockIo, DiskImage, NowaitIo, run_now
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

BATCH = 16  # requests taken (and completed with one interrupt) at a time
_MERGE_IOVECS = 64  # reads merged into one preadv at most (well under IOV_MAX)
_MERGE_BYTES = 4 << 20
#: merged reads this big are copied on two CPUs (io/copier.py), as the loop does: one
#: CPU's memcpy is what limits a sequential stream from the page cache
_PARALLEL_MIN = 512 << 10


class ThreadDevice(Protocol):
    """What a data-plane thread uses of the device (``VirtioBlk``)."""

    glog: RateLimitedLog
    image: DiskImage | None
    direct: BlockIo | None
    nowait: NowaitIo | None

    @property
    def writeback(self) -> bool: ...

    def signal(self, q: Virtqueue) -> None: ...

    async def execute(self, req: Request, io: BlockIo | None) -> tuple[int, int]: ...

    def io_error(self, error: OSError) -> None: ...


def serve_blocking(dev: ThreadDevice, q: Virtqueue) -> bool:
    """A batch of ``q``'s requests in ring order; False when the ring was empty."""
    items = q.pop_batch_triples(BATCH)
    if not items:
        return False
    used: list[tuple[int, int]] = []
    lo = q.low_ram[1]
    plain = _Plain(dev, dev.image, lo, used) if dev.image is not None and lo is not None \
        else None
    try:
        for item in items:
            if type(item) is tuple:
                if plain is not None and plain.add(item):
                    continue
                item = q.chain_of(item)  # noqa: PLW2901
            elif type(item) is Bulk:
                if plain is not None and plain.add_bulk(item):
                    continue
                item = q.chain_of(item)  # noqa: PLW2901
            if plain is not None:
                plain.flush()
            used.append((item.head, _request(dev, q, item)))  # type: ignore[union-attr]
    finally:  # a malformed request fails the device, but the ones before it are done
        if plain is not None:
            plain.flush()
        if used:
            q.add_used_batch(used)
            dev.signal(q)
    return True


class _Plain:
    """A batch's plain reads and writes of the :data:`Triple` shape, served in ring order
    with no chain object. Reads that continue one another are read with one ``preadv``
    (a sequential stream costs one system call per batch); a write first reads what is
    queued, so the image sees them in ring order."""

    __slots__ = ("dev", "image", "lo", "used", "views", "reqs", "start", "end")

    def __init__(self, dev: ThreadDevice, image: DiskImage, lo: memoryview,
                 used: list[tuple[int, int]]) -> None:
        self.dev, self.image, self.lo, self.used = dev, image, lo, used
        self.views: list[memoryview] = []
        self.reqs: list[tuple[int, int, int]] = []  # head, status GPA, length
        self.start = self.end = -1

    def add(self, t: Triple) -> bool:
        """Serve (or queue) a plain read or write; False: the general path must."""
        head, hdr, data, dlen, to_driver, status = t
        lo, image = self.lo, self.image
        rtype, _, sector = HDR.unpack_from(lo, hdr)
        offset = sector * SECTOR
        ss = image.sector_size
        if offset % ss or dlen % ss or offset + dlen > image.size:
            return False
        if rtype == VIRTIO_BLK_T_IN and to_driver:
            if self.views and (offset != self.end or len(self.views) >= _MERGE_IOVECS
                               or offset + dlen - self.start > _MERGE_BYTES):
                self.flush()
            if not self.views:
                self.start = offset
            self.views.append(lo[data : data + dlen])
            self.reqs.append((head, status, dlen))
            self.end = offset + dlen
            return True
        if rtype != VIRTIO_BLK_T_OUT or to_driver or image.ro:
            return False
        self.flush()
        try:
            image.write([lo[data : data + dlen]], offset, not self.dev.writeback)
            lo[status] = VIRTIO_BLK_S_OK
        except OSError as e:
            self.dev.io_error(e)
            lo[status] = VIRTIO_BLK_S_IOERR
        self.used.append((head, 1))
        return True

    def add_bulk(self, b: Bulk) -> bool:
        """Serve a big plain read or write in one system call on its ready iovecs; False:
        the general path must (another request type, out of range, or the call fell
        short: then that path redoes it, and retries or reports)."""
        lo, image = self.lo, self.image
        rtype, _, sector = HDR.unpack_from(lo, b.addrs[0])
        offset, length = sector * SECTOR, b.length
        ss = image.sector_size
        if offset % ss or length % ss or offset + length > image.size:
            return False
        write = rtype == VIRTIO_BLK_T_OUT
        if not (write and not b.to_driver and not image.ro) and not (
                rtype == VIRTIO_BLK_T_IN and b.to_driver):
            return False
        self.flush()
        try:
            if not image.transfer_iov(write, b.iov, b.count, offset, length,
                                      not self.dev.writeback):
                return False
        except OSError as e:  # the fdatasync
            self.dev.io_error(e)
            lo[b.addrs[-1]] = VIRTIO_BLK_S_IOERR
            self.used.append((b.head, 1))
            return True
        lo[b.addrs[-1]] = VIRTIO_BLK_S_OK
        self.used.append((b.head, 1 if write else length + 1))
        return True

    def flush(self) -> None:
        """Read the queued reads and complete them; if the one read fails, each request
        is read on its own, so only the ones that fail report an error."""
        views, reqs = self.views, self.reqs
        if not views:
            return
        self.views, self.reqs = [], []
        lo, used, image = self.lo, self.used, self.image
        start = self.start
        length = self.end - start
        try:
            if length < _PARALLEL_MIN or len(views) < 2:
                if os.preadv(image.fd, views, image.base + start) != length:
                    image.read(views, start)  # short: again, all of it, the careful way
            else:
                nowait = self.dev.nowait
                if (nowait is None or not nowait.can_read
                        or nowait.read_halves(views, start, length) != length):
                    image.read(views, start)  # (again, if the halves fell short)
        except OSError as e:
            if len(reqs) == 1:
                self.dev.io_error(e)
                lo[reqs[0][1]] = VIRTIO_BLK_S_IOERR
                used.append((reqs[0][0], 1))
                return
            offset = self.start
            for view, (head, s_addr, dlen) in zip(views, reqs, strict=True):
                self.views, self.reqs, self.start = [view], [(head, s_addr, dlen)], offset
                self.flush()
                offset += dlen
            return
        for head, s_addr, dlen in reqs:
            lo[s_addr] = VIRTIO_BLK_S_OK
            used.append((head, dlen + 1))


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
