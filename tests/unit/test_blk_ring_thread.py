"""virtio-blk's data-plane batch (blk/ring_thread.py) against a model of the disk.

The thread serves Linux's plain requests (one indirect table: header, data, status) with
no chain object: a lone read is read and completed on the spot, reads that continue one
another share one ``preadv``, a write first reads what is queued. Whatever the mix, the
guest must see what a one-request-at-a-time device would give: every read's buffer holds
the disk as it was after the writes before it in ring order, the status says whether the
host could serve it (a host I/O error or the file's end fails that request alone), and
the used ring lists the heads in ring order with the bytes written.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.memory import GuestMemory, MiB
from devicemodel.virtio.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlk,
    parse_blk_options,
    ring_thread,
)
from devicemodel.virtio.queue import Virtqueue

DISK = 1 * MiB
SIZE = 64  # ring entries
DESC, AVAIL, USED = 0x1_0000, 0x1_1000, 0x1_2000
TABLES, HDRS, DATA = 0x2_0000, 0x3_0000, 0x10_0000
FLUSH = 4
_D = struct.Struct("<QIHH")
_HDR = struct.Struct("<IIQ")

#: one request: (type, sector, length in sectors, reads of its first sector fail with EIO)
_request = st.tuples(
    st.sampled_from([VIRTIO_BLK_T_IN] * 6 + [VIRTIO_BLK_T_OUT, FLUSH]),
    st.integers(0, DISK // 512 + 8), st.sampled_from([1, 8, 8, 16]), st.booleans())


@pytest.fixture(scope="module")
def ram():  # noqa: ANN201
    mem = GuestMemory(128 * MiB, name="blk-ring-thread")
    yield mem
    mem.close()


def _serve(mem: GuestMemory, path: str, reqs: list[tuple[int, int, int, bool]],
           batches: int, file_size: int, start: int = 0
           ) -> tuple[list[tuple[int, int]], list[int], bytes]:
    """Lay ``reqs`` out as Linux does from ring index ``start``, serve them with
    ``batches`` calls of the data-plane batch (injecting EIO where asked, the file cut to
    ``file_size`` first): the used entries, the statuses and the file afterwards."""
    dev = VirtioBlk(parse_blk_options(path))
    os.truncate(path, file_size)  # the host shrank the file under the device
    lo = mem.view(0, 64 * MiB)
    lo[DESC : DATA + len(reqs) * 8192] = bytes(DATA + len(reqs) * 8192 - DESC)
    for i, (rtype, sector, n, _) in enumerate(reqs):
        table, hdr, data = TABLES + 48 * i, HDRS + 32 * i, DATA + 8192 * i
        _D.pack_into(lo, DESC + 16 * i, table, 48, 4, 0)
        _D.pack_into(lo, table, hdr, 16, 1, 1)
        if rtype == FLUSH:  # header and status only: the general path
            _D.pack_into(lo, table, hdr, 16, 1, 2)
            _D.pack_into(lo, table + 16, 0, 0, 0, 0)
        else:
            _D.pack_into(lo, table + 16, data, 512 * n, 3 if rtype == VIRTIO_BLK_T_IN else 1,
                         2)
            if rtype == VIRTIO_BLK_T_OUT:
                lo[data : data + 512 * n] = bytes([i + 1]) * (512 * n)
        _D.pack_into(lo, table + 32, hdr + 16, 1, 2, 0)
        _HDR.pack_into(lo, hdr, rtype, 0, sector)
        lo[hdr + 16] = 0xEE
        struct.pack_into("<H", lo, AVAIL + 4 + 2 * ((start + i) % SIZE), i)
    struct.pack_into("<H", lo, AVAIL + 2, (start + len(reqs)) & 0xFFFF)
    q = Virtqueue(mem, 0, SIZE)
    q.last_avail_idx = q.used_idx = start
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    q.start(event_idx=True, indirect=True)
    failing = {sector * 512 for _, sector, _, eio in reqs if eio}
    real = os.preadv

    def preadv(fd: int, views: list, offset: int, *flags: int) -> int:
        end = offset + sum(map(len, views))
        if any(offset <= f < end for f in failing):
            raise OSError(errno.EIO, "injected")
        return real(fd, views, offset, *flags)

    ring_thread.os.preadv = preadv  # type: ignore[attr-defined]
    try:
        for _ in range(batches):
            dev.serve_blocking(q)
    finally:
        ring_thread.os.preadv = real  # type: ignore[attr-defined]
        q.stop()
        dev.close()
    used = [struct.unpack_from("<II", lo, USED + 4 + 8 * ((start + k) % SIZE))
            for k in range(len(reqs))]
    assert struct.unpack_from("<H", lo, USED + 2)[0] == (start + len(reqs)) & 0xFFFF
    statuses = [lo[HDRS + 32 * i + 16] for i in range(len(reqs))]
    with open(path, "rb") as f:
        disk = f.read()
    return used, statuses, disk  # type: ignore[return-value]


def _model(reqs: list[tuple[int, int, int, bool]], start: bytes, file_size: int
           ) -> tuple[list[tuple[int, int]], list[int], list[bytes | None]]:
    """One request at a time: used entries, statuses, and each read's expected bytes."""
    disk = bytearray(start[:file_size])
    failing = {sector * 512 for _, sector, _, eio in reqs if eio}  # as _serve injects
    used, statuses, reads = [], [], []
    for i, (rtype, sector, n, _) in enumerate(reqs):
        offset, length = sector * 512, 512 * n
        in_disk = offset + length <= DISK  # what the device reports as its capacity
        if rtype == FLUSH:
            used.append((i, 1))
            statuses.append(VIRTIO_BLK_S_OK)
            reads.append(None)
        elif rtype == VIRTIO_BLK_T_OUT:
            ok = in_disk
            if ok:  # a write past the (cut) file's end extends it, a hole before it
                disk.extend(bytes(max(0, offset - len(disk))))
                disk[offset : offset + length] = bytes([i + 1]) * length
            used.append((i, 1))
            statuses.append(VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR)
            reads.append(None)
        else:
            ok = (in_disk and offset + length <= len(disk)
                  and not any(offset <= f < offset + length for f in failing))
            used.append((i, length + 1 if ok else 1))
            statuses.append(VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR)
            reads.append(bytes(disk[offset : offset + length]) if ok else None)
    return used, statuses, reads


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(_request, min_size=1, max_size=SIZE), sequential=st.booleans(),
       cut=st.sampled_from([DISK, DISK, DISK - 4096, DISK // 2]),
       start=st.integers(0, 2**16 - 1))
def test_a_batch_reads_what_one_request_at_a_time_would(ram, tmp_path, reqs, sequential,
                                                        cut, start):
    if sequential:  # mostly reads that continue one another (one preadv for a run)
        sector, out = 0, []
        for rtype, s, n, eio in reqs:
            if s % 5 == 0:
                sector = s
            out.append((rtype, sector, n, eio and s % 3 == 0))
            sector += n
        reqs = out
    path = tmp_path / "disk.img"
    content = os.urandom(DISK)
    path.write_bytes(content)
    batches = (len(reqs) + ring_thread.BATCH - 1) // ring_thread.BATCH
    used, statuses, _ = _serve(ram, str(path), reqs, batches, cut, start)
    want_used, want_status, want_reads = _model(reqs, content, cut)
    assert statuses == want_status
    assert used == want_used
    lo = ram.view(0, 64 * MiB)
    for i, want in enumerate(want_reads):
        if want is not None:
            assert bytes(lo[DATA + 8192 * i : DATA + 8192 * i + len(want)]) == want, i


def test_writes_and_reads_of_one_batch_reach_the_image_in_ring_order(ram, tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK))
    reqs = [(VIRTIO_BLK_T_IN, 8, 8, False), (VIRTIO_BLK_T_OUT, 8, 8, False),
            (VIRTIO_BLK_T_IN, 8, 8, False), (VIRTIO_BLK_T_IN, 16, 8, False),
            (VIRTIO_BLK_T_OUT, 16, 1, False), (VIRTIO_BLK_T_IN, 16, 8, False)]
    used, statuses, disk = _serve(ram, str(path), reqs, 1, DISK)
    assert statuses == [VIRTIO_BLK_S_OK] * 6
    assert used == [(0, 4097), (1, 1), (2, 4097), (3, 4097), (4, 1), (5, 4097)]
    lo = ram.view(0, 64 * MiB)
    assert bytes(lo[DATA : DATA + 4096]) == bytes(4096)  # before the write
    assert bytes(lo[DATA + 2 * 8192 : DATA + 2 * 8192 + 4096]) == b"\x02" * 4096
    assert bytes(lo[DATA + 3 * 8192 : DATA + 3 * 8192 + 4096]) == bytes(4096)
    assert bytes(lo[DATA + 5 * 8192 : DATA + 5 * 8192 + 512]) == b"\x05" * 512
    assert disk[8 * 512 : 16 * 512] == b"\x02" * 4096


def test_used_entries_past_the_ring_end_and_lengths_over_4_gib(ram):
    """``add_used_flat`` stores what ``add_used`` would, one element at a time."""
    lo = ram.view(0, 64 * MiB)
    got = []
    for flat_path in (True, False):
        lo[USED : USED + 6 + 8 * 8] = bytes(6 + 8 * 8)
        q = Virtqueue(ram, 0, 8)
        q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
        q.used_idx = 5
        q.start(event_idx=True, indirect=True)
        entries = [(1, 4097), (2, 2**32 + 7), (3, 1), (4, 2**32 - 1), (5, 0)]
        if flat_path:
            q.add_used_flat([2, 2**32 + 7])  # one run, a length over 4 GiB
            q.add_used_flat([v for e in entries for v in e])  # wraps around the ring end
        else:
            for head, n in [(2, 2**32 + 7), *entries]:
                q.add_used(head, n)
        got.append(bytes(lo[USED : USED + 6 + 8 * 8]))
        assert q.used_idx == 11
        q.stop()
    assert got[0] == got[1]
    assert struct.unpack_from("<II", got[0], 4 + 8 * 5) == (2, 7)


def test_a_big_request_is_completed_before_the_rest_of_its_batch(ram, tmp_path):
    """A 512 KiB read (one page per segment, as Linux sends it under our limits) gets its
    used entry and interrupt before the small read queued after it is served: the driver
    works on it while the device copies the next one."""
    path = tmp_path / "disk.img"
    content = os.urandom(DISK)
    path.write_bytes(content)
    dev = VirtioBlk(parse_blk_options(str(path)))
    lo = ram.view(0, 64 * MiB)
    big, pages = 0x40_0000, 128
    lo[DESC : big + pages * 4096] = bytes(big + pages * 4096 - DESC)
    # request 0: header, 128 device-writable pages, status, chained in order
    _D.pack_into(lo, DESC, TABLES, 16 * (pages + 2), 4, 0)
    _D.pack_into(lo, TABLES, HDRS, 16, 1, 1)
    for k in range(pages):
        _D.pack_into(lo, TABLES + 16 * (k + 1), big + 4096 * k, 4096, 3, k + 2)
    _D.pack_into(lo, TABLES + 16 * (pages + 1), HDRS + 16, 1, 2, 0)
    _HDR.pack_into(lo, HDRS, VIRTIO_BLK_T_IN, 0, 0)
    # request 1: a 4 KiB read of the disk's last page
    table = TABLES + 0x1000
    _D.pack_into(lo, DESC + 16, table, 48, 4, 0)
    _D.pack_into(lo, table, HDRS + 32, 16, 1, 1)
    _D.pack_into(lo, table + 16, DATA, 4096, 3, 2)
    _D.pack_into(lo, table + 32, HDRS + 48, 1, 2, 0)
    _HDR.pack_into(lo, HDRS + 32, VIRTIO_BLK_T_IN, 0, (DISK - 4096) // 512)
    lo[HDRS + 16] = lo[HDRS + 48] = 0xEE
    struct.pack_into("<HHH", lo, AVAIL, 0, 2, 0)
    struct.pack_into("<H", lo, AVAIL + 4 + 2, 1)
    q = Virtqueue(ram, 0, SIZE)
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    q.start(event_idx=False, indirect=True)
    seen = []
    dev.signal = lambda q: seen.append(  # type: ignore[method-assign]
        (q.used_idx, lo[HDRS + 16], lo[HDRS + 48]))
    try:
        assert dev.serve_blocking(q)
    finally:
        q.stop()
        dev.close()
    assert seen == [(1, VIRTIO_BLK_S_OK, 0xEE), (2, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK)]
    assert struct.unpack_from("<IIII", lo, USED + 4) == (0, pages * 4096 + 1, 1, 4097)
    assert bytes(lo[big : big + pages * 4096]) == content[: pages * 4096]
    assert bytes(lo[DATA : DATA + 4096]) == content[-4096:]
