"""The split-ring walker on raw guest bytes: the fuzzer's input *is* the ring memory.

``test_fuzz_virtqueue.py`` draws rings field by field through hypothesis strategies,
which costs about 5 ms of generation per input; here one byte string is copied straight
over the descriptor table, the avail ring and two indirect tables (what a guest
controls), and the bytes come from a 64-bit seed (hypothesis draws ``st.binary`` byte by
byte, which alone costs a millisecond here), so a long run reaches a million inputs in
minutes. Each input is popped to the end with both ``pop`` and ``pop_batch`` (the batch
path has its own check for Linux's indirect requests): they must accept the same chains
and fail at the same place, only with VirtqueueError, and every buffer they hand out
must lie in guest RAM. (A loosened flag check in the batch path is caught within a few
thousand inputs.)
"""

from __future__ import annotations

import os
import random
import struct
import tempfile

from hypothesis import given
from hypothesis import strategies as st

from devicemodel.virtio.blk import VirtioBlk, parse_blk_options
from devicemodel.virtio.bulk import Bulk
from devicemodel.virtio.console import VirtioConsole, parse_console_options
from devicemodel.virtio.mock import FakeTap
from devicemodel.virtio.net import VirtioNet, parse_net_options
from devicemodel.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
)
from devicemodel.virtio.rnd import VirtioRnd
from tests.support import hostile_rings as h

from ._common import count, fuzz_settings

SIZE = h.SIZE
# input layout: 1 flag byte, the descriptor table, avail (flags, idx, ring), two tables
DESC_BYTES = 16 * SIZE
AVAIL_BYTES = 4 + 2 * SIZE
TABLE_BYTES = 16 * 16
INPUT = 1 + DESC_BYTES + AVAIL_BYTES + 2 * TABLE_BYTES


def _lay_out(data: bytes) -> tuple[bool, bool]:
    mem = h.MEM
    mem.view(0, h.LOW)[:] = h._ZERO_LOW
    data = data.ljust(INPUT, b"\0")
    at = 1
    for gpa, n in ((h.DESC, DESC_BYTES), (h.AVAIL, AVAIL_BYTES),
                   (h.TABLES[0], TABLE_BYTES), (h.TABLES[1], TABLE_BYTES)):
        mem.write(gpa, data[at : at + n])
        at += n
    return bool(data[0] & 1), bool(data[0] & 2)


def _pops(data: bytes, batch: bool, triples: bool = False, start: int = 0) -> list[object]:
    event_idx, indirect = _lay_out(data)
    q = Virtqueue(h.MEM, 0, SIZE)
    q.size = SIZE
    q.last_avail_idx = q.used_idx = start
    q.desc_addr, q.avail_addr, q.used_addr = h.DESC, h.AVAIL, h.USED
    q.start(event_idx=event_idx, indirect=indirect)
    out: list[object] = []
    for _ in range(SIZE + 2):
        try:
            if triples:  # the blk hot path's pop: a Triple or Bulk is its chain, alike
                got = [q.chain_of(c) if isinstance(c, tuple | Bulk) else c  # type: ignore[arg-type]
                       for c in q.pop_batch_triples(3)]
            else:
                got = q.pop_batch(3) if batch else [c for c in [q.pop()] if c is not None]
        except VirtqueueError as e:
            out.append(("error", str(e).split(":")[0]))
            break
        if not got:
            break
        for c in got:
            for a, n in zip(c.addrs, c.lens, strict=True):
                assert h.MEM.in_ram(a, n), f"buffer {a:#x}+{n:#x} is not guest RAM"
            out.append((c.head, tuple(c.addrs), tuple(c.lens), c.nreadable,
                        c.readable_len, c.writable_len))
            q.add_used(c.head, c.writable_len)
    q.stop()
    return out


def _expand(seed: int) -> bytes:
    """INPUT random bytes from ``seed``; half of them shaped like Linux's requests (ring
    descriptors pointing at indirect tables chained in order, readable entries first),
    with a few fields broken, so that chains get past the first checks and reach the
    deeper ones (and the batch path's own check for exactly this layout)."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(INPUT))
    if not seed & 1:
        return bytes(data)
    tables_at = 1 + DESC_BYTES + AVAIL_BYTES
    sizes = []
    for t in range(2):  # each table: n entries chained 0 → 1 → … → n-1
        n, entries = rnd.choice([3, 3, rnd.randrange(1, 17)]), []  # 3: Linux's blk I/O
        nread = rnd.choice([1, n - 1, n, rnd.randrange(n + 1)])
        for j in range(16):
            flags = (VIRTQ_DESC_F_WRITE if j >= nread else 0) | (1 if j < n - 1 else 0)
            entries.append([h.DATA + rnd.randrange(0x8000), rnd.choice([16, 1, 512, 4096]),
                            flags, j + 1])
        sizes.append(n)
        for _ in range(rnd.choice([0, 0, 1, 2])):  # break a field or two
            j, f = rnd.randrange(16), rnd.randrange(4)
            entries[j][f] = rnd.choice([rnd.randrange(1 << 64), h.LOW - 8, h.HIGH,
                                        rnd.randrange(1 << 16), 2**32 - 1])
            entries[j][f] &= (1 << (64, 32, 16, 16)[f]) - 1
        for j, e in enumerate(entries):
            at = tables_at + TABLE_BYTES * t + 16 * j
            data[at : at + 16] = struct.pack("<QIHH", *e)
    for i in range(SIZE):  # the ring: mostly one indirect descriptor per request
        t = rnd.randrange(2)
        length = 16 * sizes[t] if rnd.randrange(4) else rnd.randrange(300)
        flags = rnd.choice([VIRTQ_DESC_F_INDIRECT] * 4 + [5, 6, 0x14, 0, 1])
        data[1 + 16 * i : 17 + 16 * i] = struct.pack("<QIHH", h.TABLES[t], length, flags,
                                                     rnd.randrange(SIZE + 1))
    av = 1 + DESC_BYTES
    data[av + 2 : av + 4] = struct.pack("<H", rnd.randrange(1, SIZE + 2))
    for k in range(SIZE):
        data[av + 4 + 2 * k : av + 6 + 2 * k] = struct.pack("<H", rnd.randrange(SIZE + 1))
    return bytes(data)


@fuzz_settings(200)
@given(data=st.integers(0, 2**64 - 1).map(_expand))
def test_raw_rings_pop_and_pop_batch_agree(data):
    count("rings_raw.walker")
    one = _pops(data, batch=False)
    assert _pops(data, batch=True) == one
    assert _pops(data, batch=True, triples=True) == one


@fuzz_settings(200)
@given(data=st.integers(0, 2**64 - 1).map(_expand), start=st.integers(0, 2**16 - 1),
       pending=st.integers(1, SIZE))
def test_pops_agree_from_anywhere_in_the_ring(data, start, pending):
    """The same from any ring position: a batch may wrap around the ring's end (and the
    16-bit index), where the avail ring's last entry is followed by used_event, not by
    its first entry."""
    count("rings_raw.walker")
    raw = bytearray(data)
    av = 1 + DESC_BYTES
    raw[av + 2 : av + 4] = struct.pack("<H", (start + pending) & 0xFFFF)
    one = _pops(bytes(raw), batch=False, start=start)
    assert _pops(bytes(raw), batch=True, start=start) == one
    assert _pops(bytes(raw), batch=True, triples=True, start=start) == one


def _as_ring(data: bytes) -> dict:
    """The expanded bytes as the ring description the hostile-ring checks take."""
    def descs(at: int, n: int) -> list[tuple[int, int, int, int]]:
        return [_DESC.unpack_from(data, at + 16 * i) for i in range(n)]

    av = 1 + DESC_BYTES
    tables_at = av + AVAIL_BYTES
    return {
        "desc": descs(1, SIZE),
        "ind0": descs(tables_at, 16),
        "ind1": descs(tables_at + TABLE_BYTES, 16),
        "avail": list(struct.unpack_from(f"<{SIZE}H", data, av + 4)),
        "avail_idx": struct.unpack_from("<H", data, av + 2)[0],
        "event_idx": bool(data[0] & 1),
        "indirect": bool(data[0] & 2) or bool(data[0] & 4),
        "payload": data[-16:],
    }


_DESC = struct.Struct("<QIHH")
_CONSOLE_OUT = os.path.join(tempfile.mkdtemp(prefix="acrn-fuzz-raw-"), "console.out")


@fuzz_settings(60)
@given(seed=st.integers(0, 2**64 - 1))
def test_raw_rings_vs_every_device(hostile_image, seed):
    """The same raw rings against a real device each (blk with every request type, net
    rx and tx, console ports, rnd): only NEEDS_RESET may come of it, and the device writes
    guest RAM only inside the buffers the driver marked device-writable."""
    count("rings_raw.devices")
    data = _expand(seed >> 3)
    r = _as_ring(data)
    which = seed & 7
    if which < 3:
        rtype = (0, 1, 4, 8, 11, 13, 99)[data[0] % 7]
        sector = 0 if data[1] & 1 else int.from_bytes(data[-8:], "little")
        r["payload"] = struct.pack("<IIQ", rtype, 0, sector)
        dev = VirtioBlk(parse_blk_options(hostile_image + ",discard"))
        index = 0
    elif which < 5:
        tap = FakeTap()
        tap.host.send(data[: data[2] * 8])
        dev = VirtioNet(parse_net_options("tap=faketap"), tap=tap)  # type: ignore[arg-type]
        index = which - 3
    elif which == 5:
        dev = VirtioConsole(parse_console_options(f"@file:a={_CONSOLE_OUT},file:b={_CONSOLE_OUT}"))
        index = (1, 3, 5)[data[3] % 3]
    else:
        dev = VirtioRnd()
        index = 0
    try:
        h.check(dev, r, index)
    finally:
        dev.close()


@fuzz_settings(60)
@given(seed=st.integers(0, 2**64 - 1))
def test_raw_rings_vs_blk_on_a_data_plane(hostile_image, seed):
    """The same raw rings against virtio-blk's data-plane path (vhost-user: a thread
    serving the ring with blocking I/O), every request type, batch by batch or in the
    thread's own loop (often with one request available: the lone request's path)."""
    count("rings_raw.blk_dataplane")
    data = _expand(seed >> 1)
    rtype = (0, 1, 4, 8, 11, 13, 99)[data[0] % 7]
    sector = 0 if data[1] & 1 else int.from_bytes(data[-8:], "little")
    if seed & 1:  # mostly well-formed reads and writes, a field broken here and there
        rnd = random.Random(seed)
        rtype = rnd.choice([0, 1, 0, 1, 4, 8, 11, 13, 99])
        sector = rnd.randrange(2048) if rnd.randrange(8) else rnd.randrange(1 << 64)
        data = _blk_shaped(data, rnd, rtype != 0)
    r = _as_ring(data)
    r["payload"] = struct.pack("<IIQ", rtype, 0, sector)
    lane = bool(seed & 2)  # the thread's own loop, which serves a lone request itself
    if lane:
        r["event_idx"] = r["indirect"] = True
        r["avail_idx"] = 1 if seed & 4 else r["avail_idx"]
    dev = VirtioBlk(parse_blk_options(hostile_image + ",discard"))
    try:
        h.check_data_plane(dev, r, lane)
    finally:
        dev.close()


def _blk_shaped(data: bytes, rnd: random.Random, write: bool) -> bytes:
    """``data`` with each indirect table made a plausible blk request most of the time:
    a 16-byte header on one of the headers ``lay_out`` writes (every 64 bytes of the data
    area), data buffers readable for a write and writable for a read, and a writable
    1-byte status, so the fast paths for reads and writes run."""
    out = bytearray(data)
    tables_at = 1 + DESC_BYTES + AVAIL_BYTES
    for t in range(2):
        at = tables_at + TABLE_BYTES * t
        n = next((j + 1 for j in range(16)
                  if not _DESC.unpack_from(out, at + 16 * j)[2] & 1), 16)
        if n < 3 or rnd.randrange(4) == 0:
            continue
        for j in range(n):
            a, length, flags, nxt = _DESC.unpack_from(out, at + 16 * j)
            if rnd.randrange(8):
                last = j == n - 1
                writable = last or (j > 0 and not write)
                flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else 1)
            if j == 0:
                a, length = h.DATA + 64 * rnd.randrange(0x200), 16
            elif j == n - 1:
                length = 1
            else:  # whole sectors, mostly
                length = rnd.choice([512, 4096, 4096, length])
            _DESC.pack_into(out, at + 16 * j, a, length, flags, nxt)
    return bytes(out)


def _one_table(ring: tuple[int, int], entries: list[tuple[int, int, int, int]]) -> bytes:
    """Input bytes for ``_lay_out``: INDIRECT_DESC negotiated, one request whose ring
    descriptor (length, flags) points at table 0, which holds ``entries``."""
    data = bytearray(INPUT)
    data[0] = 2
    data[1:17] = struct.pack("<QIHH", h.TABLES[0], ring[0], ring[1], 0)
    av = 1 + DESC_BYTES
    data[av + 2 : av + 4] = struct.pack("<H", 1)
    at = av + AVAIL_BYTES
    for j, e in enumerate(entries):
        data[at + 16 * j : at + 16 * j + 16] = struct.pack("<QIHH", *e)
    return bytes(data)


_EDGES = (  # per descriptor field: values at and around what the checks compare
    [h.DATA, h.DATA + 4096, h.LOW - 16, h.LOW - 1, h.LOW, h.HIGH, 2**64 - 1, 2**64 - 16],
    [16, 1, 0, 512, 4096, 15, 17, 2**32 - 1],
    list(range(8)),
    [0, 1, 2, 3],
)
_CHANGE = st.tuples(st.integers(0, 2), st.integers(0, 3)).flatmap(
    lambda jf: st.tuples(st.just(jf[0]), st.just(jf[1]), st.sampled_from(_EDGES[jf[1]])))


def _valid(n: int) -> list[list[int]]:
    """Linux's blk read as an n-entry table: header, n-2 data pages, status."""
    return ([[h.DATA, 16, 1, 1]] + [[h.DATA + 4096 * j, 4096, 3, j + 1] for j in range(1, n - 1)]
            + [[h.DATA + 64, 1, 2, 0]])


@fuzz_settings(200)
@given(n=st.sampled_from([3, 3, 4, 5, 16]), ring=st.sampled_from([0, 0, 16, -1, 1]),
       flags=st.sampled_from([4, 4, 0, 5, 6]),
       changes=st.lists(_CHANGE, max_size=2), write=st.booleans())
def test_the_blk_shapes_are_checked_as_the_walker_checks_them(n, ring, flags, changes, write):
    """An n-entry table a field or two away from Linux's blk read or write (3 entries: a
    Triple; more: a Bulk): the hot path's pop takes it or refuses it exactly as the
    general walker does."""
    count("rings_raw.walker")
    entries = _valid(n)
    if write:
        for e in entries[1:-1]:
            e[2] = 1  # the data buffers device-readable
    for j, f, v in changes:
        entries[(n - 3) + j if j == 2 else j][f] = v
    ring = (16 * n + ring, flags)
    data = _one_table(ring, [tuple(e) for e in entries])  # type: ignore[misc]
    assert _pops(data, batch=True, triples=True) == _pops(data, batch=False)


@fuzz_settings(300)
@given(ring=st.sampled_from([0, 0, 0, 16, -1]), flags=st.sampled_from([4, 4, 4, 0, 5, 6]),
       changes=st.just([]) | st.lists(_CHANGE, min_size=1, max_size=2), write=st.booleans(),
       rtype=st.sampled_from([0, 1, 0, 1, 4, 8, 99]),
       sector=st.integers(0, 2047) | st.sampled_from([2040, 2047, 2048, 2**63, 2**64 - 1]))
def test_a_lone_request_is_served_by_the_lane_as_by_the_general_path(
        hostile_image, ring, flags, changes, write, rtype, sector):
    """One request available, a field or two away from Linux's plain read or write:
    the data-plane thread's own loop (``blk/lane.py``) serves it, or hands it on, so
    that guest RAM ends as the general path leaves it (used ring, status, data), and
    fails the device exactly when that path does."""
    count("rings_raw.lane")
    entries = _valid(3)
    if write:
        entries[1][2] = 1  # the data buffer device-readable
    for j, f, v in changes:
        entries[j][f] = v
    r = _as_ring(_one_table((48 + ring, flags), [tuple(e) for e in entries]))  # type: ignore[misc]
    r["event_idx"] = True
    r["payload"] = struct.pack("<IIQ", rtype, 0, sector)
    ends = []
    for lane in (True, False):
        dev = VirtioBlk(parse_blk_options(hostile_image + ",discard"))
        try:
            ends.append(h.check_data_plane(dev, r, lane))
        finally:
            dev.close()
    assert ends[0] == ends[1]
