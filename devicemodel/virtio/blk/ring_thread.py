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
driver refills one half while the other is served; a big read is completed on its own as
soon as it is served.
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
#: a read this big is completed (used entry, interrupt) as soon as it is served, not
#: with its batch: its copy costs far more than the interrupt, and the driver's work on
#: it then overlaps the copy of the next one. (Writes: no clear gain in bench/vhost_blk.py,
#: and about 10 % more CPU per MiB for the extra interrupts.)
_EARLY_BYTES = 256 << 10


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
    used: list[int] = []  # head, bytes written, head, bytes written, …
    lo = q.low_ram[1]
    try:
        if dev.image is not None and lo is not None:
            _serve_plain(dev, q, dev.image, lo, items, used)
        else:
            for item in items:
                chain = item if type(item) is DescriptorChain else q.chain_of(item)  # type: ignore[arg-type]
                used += (chain.head, _request(dev, q, chain))  # type: ignore[union-attr]
    finally:  # a malformed request fails the device, but the ones before it are done
        if used:
            q.add_used_flat(used)
            dev.signal(q)
    return True


def _serve_plain(dev: ThreadDevice, q: Virtqueue, image: DiskImage, lo: memoryview,
                 items: list[DescriptorChain | Triple | Bulk], used: list[int]) -> None:
    """Serve ``items`` in ring order, the plain reads and writes of the :data:`Triple`
    shape with no chain object. Reads that continue one another are queued and read with
    one ``preadv`` (a sequential stream costs one system call per batch); anything else
    first reads what is queued, so the image sees every request in ring order.

    This is a cached 4 KiB read's whole Python cost, so it is one loop on local names.
    The first queued read is ``pv`` (its buffer; None: nothing queued), ``ph``, ``ps``,
    ``pw`` (head, status GPA, bytes written); once another continues it, all queued reads
    are in ``views`` and ``pend`` (head, status GPA, bytes written each); [start, end)
    is the queued disk range. A lone read (a random one) costs no list but its iovec."""
    unpack_hdr = HDR.unpack_from
    disk_size, ss = image.size, image.sector_size
    pv: memoryview | None = None
    ph = ps = pw = 0
    views: list[memoryview] | None = None
    pend: list[int] = []
    start = end = -1
    try:
        for item in items:
            if type(item) is tuple:
                head, hdr, data, dlen, to_driver, status = item
                rtype, _, sector = unpack_hdr(lo, hdr)
                offset = sector * SECTOR
                if offset % ss or dlen % ss or offset + dlen > disk_size:
                    pass  # the general path reports it
                elif rtype == VIRTIO_BLK_T_IN and to_driver:
                    if offset == end:  # continues the queued reads
                        if views is None:
                            views, pend = [pv], [ph, ps, pw]  # type: ignore[list-item]
                        if len(views) < _MERGE_IOVECS and end + dlen - start <= _MERGE_BYTES:
                            views.append(lo[data : data + dlen])
                            pend += (head, status, dlen + 1)
                            end += dlen
                            continue
                    if views is not None:  # read the queue, then this one starts it again
                        _read_queued(dev, image, lo, views, pend, start, used)
                        views = None
                    elif pv is not None:
                        _read_one(dev, image, lo, pv, ph, ps, pw, start, used)
                    pv, ph, ps, pw = lo[data : data + dlen], head, status, dlen + 1
                    start, end = offset, offset + dlen
                    continue
                elif rtype == VIRTIO_BLK_T_OUT and not to_driver and not image.ro:
                    if pv is not None:
                        _read_queued(dev, image, lo, views or [pv], pend if views else
                                     [ph, ps, pw], start, used)
                        pv = views = None
                        end = -1
                    used += (head, write_plain(dev, image, lo[data : data + dlen], offset,
                                               status, lo))
                    continue
                item = q.chain_of(item)  # noqa: PLW2901
            elif type(item) is Bulk:
                if pv is not None:
                    _read_queued(dev, image, lo, views or [pv], pend if views else [ph, ps, pw],
                                 start, used)
                    pv = views = None
                    end = -1
                if _bulk(dev, image, lo, item, used):
                    if item.to_driver and item.length >= _EARLY_BYTES:
                        q.add_used_flat(used)
                        dev.signal(q)
                        used.clear()
                    continue
                item = q.chain_of(item)  # noqa: PLW2901
            if pv is not None:
                _read_queued(dev, image, lo, views or [pv], pend if views else [ph, ps, pw],
                             start, used)
                pv = views = None
                end = -1
            used += (item.head, _request(dev, q, item))  # type: ignore[union-attr]
    finally:
        if views is not None:
            _read_queued(dev, image, lo, views, pend, start, used)
        elif pv is not None:
            _read_one(dev, image, lo, pv, ph, ps, pw, start, used)


def _read_one(dev: ThreadDevice, image: DiskImage, lo: memoryview, view: memoryview,
              head: int, status: int, written: int, start: int, used: list[int]) -> None:
    """A lone queued read (a random one), with no lists of its own."""
    try:
        n = os.preadv(image.fd, [view], image.base + start)
    except OSError:
        n = -1
    if n == len(view):
        lo[status] = VIRTIO_BLK_S_OK
        used += (head, written)
    else:  # again, the careful way
        _read_queued(dev, image, lo, [view], [head, status, written], start, used)


def _read_queued(dev: ThreadDevice, image: DiskImage, lo: memoryview,
                 views: list[memoryview], pend: list[int], start: int,
                 used: list[int]) -> None:
    """Read queued reads and complete them (a big run copied on two CPUs); if the one
    read fails, each request is read on its own, so only the ones that fail report an
    error."""
    length = sum(pend[2::3]) - len(views)
    try:
        if length < _PARALLEL_MIN or len(views) < 2:
            if os.preadv(image.fd, views, image.base + start) != length:
                image.read(views, start)  # short: again, all of it, the careful way
        else:
            nowait = dev.nowait
            if (nowait is None or not nowait.can_read
                    or nowait.read_halves(views, start, length) != length):
                image.read(views, start)  # (again, if the halves fell short)
    except OSError as e:
        if len(views) == 1:
            dev.io_error(e)
            lo[pend[1]] = VIRTIO_BLK_S_IOERR
            used += (pend[0], 1)
            return
        offset = start
        for i, view in enumerate(views):
            _read_queued(dev, image, lo, [view], pend[3 * i : 3 * i + 3], offset, used)
            offset += len(view)
        return
    for i in range(0, len(pend), 3):
        lo[pend[i + 1]] = VIRTIO_BLK_S_OK
        used += (pend[i], pend[i + 2])


def write_plain(dev: ThreadDevice, image: DiskImage, view: memoryview, offset: int, status: int,
           lo: memoryview) -> int:
    """A plain write; the bytes written to the driver (the status byte)."""
    try:
        image.write([view], offset, not dev.writeback)
        lo[status] = VIRTIO_BLK_S_OK
    except OSError as e:
        dev.io_error(e)
        lo[status] = VIRTIO_BLK_S_IOERR
    return 1


def _bulk(dev: ThreadDevice, image: DiskImage, lo: memoryview, b: Bulk,
          used: list[int]) -> bool:
    """Serve a big plain read or write in one system call on its ready iovecs; False:
    the general path must (another request type, out of range, or the call fell short:
    then that path redoes it, and retries or reports)."""
    rtype, _, sector = HDR.unpack_from(lo, b.hdr)
    offset, length = sector * SECTOR, b.length
    ss = image.sector_size
    if offset % ss or length % ss or offset + length > image.size:
        return False
    write = rtype == VIRTIO_BLK_T_OUT
    if not (write and not b.to_driver and not image.ro) and not (
            rtype == VIRTIO_BLK_T_IN and b.to_driver):
        return False
    try:
        if not image.transfer_iov(write, b.iov, b.count, offset, length,
                                  not dev.writeback):
            return False
    except OSError as e:  # the fdatasync
        dev.io_error(e)
        lo[b.status] = VIRTIO_BLK_S_IOERR
        used += (b.head, 1)
        return True
    lo[b.status] = VIRTIO_BLK_S_OK
    used += (b.head, 1 if write else length + 1)
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
