"""A virtio-blk queue's data-plane loop with the lone request inlined.

A driver with one request in flight at a time (a random-read workload, fio at iodepth 1,
a database's synchronous reads) wakes the data-plane thread for every request. What the
thread then costs is Python run cold after a sleep: the general path (``Dataplane``'s
loop → ``serve_blocking`` → pop → serve → used ring → the interrupt chain) is some twenty
calls, and measured in ``bench/vhost_blk.py`` it took about twice the CPU per 4 KiB read
of the same loop written as one function. So the common case is one function here:
when exactly one request is available and it is Linux's plain read or write (one ring
descriptor → a 3-entry indirect table in the RAM at GPA 0, checked as
``Virtqueue.pop_batch_triples`` checks it), it is served, completed and signalled in
this frame, and the thread sleeps again. Anything else (several requests, another shape
or type, a read that fell short) goes to ``serve_blocking`` untouched: that path takes
it from the ring as before, and reports what is malformed.

Ring protocol as in ``queue.py`` (EVENT_IDX only; without it the general loop runs):
the used element, then used.idx (one store), a barrier, then avail.idx and used_event.
If another request came meanwhile (several threads in the guest), it is served before
the interrupt, so one interrupt covers both, up to ``BATCH`` requests, as a batch does,
and kicks stay off while the thread is busy: in a guest, interrupts and kicks cost more
than our request does. Else the driver gets its interrupt if its used_event asks for
one, and before sleeping the thread asks for kicks again (avail_event =
last_avail_idx, a barrier, a last look at avail.idx).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..dataplane import Dataplane
from ..hot_ring import DESC, TABLE3, USED_ELEM
from ..queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtqueueError,
    barrier_lock,
)
from .io import SECTOR
from .request import HDR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from .ring_thread import BATCH, ThreadDevice, serve_blocking, write_plain

_READ = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE  # a read's data buffer: device-writable


def run_lane(dp: Dataplane, dev: ThreadDevice, signal: Callable[[], None]) -> bool:
    """Serve ``dp.q`` until ``dp.stopping``; False at once (nothing done) if the queue
    is not one this loop serves (no EVENT_IDX or INDIRECT_DESC, no image, no RAM at 0).
    ``signal`` interrupts the driver for the queue (the caller decided it must)."""
    q = dp.q
    ring = q.hot_ring()
    image = dev.image
    if ring is None or image is None or not (q.event_idx and q.indirect):
        return False
    avail16, desc, lo, lo_end, used, used16, used_event, avail_event = ring
    size, mask = q.size, q.size - 1
    fd, base, disk_size, ss, ro = image.fd, image.base, image.size, image.sector_size, image.ro
    unpack_desc, unpack_table, unpack_hdr = DESC.unpack_from, TABLE3.unpack_from, HDR.unpack_from
    pack_elem = USED_ELEM.pack_into
    acquire, release = barrier_lock.acquire, barrier_lock.release
    preadv = os.preadv
    poll, idle_s = dp.poll, dp.idle_s
    assert poll is not None
    while not dp.stopping:
        last = q.last_avail_idx
        if (avail16[1] - last) & 0xFFFF == 1:  # one request: Linux's plain shape?
            head = avail16[2 + (last & mask)]
            written = -1
            if head < size:
                addr, length, flags, _ = unpack_desc(desc, head << 4)
                if flags == VIRTQ_DESC_F_INDIRECT and length == 48 and addr + 48 <= lo_end:
                    a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _ = unpack_table(lo, addr)
                    if (l0 == 16 and f0 == VIRTQ_DESC_F_NEXT and n0 == 1 and n1 == 2
                            and l2 == 1 and f2 == VIRTQ_DESC_F_WRITE
                            and a0 + 16 <= lo_end and a1 + l1 <= lo_end and a2 < lo_end):
                        rtype, _, sector = unpack_hdr(lo, a0)
                        offset = sector * SECTOR
                        if offset % ss or l1 % ss or offset + l1 > disk_size:
                            pass  # the general path reports it
                        elif rtype == VIRTIO_BLK_T_IN and f1 == _READ:
                            try:
                                n = preadv(fd, [lo[a1 : a1 + l1]], base + offset)
                            except OSError:
                                n = -1
                            if n == l1:  # (short or failed: again, the careful way)
                                lo[a2] = VIRTIO_BLK_S_OK
                                written = l1 + 1  # < 2**32: l1 is a sector multiple
                        elif rtype == VIRTIO_BLK_T_OUT and f1 == VIRTQ_DESC_F_NEXT and not ro:
                            written = write_plain(dev, image, lo[a1 : a1 + l1], offset, a2, lo)
            if written >= 0:
                q.last_avail_idx = last = (last + 1) & 0xFFFF
                u = q.used_idx
                pack_elem(used, 4 + 8 * (u & mask), head, written)
                q.used_idx = u = (u + 1) & 0xFFFF
                used16[1] = u
                acquire()
                release()
                old = q.signalled_used
                if avail16[1] != last and (u - old) & 0xFFFF < BATCH:
                    continue  # another came meanwhile: one interrupt will cover both
                q.signalled_used = u
                if ((u - avail16[used_event] - 1) & 0xFFFF) < ((u - old) & 0xFFFF):
                    signal()
                used16[avail_event] = last  # kicks wanted again, then a last look
                acquire()
                release()
                if avail16[1] == last and not poll(idle_s):
                    dp.look_again(q)
                continue
        try:  # (its interrupt covers what this loop left unsignalled)
            serve_blocking(dev, q)
        except VirtqueueError:  # the device fails; what was done before is told of
            if q.needs_notification():
                signal()
            raise
        if q.enable_notification():
            continue
        if q.signalled_used != q.used_idx and q.needs_notification():
            signal()  # owed (the driver took back what it had made available)
        if not poll(idle_s):
            dp.look_again(q)
    return True
