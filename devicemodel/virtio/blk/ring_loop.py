"""virtio-blk queues served from the event loop.

A request the page cache can serve at once (``RWF_NOWAIT``, io/nowait.py) is done on the
loop; every other one runs on the device's bounded thread pool, many in flight (one trio
task each), since a thread hand-off costs far more than a cached 4 KiB copy. The worker
takes the ring in batches: a plain read (header, one data buffer, status byte) skips the
general parser, reads that continue one another share one ``preadv`` (big ones are copied
on two CPUs: the loop's memcpy is a sequential stream's limit), a batch's writes go to
the device's I/O thread in one hand-off, and a batch ends with one used-index store and
at most one interrupt.
"""

from __future__ import annotations

from typing import Protocol

import trio

from ...ratelimit import RateLimitedLog
from ..queue import DescriptorChain, Virtqueue
from .io import IOV_MAX, SECTOR, BlockIo, DiskImage, NowaitIo, Write
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

INLINE_MAX = 2 << 20  # largest read tried on the event loop (a memcpy from page cache)
INLINE_BATCH = 32  # requests popped and completed between interrupts/yields
COALESCE_MAX = 2 << 20  # sequential inline reads merged into one preadv up to this size
PARALLEL_MIN = 512 << 10  # reads this big are copied on two CPUs (io/copier.py)

# Reads that continue one another, read with one preadv: every buffer, then per request
# (head, status byte GPA, length, its buffers), and the disk range [start, end).
_ReadGroup = tuple[list[memoryview], list[tuple[int, int, int, list[memoryview]]], int, int]


class LoopDevice(Protocol):
    """What the loop's worker uses of the device (``VirtioBlk``)."""

    name: str
    glog: RateLimitedLog
    image: DiskImage | None
    nowait: NowaitIo | None
    ordered: BlockIo | None

    @property
    def writeback(self) -> bool: ...

    def signal(self, q: Virtqueue) -> None: ...

    async def wait_kick(self, q: Virtqueue) -> None: ...

    async def execute(self, req: Request, io: BlockIo | None) -> tuple[int, int]: ...

    def io_error(self, error: OSError) -> None: ...


class LoopServer:
    """One device's loop workers (one per queue, each in ``serve``)."""

    def __init__(self, dev: LoopDevice) -> None:
        self.dev = dev

    async def serve(self, q: Virtqueue, nursery: trio.Nursery) -> None:
        # A trio scheduling pass costs about as much as serving a cached 4 KiB read, so the
        # worker yields only when it sleeps for a kick, or between two batches in a row.
        dev = self.dev
        busy = False
        while True:
            chains = q.pop_batch(INLINE_BATCH)
            if not chains:
                busy = False
                await dev.wait_kick(q)
                continue
            if busy:
                await trio.lowlevel.checkpoint()
            busy = True
            used: list[tuple[int, int]] = []
            try:
                self._run_batch(q, chains, used, nursery)
            finally:  # a malformed request fails the device, but the ones before it are done
                if used:  # requests handed to the pool signal when they finish
                    q.add_used_batch(used)
                    dev.signal(q)

    def _run_batch(self, q: Virtqueue, chains: list[DescriptorChain],
                   used: list[tuple[int, int]], nursery: trio.Nursery) -> None:
        """Serve popped chains in order; completions inline go to ``used``.

        A read or write whose header, data and status byte are separate buffers in the RAM
        at GPA 0 (what Linux sends) skips the general parsing: its data buffers become one
        iovec per guest-physically contiguous run. Reads that continue one another are
        merged into one non-blocking ``preadv`` from the page cache (one system call for a
        sequential stream); the batch's writes go to the I/O thread in one hand-off.
        """
        lo = q.low_ram[1]
        image = self.dev.image
        fast = image is not None and lo is not None
        nowait_read = fast and image.nowait_read  # type: ignore[union-attr]
        writable = fast and not image.ro  # type: ignore[union-attr]
        size = image.size if image is not None else 0
        sectsz = image.sector_size if image is not None else SECTOR
        unpack_hdr = HDR.unpack_from
        # the reads being merged: their buffers, (head, status GPA, length, buffers), range
        g_views: list[memoryview] = []
        g_reqs: list[tuple[int, int, int, list[memoryview]]] = []
        g_start = g_end = -1
        writes: list[Write] = []
        statuses: list[tuple[int, memoryview]] = []  # each write's head and status byte
        groups: list[_ReadGroup] = []  # read at the end, two at once where they are big
        try:
            for chain in chains:
                lens = chain.lens
                if fast and chain.low and len(lens) >= 3 and lens[0] == 16 and lens[-1] == 1:
                    addrs = chain.addrs
                    rtype, _, sector = unpack_hdr(lo, addrs[0])  # type: ignore[arg-type]
                    offset = sector * SECTOR
                    nd = len(lens)
                    if rtype == VIRTIO_BLK_T_IN and chain.nreadable == 1 and nowait_read:
                        length = chain.writable_len - 1
                        if (length <= INLINE_MAX and not offset % sectsz
                                and not length % sectsz and offset + length <= size):
                            if nd == 3:
                                d_addr = addrs[1]
                                views = [lo[d_addr : d_addr + length]]  # type: ignore[index]
                            else:
                                views = iovecs(lo, addrs, lens, nd - 1)  # type: ignore[arg-type]
                            if (offset == g_end and g_end - g_start + length <= COALESCE_MAX
                                    and len(g_views) + len(views) <= IOV_MAX):
                                g_views += views
                                g_reqs.append((chain.head, addrs[-1], length, views))
                                g_end += length
                                continue
                            if g_views:
                                groups.append((g_views, g_reqs, g_start, g_end))
                            g_views = list(views)
                            g_reqs = [(chain.head, addrs[-1], length, views)]
                            g_start, g_end = offset, offset + length
                            continue
                    elif (rtype == VIRTIO_BLK_T_OUT and chain.nreadable == nd - 1 and writable
                            and len(lens) - 2 <= IOV_MAX):
                        length = chain.readable_len - 16
                        if not offset % sectsz and not length % sectsz and offset + length <= size:
                            s_addr = addrs[-1]
                            views = iovecs(lo, addrs, lens, nd - 1)  # type: ignore[arg-type]
                            if self._write_inline(views, offset, length):
                                lo[s_addr] = VIRTIO_BLK_S_OK  # type: ignore[index]
                                used.append((chain.head, 1))
                            else:
                                writes.append((offset, length, views))
                                statuses.append((chain.head,
                                                 lo[s_addr : s_addr + 1]))  # type: ignore[index]
                            continue
                if g_views:
                    groups.append((g_views, g_reqs, g_start, g_end))
                    g_views, g_reqs = [], []
                    g_start = g_end = -1
                req = parse(chain)
                if self._try_inline(req):
                    used.append((req.head, (req.length if req.rtype == VIRTIO_BLK_T_IN else 0) + 1))
                else:
                    nursery.start_soon(self._request, q, req)
        finally:  # the reads and writes before a malformed request are still done
            if g_views:
                groups.append((g_views, g_reqs, g_start, g_end))
            if groups:
                self._read_groups(q, groups, used, nursery)
            if writes:
                nursery.start_soon(self._write_batch, q, writes, statuses)

    def _write_inline(self, views: list[memoryview], offset: int, length: int) -> bool:
        """A writeback-mode write straight into the page cache, if the file system can do
        that without waiting; False: the caller hands it to a thread."""
        nowait = self.dev.nowait
        return (nowait is not None and nowait.can_write and length <= INLINE_MAX
                and self.dev.writeback and nowait.write(views, offset, length))

    def _read_groups(self, q: Virtqueue, groups: list[_ReadGroup], used: list[tuple[int, int]],
                     nursery: trio.Nursery) -> None:
        """Each group's read; big ones on two CPUs (two groups at once, or one in two
        halves), since the loop's memcpy is what limits a sequential stream."""
        nowait = self.dev.nowait
        assert nowait is not None
        i = 0
        while i < len(groups):
            a = groups[i]
            big = a[3] - a[2] >= PARALLEL_MIN
            b = groups[i + 1] if i + 1 < len(groups) else None
            if big and b is not None and b[3] - b[2] >= PARALLEL_MIN:
                got_a, got_b = nowait.read_two(a[0], a[2], b[0], b[2])
                self._finish_group(q, b, got_b, used, nursery)
                self._finish_group(q, a, got_a, used, nursery)
                i += 2
                continue
            if big and len(a[0]) > 1:
                got = nowait.read_halves(a[0], a[2], a[3] - a[2])
            else:
                got = nowait.read(a[0], a[2])
            self._finish_group(q, a, got, used, nursery)
            i += 1

    def _finish_group(self, q: Virtqueue, group: _ReadGroup, n: int,
                      used: list[tuple[int, int]], nursery: trio.Nursery) -> None:
        """Complete a group ``n`` bytes of whose read are in guest RAM (-1: failed);
        whatever the page cache could not serve is retried request by request (inline,
        then threads)."""
        _, reqs, start, end = group
        lo = q.low_ram[1]
        if n == end - start and lo is not None:
            append = used.append
            for head, s_addr, length, _ in reqs:
                lo[s_addr] = VIRTIO_BLK_S_OK
                append((head, length + 1))
            return
        offset = start
        for head, s_addr, length, req_views in reqs:
            req = Request(head, VIRTIO_BLK_T_IN, offset // SECTOR, [], req_views,
                          q.map_buffer(s_addr, 1), length)
            offset += length
            if len(reqs) > 1 and self._try_inline(req):
                used.append((head, length + 1))
            else:
                nursery.start_soon(self._request, q, req)

    async def _write_batch(self, q: Virtqueue, writes: list[Write],
                           statuses: list[tuple[int, memoryview]]) -> None:
        """A batch's writes in one hand-off to the I/O thread, completed together once on
        the image (and, writethrough, synced)."""
        dev = self.dev
        assert dev.ordered is not None
        done, error = await dev.ordered.write_batch(writes, not dev.writeback)
        if error is not None:
            dev.io_error(error)
        used = []
        for (head, status_view), ok in zip(statuses, done, strict=True):
            status_view[0] = VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR
            used.append((head, 1))
        q.add_used_batch(used)
        dev.signal(q)

    def _try_inline(self, req: Request) -> bool:
        """Serve a request from the page cache on the event loop, skipping the thread hop.

        ``RWF_NOWAIT`` makes the kernel refuse (EAGAIN) instead of waiting for the disk,
        so the loop never blocks; whatever it cannot finish goes to the thread pool,
        which simply redoes the whole request. Writes qualify only in writeback mode
        (writethrough must fdatasync, which always waits).
        """
        dev = self.dev
        image, nowait = dev.image, dev.nowait
        if image is None or nowait is None:
            return False
        rtype = req.rtype
        if rtype == VIRTIO_BLK_T_IN and nowait.can_read:
            views = req.in_views
        elif rtype == VIRTIO_BLK_T_OUT and nowait.can_write and dev.writeback:
            views = req.out_views
        else:
            return False
        length = sum(len(v) for v in views)
        offset = req.sector * SECTOR
        if length > INLINE_MAX or len(views) > IOV_MAX or not image.in_range(offset, length):
            return False
        if rtype == VIRTIO_BLK_T_IN:
            if nowait.read(views, offset) != length:
                return False
        elif not nowait.write(views, offset, length):
            return False
        req.status_view[0] = VIRTIO_BLK_S_OK
        return True

    async def _request(self, q: Virtqueue, req: Request) -> None:
        status, written = await self.dev.execute(req, None)
        req.status_view[0] = status
        q.add_used(req.head, written + 1)
        self.dev.signal(q)
