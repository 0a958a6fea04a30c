"""The virtqueue and virtio-blk fast paths hold every guarantee of the vetted paths.

``Virtqueue`` checks buffers in the RAM below and above the PCI hole inline (no
``MemoryMap.view`` call) when the memory map does not vet accesses itself, and virtio-blk
serves plain reads (header, one data buffer, status byte) without the general parser,
merging sequential ones into one ``preadv``. A ``GuardedMemory`` without spans vets every
access and so takes the slow paths; here the same hostile rings run on a plain
``MemoryMap`` with the same layout, and the walker must agree with the vetted one chain
for chain.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.memory import GuestMemory, MemoryMap, MiB, RamRegion
from devicemodel.virtio import blk
from devicemodel.virtio.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VirtioBlk,
    parse_blk_options,
)
from devicemodel.virtio.blk.io import image as blk_image
from devicemodel.virtio.mock import GuardedMemory, MockDriver, RecordingInterrupt, wait_used
from devicemodel.virtio.queue import Virtqueue, VirtqueueError
from tests.support import hostile_rings as h
from tests.support.blk_rig import rig


class PlainMemory(MemoryMap):
    """Anonymous RAM regions; ``view`` is MemoryMap's own, so queues take the fast path."""

    def __init__(self, layout: list[tuple[int, int]]) -> None:
        super().__init__([RamRegion(gpa, size, mmap.mmap(-1, size)) for gpa, size in layout])

    @property
    def layout(self) -> list[tuple[int, int]]:
        return [(r.gpa, r.size) for r in self.regions]

    def snapshot(self) -> list[bytes]:
        return [self.read(g, s) for g, s in self.layout]


PLAIN = PlainMemory(h.MEM.layout)
VETTED = GuardedMemory(h.MEM.layout)  # no spans: every access through view()


def test_plain_memory_takes_the_fast_path_and_guarded_memory_does_not():
    assert PLAIN.spans() is not None and VETTED.spans() is None
    q = Virtqueue(PLAIN, 0, 8)
    q.desc_addr, q.avail_addr, q.used_addr = h.DESC, h.AVAIL, h.USED
    q.start(event_idx=False, indirect=False)
    assert q.low_ram[0] == h.LOW
    q.stop()
    assert q.low_ram == (-1, None)


def _outcomes(mem: MemoryMap, r: dict) -> list[object]:
    """Every pop of the ring in ``mem`` until it is empty or broken, as plain data."""
    q = Virtqueue(mem, 0, h.SIZE)
    q.size = h.SIZE
    q.desc_addr, q.avail_addr, q.used_addr = h.DESC, h.AVAIL, h.USED
    q.start(event_idx=r["event_idx"], indirect=r["indirect"])
    out: list[object] = []
    for _ in range(h.SIZE + 2):
        try:
            chain = q.pop()
        except VirtqueueError as e:
            out.append(("error", str(e)))
            break
        if chain is None:
            break
        out.append((chain.head, chain.nreadable, chain.readable_len, chain.writable_len,
                    [bytes(v) for v in chain.readable], [len(v) for v in chain.writable]))
        q.add_used(chain.head, chain.writable_len)
    return out


@h.COMMON
@given(h.rings)
def test_fast_walker_agrees_with_the_vetted_walker(r):
    h.lay_out(r)
    for (gpa, _), data in zip(h.MEM.layout, h.MEM.snapshot(), strict=True):
        PLAIN.write(gpa, data)
        VETTED.write(gpa, data)
    assert _outcomes(PLAIN, r) == _outcomes(VETTED, r)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fast") / "disk.img"
    path.write_bytes(os.urandom(1 * MiB))
    return str(path)


@pytest.fixture
def plain_hostile_memory(monkeypatch):
    monkeypatch.setattr(h, "MEM", PLAIN)


@h.COMMON
@given(r=h.rings, rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 99]))
def test_hostile_rings_vs_blk_fast_path(plain_hostile_memory, image, r, rtype):
    h.rings_vs_blk(image, r, rtype)


# Well-formed reads with edge values: these reach the fast path (the hostile rings rarely do).
_LOW = h.LOW
_DATA = 0x40000
_plain_reads = st.lists(
    st.tuples(
        st.one_of(st.integers(0, (1 * MiB) // 512), st.sampled_from([2**64 - 1, 2**55])),
        st.sampled_from([0, 512, 4096, 8192, 3 * 4096, 256 * 1024, 256 * 1024 + 512]),
        st.sampled_from([_DATA, _LOW - 4096, _LOW - 8192, _LOW, h.HIGH, 2**64 - 4096]),
        st.sampled_from(["data", "low_end", "beyond", "high"]),
    ),
    min_size=1, max_size=12,
)
_HDR = struct.Struct("<IIQ")
_DESC = struct.Struct("<QIHH")


async def _serve_reads(image: str, reads: list, sequential: bool) -> None:
    mem = PLAIN
    mem.write(0, bytes(_LOW))
    base = 0x10000
    hdrs, statuses = 0x30000, 0x38000
    with open(image, "rb") as f:
        disk = f.read()
    drv = MockDriver(mem, base, 64, data_size=0x10000)
    q = drv.queue()
    dev = VirtioBlk(parse_blk_options(image))
    irq = RecordingInterrupt()
    expect = []
    sector0 = reads[0][0] if reads[0][0] < 2048 else 0
    for k, (sector, length, addr, where) in enumerate(reads):
        if sequential:
            sector = sector0
            sector0 += length // 512
        if where == "data":
            addr = _DATA + (k * 0x9000) % 0x40000
        elif where == "low_end":
            addr = _LOW - length
        elif where == "high":
            addr = h.HIGH
        d = 3 * k
        _DESC.pack_into(mem.view(base + 16 * d, 48), 0, hdrs + 16 * k, 16, 1, d + 1)
        _DESC.pack_into(mem.view(base + 16 * d + 16, 16), 0, addr, length, 3, d + 2)
        _DESC.pack_into(mem.view(base + 16 * d + 32, 16), 0, statuses + k, 1, 2, 0)
        mem.write(hdrs + 16 * k, _HDR.pack(VIRTIO_BLK_T_IN, 0, sector))
        mem.write(statuses + k, b"\xee")
        drv.set_avail_entry(k, d)
        expect.append((sector, length, addr))
    drv.set_avail_idx(len(reads))
    before = mem.snapshot()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(dev.run)
                dev.activate(dev.device_features, [q], irq)
                dev.queue_notify(0)
                used: list[tuple[int, int]] = []
                while not dev.failure and len(used) < len(reads):
                    used.extend(drv.get_used())
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
    finally:
        dev.close()
    in_ram = [(0, _LOW), (h.HIGH, h.HIGH_SIZE)]

    def ram(a: int, n: int) -> bool:
        return any(g <= a and a + n <= g + s for g, s in in_ram)

    if any(not ram(a, n) for _, n, a in expect):
        assert dev.failure is not None and irq.reset_requests == 1  # outside RAM: reset
        return
    assert dev.failure is None
    allowed = [(drv.used_addr, 6 + 8 * 64), (statuses, len(reads))]
    for k, (sector, length, addr) in enumerate(expect):
        status = mem.read(statuses + k, 1)[0]
        ok = sector * 512 + length <= len(disk)
        assert status == (VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR), (k, sector, length)
        allowed.append((addr, length))
        if ok:
            want = disk[sector * 512 : sector * 512 + length]
            others = [j for j, (_, n, a) in enumerate(expect)
                      if j != k and a < addr + length and addr < a + n]
            if not others:  # reads into overlapping buffers may land in any order
                assert mem.read(addr, length) == want, k
    after = mem.snapshot()
    for (g, s), old, new in zip(mem.layout, before, after, strict=True):
        for page in range(0, s, 4096):
            if old[page : page + 4096] == new[page : page + 4096]:
                continue
            for off in range(page, min(page + 4096, s)):
                if old[off] != new[off]:
                    assert any(a <= g + off < a + n for a, n in allowed), hex(g + off)


@h.COMMON
@given(reads=_plain_reads, sequential=st.booleans())
def test_plain_reads_at_the_edges(image, reads, sequential):
    trio.run(_serve_reads, image, reads, sequential)


async def test_merged_sequential_reads_fill_every_buffer(image, monkeypatch):
    calls: list[int] = []
    real = blk_image.preadv_nowait

    def counting(fd, views, offset):
        calls.append(len(views))
        return real(fd, views, offset)

    monkeypatch.setattr(blk_image, "preadv_nowait", counting)
    mem = GuestMemory(128 * MiB)
    try:
        async with rig(mem, image) as r:
            heads = [r.drv.add_chain([_HDR.pack(VIRTIO_BLK_T_IN, 0, 8 * k)], [4096, 1],
                                     publish=False) for k in range(24)]
            r.drv.add_many(heads)
            r.dev.queue_notify(0)
            used = await wait_used(r.drv, 24)
            assert sorted(hh for hh, _ in used) == sorted(heads)
            assert sorted(n for _, n in used) == [4097] * 24
            with open(image, "rb") as f:
                disk = f.read(24 * 4096)
            for k, head in enumerate(heads):
                out = r.drv.written(head)
                assert out[-1] == VIRTIO_BLK_S_OK
                assert out[:-1] == disk[k * 4096 : (k + 1) * 4096]
        assert calls == [24], f"sequential reads were not merged: {calls}"
    finally:
        mem.close()


# -- many-descriptor requests (what Linux sends for large I/O) --------------------------

_TABLE = 0x80000  # an indirect table in PLAIN's low RAM, clear of the hostile layout
_in_order_tables = st.lists(
    st.tuples(
        st.one_of(st.integers(0, h.LOW), st.sampled_from([h.HIGH, h.HIGH + 4096, h.LOW - 1,
                                                          2**64 - 1, 2**40])),
        st.sampled_from([0, 1, 16, 4096, 2**32 - 1]),
        st.sampled_from([1, 1, 3, 3, 3, 2, 0, 4, 5, 9, 7]),
    ),
    min_size=2, max_size=300,
)


@h.COMMON
@given(table=_in_order_tables, lie=st.integers(-1, 300), event_idx=st.booleans())
def test_in_order_indirect_tables_agree_with_the_vetted_walker(table, lie, event_idx):
    """A table chained 0 → 1 → … (Linux's layout) is checked whole; the result, or the
    rejection, must be the vetted walker's, descriptor for descriptor."""
    for mem in (PLAIN, VETTED):
        mem.view(0, h.LOW)[:] = bytes(h.LOW)
        mem.view(h.HIGH, h.HIGH_SIZE)[:] = bytes(h.HIGH_SIZE)
        for i, (a, n, f) in enumerate(table):
            last = i + 1 == len(table)
            if last:
                f &= ~1  # the table ends here unless ``lie`` says otherwise
            nxt = 7 if i == lie else i + 1
            _DESC.pack_into(mem.view(_TABLE + 16 * i, 16), 0, a, n, f, nxt)
        _DESC.pack_into(mem.view(h.DESC, 16), 0, _TABLE, 16 * len(table), 4, 0)
        mem.write_u16(h.AVAIL + 4, 0)
        mem.write_u16(h.AVAIL + 2, 1)
    r = {"event_idx": event_idx, "indirect": True}
    assert _outcomes(PLAIN, r) == _outcomes(VETTED, r)


def test_linux_style_indirect_table_is_checked_whole():
    PLAIN.view(0, h.LOW)[:] = bytes(h.LOW)
    n = 258  # header, 256 pages, status: a 1 MiB read
    bufs = [(0x40000, 16, 1)] + [(0x10000 + 4096 * k % 0x20000, 4096, 3) for k in range(256)]
    bufs.append((0x41000, 1, 2))
    for i, (a, ln, f) in enumerate(bufs):
        _DESC.pack_into(PLAIN.view(_TABLE + 16 * i, 16), 0, a, ln, f, i + 1)
    _DESC.pack_into(PLAIN.view(h.DESC, 16), 0, _TABLE, 16 * n, 4, 0)
    PLAIN.write_u16(h.AVAIL + 2, 1)
    q = Virtqueue(PLAIN, 0, h.SIZE)
    q.desc_addr, q.avail_addr, q.used_addr = h.DESC, h.AVAIL, h.USED
    q.start(event_idx=False, indirect=True)
    chain = q.pop()
    assert chain is not None and chain.low
    assert isinstance(chain.addrs, tuple), "the table was walked descriptor by descriptor"
    assert (chain.nreadable, chain.readable_len, chain.writable_len) == (1, 16, 256 * 4096 + 1)
    assert list(chain.addrs) == [a for a, _, _ in bufs]


_PAGES = 16 * MiB  # guest pages for data buffers: [_PAGES, _PAGES + 8 MiB)
_requests = st.lists(
    st.tuples(
        st.sampled_from([VIRTIO_BLK_T_IN, blk.VIRTIO_BLK_T_OUT]),
        st.integers(0, (1 * MiB) // 512 - 1),  # sector
        st.integers(1, 300),  # data descriptors
        st.sampled_from(["adjacent", "scattered", "mixed", "odd"]),
        st.booleans(),  # indirect
        st.sampled_from(["ok", "ok", "ok", "readonly", "beyond_ram", "wrapping", "no_status"]),
    ),
    min_size=1, max_size=6,
)


def _data_buffers(rng: int, npages: int, layout: str, slot: int) -> list[tuple[int, int]]:
    """(gpa, length) of a request's data buffers in slot ``slot`` of the page area."""
    base = _PAGES + slot * (5 * MiB // 2)
    if layout == "adjacent":
        return [(base + 4096 * k, 4096) for k in range(npages)]
    if layout == "scattered":  # every other page, in reverse order
        return [(base + 8192 * (npages - 1 - k), 4096) for k in range(npages)]
    if layout == "mixed":  # runs of adjacent pages with gaps, some 512-byte pieces
        out, addr = [], base
        for k in range(npages):
            n = 512 if (k * 7 + rng) % 5 == 0 else 4096
            out.append((addr, n))
            addr += n + (4096 if (k + rng) % 3 == 0 else 0)
        return out
    return [(base + 1 + 8192 * k, 512) for k in range(npages)]  # "odd": unaligned


async def _serve_many(requests: list, image: str, mode: str = "") -> None:
    mem = GuestMemory(128 * MiB)
    with open(image, "rb") as f:
        disk = bytearray(f.read())
    try:
        async with rig(mem, image + mode) as r:
            drv = r.drv
            hostile = None
            heads, expect = [], []
            guest_before = None
            for k, (rtype, sector, npages, layout, indirect, kind) in enumerate(requests):
                if kind == "no_status":
                    rtype = blk.VIRTIO_BLK_T_OUT  # a read's last data byte would be its status
                if not indirect:
                    npages = min(npages, 30)  # six of them must fit the 256-entry ring
                data = _data_buffers(sector, npages, layout, k)
                if kind == "beyond_ram":
                    data[npages // 2] = (200 * MiB, 4096)
                elif kind == "wrapping":
                    data[-1] = (2**64 - 2048, 4096)
                length = sum(n for _, n in data)
                write = rtype == blk.VIRTIO_BLK_T_OUT
                payload = os.urandom(length) if write else b""
                off = 0
                bufs = []
                for a, n in data:
                    if kind in ("ok", "readonly", "no_status"):
                        if write:
                            mem.write(a, payload[off : off + n])
                        else:
                            mem.write(a, b"\xa5" * n)
                    off += n
                    # data the device must write (a read) is device-writable, unless hostile
                    bufs.append(blk_buffer(a, n, writable=not write if kind != "readonly"
                                           else write))
                hdr = drv.alloc(16)
                mem.write(hdr, _HDR.pack(rtype, 0, sector))
                st_addr = drv.alloc(1)
                mem.write(st_addr, b"\xee")
                chain = [blk_buffer(hdr, 16, writable=False), *bufs]
                if kind != "no_status":
                    chain.append(blk_buffer(st_addr, 1, writable=True))
                head = drv.add_buffers(chain, indirect=indirect, publish=False)
                heads.append(head)
                expect.append((rtype, sector, length, data, payload, kind, st_addr))
                if kind in ("beyond_ram", "wrapping", "no_status") and hostile is None:
                    hostile = k
            guest_before = mem.read(_PAGES, 16 * MiB)
            drv.add_many(heads)
            r.dev.queue_notify(0)
            ngood = len(requests) if hostile is None else hostile
            used: list[tuple[int, int]] = []
            with trio.fail_after(10):
                while (r.dev.failure is None if hostile is not None else len(used) < ngood):
                    used.extend(drv.get_used())
                    await trio.sleep(0.001)
                await trio.sleep(0.01)  # anything still in flight
                used.extend(drv.get_used())
            guest_after = mem.read(_PAGES, 16 * MiB)
            done = dict(used)
            allowed = [(a - _PAGES, n) for e in expect if e[0] == VIRTIO_BLK_T_IN
                       and e[5] == "ok" for a, n in e[3]]
            if guest_after != guest_before:  # only good reads' buffers may change
                for off in range(0, 16 * MiB, 4096):
                    if guest_after[off : off + 4096] != guest_before[off : off + 4096]:
                        for o in range(off, off + 4096):
                            if guest_after[o] != guest_before[o]:
                                assert any(a <= o < a + n for a, n in allowed), hex(o)
            if hostile is not None:
                # the device stops; requests still on the pool may or may not complete
                assert r.irq.reset_requests == 1 and r.dev.failure is not None
                assert not any(heads[k] in done for k in range(hostile, len(heads)))
        written = [(e[1] * 512, e[2]) for e in expect
                   if e[0] == blk.VIRTIO_BLK_T_OUT and e[5] == "ok"]
        with open(image, "rb") as f:
            after = f.read()
        if hostile is not None:
            for off in range(0, len(disk), 512):
                if after[off : off + 512] != disk[off : off + 512]:
                    assert any(s <= off < s + n for s, n in written), off
            return
        assert r.dev.failure is None
        orig = bytes(disk)
        # requests in flight together have no order: a read is checked where no write lands
        mask = bytearray(len(disk))
        for start, n in written:
            mask[start : start + n] = b"\1" * len(mask[start : start + n])
        for k, (rtype, sector, length, data, payload, kind, st_addr) in enumerate(expect):
            head = heads[k]
            assert head in done, k
            status = mem.read(st_addr, 1)[0]
            in_disk = sector * 512 + length <= len(disk)
            if kind == "readonly":
                # a read into device-readable buffers (or a write from writable ones) moves
                # no data: those buffers and the image stay as they were
                for a, n in data:
                    assert mem.read(a, n) == guest_before[a - _PAGES : a - _PAGES + n], k
                continue
            if not in_disk:
                assert status == VIRTIO_BLK_S_IOERR, k
                continue
            assert status == VIRTIO_BLK_S_OK, k
            if rtype == VIRTIO_BLK_T_IN:
                assert done[head] == length + 1
                got = b"".join(mem.read(a, n) for a, n in data)
                want = orig[sector * 512 : sector * 512 + length]
                m = mask[sector * 512 : sector * 512 + length]
                assert all(g == w for g, w, x in zip(got, want, m, strict=True) if not x), k
            else:
                assert done[head] == 1
                disk[sector * 512 : sector * 512 + length] = payload
        assert after == bytes(disk), "the image is not what the good writes made it"
    finally:
        mem.close()


def blk_buffer(addr: int, length: int, *, writable: bool):
    from devicemodel.virtio.mock import Buffer
    return Buffer(addr, length, writable)


@settings(h.COMMON, max_examples=30)  # each example boots a device on 128 MiB of RAM
@given(requests=_requests)
def test_many_descriptor_requests(tmp_path_factory, requests):
    """1 MiB-class reads and writes of up to 300 descriptors, adjacent or scattered pages,
    direct or indirect, next to hostile ones (data beyond RAM or wrapping 2^64, no status
    byte, read-only buffers where the device must write): good requests move exactly the
    right bytes, a broken chain resets the device, guest and image are otherwise intact."""
    path = tmp_path_factory.mktemp("many") / "disk.img"
    path.write_bytes(os.urandom(1 * MiB))
    trio.run(_serve_many, requests, str(path))


@pytest.mark.parametrize("nowait", [True, False])
def test_writeback_writes_inline_or_on_the_pool(tmp_path, monkeypatch, nowait):
    """Writeback writes go straight to the page cache where the file system allows
    RWF_NOWAIT (simulated here: ext4 refuses it), else to the pool; the same bytes land."""
    calls: list[int] = []

    def fake_nowait(fd, views, offset):
        calls.append(len(views))
        if not nowait:
            raise OSError(errno.EOPNOTSUPP, "not here")
        return os.pwritev(fd, views, offset)

    monkeypatch.setattr(blk_image, "pwritev_nowait", fake_nowait)
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 * MiB))
    requests = [(blk.VIRTIO_BLK_T_OUT, 0, 256, "scattered", True, "ok"),
                (blk.VIRTIO_BLK_T_OUT, 0, 200, "mixed", True, "ok"),
                (VIRTIO_BLK_T_IN, 512, 256, "adjacent", True, "ok"),
                (blk.VIRTIO_BLK_T_OUT, 2000, 24, "odd", False, "ok")]
    trio.run(_serve_many, requests, str(path), ",writeback")
    # one iovec per page (scattered), per contiguous run (mixed), per 512-byte piece (odd)
    assert (calls[::2] == [256, 24] and 1 < calls[1] < 200) if nowait else calls == [256]


# -- big sequential reads, copied on two CPUs (virtio/blk/io/copier.py) -------------------------

@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("big") / "disk.img"
    path.write_bytes(os.urandom(16 * MiB))
    return str(path)


async def _read_all(image: str, reqs: list[tuple[int, int]]) -> None:
    """Post every (sector, length) read at once and check each buffer against the image."""
    mem = GuestMemory(128 * MiB)
    try:
        async with rig(mem, image, data_size=64 * MiB) as r:  # no buffer reused
            heads = [r.drv.add_chain([_HDR.pack(VIRTIO_BLK_T_IN, 0, s)], [n, 1], publish=False)
                     for s, n in reqs]
            r.drv.add_many(heads)
            r.dev.queue_notify(0)
            used = dict(await wait_used(r.drv, len(heads)))
            with open(image, "rb") as f:
                for head, (sector, n) in zip(heads, reqs, strict=True):
                    f.seek(sector * 512)
                    out = r.drv.written(head)
                    assert used[head] == n + 1 and out[-1] == VIRTIO_BLK_S_OK
                    assert out[:-1] == f.read(n), f"read at sector {sector} has wrong data"
    finally:
        mem.close()


def _copier_calls(monkeypatch, result=None) -> list[tuple[str, int]]:
    """Record (thread name, bytes asked) of every copy the copier thread makes; with
    ``result`` set, each returns that instead of reading (a page-cache miss: -1; a short
    read: fewer bytes than asked, so 4096 for a half of 4096 bytes becomes 3584)."""
    from devicemodel.virtio.blk.io import copier

    calls: list[tuple[str, int]] = []
    real = copier.preadv_nowait

    def spy(fd, views, offset):
        import threading

        asked = sum(len(v) for v in views)
        calls.append((threading.current_thread().name, asked))
        if result is None:
            return real(fd, views, offset)
        return result if result < asked else asked - 512  # never a whole read it did not do

    monkeypatch.setattr(copier, "preadv_nowait", spy)
    return calls


async def test_big_sequential_reads_are_copied_on_two_cpus(big_image, monkeypatch):
    calls = _copier_calls(monkeypatch)
    # 24 sequential 128 KiB reads: groups of 2 MiB and 1 MiB, read as a pair
    await _read_all(big_image, [(256 * k, 128 * 1024) for k in range(24)])
    assert calls == [("virtio-blk-copy", 2 * MiB)], calls
    calls.clear()
    # one 1 MiB group alone is split in two halves
    await _read_all(big_image, [(2048 + 256 * k, 128 * 1024) for k in range(8)])
    assert calls == [("virtio-blk-copy", 512 * 1024)], calls


async def test_one_big_scattered_read_is_split_in_halves(big_image, monkeypatch):
    """Linux's 1 MiB read: one request whose data is 64 pages apart in guest RAM."""
    from devicemodel.virtio.mock import Buffer

    calls = _copier_calls(monkeypatch)
    mem = GuestMemory(128 * MiB)
    try:
        async with rig(mem, big_image, data_size=8 * MiB) as r:
            hdr = r.drv.alloc(16)
            mem.write(hdr, _HDR.pack(VIRTIO_BLK_T_IN, 0, 4096))
            pages = []
            for _ in range(64):
                pages.append(r.drv.alloc(16384))
                r.drv.alloc(4096)  # a gap: nothing merges
            status = r.drv.alloc(1)
            head = r.drv.add_buffers([Buffer(hdr, 16, False)]
                                     + [Buffer(p, 16384, True) for p in pages]
                                     + [Buffer(status, 1, True)], indirect=True)
            r.dev.queue_notify(0)
            assert await wait_used(r.drv, 1) == [(head, MiB + 1)]
            with open(big_image, "rb") as f:
                f.seek(4096 * 512)
                assert r.drv.written(head) == f.read(MiB) + bytes([VIRTIO_BLK_S_OK])
    finally:
        mem.close()
    assert calls == [("virtio-blk-copy", 512 * 1024)], calls


async def test_a_copy_the_page_cache_cannot_serve_falls_back(big_image, monkeypatch):
    calls = _copier_calls(monkeypatch, result=-1)
    await _read_all(big_image, [(256 * k, 128 * 1024) for k in range(24)])
    assert len(calls) == 1  # and its requests were served by the slow path, correctly


_big_reads = st.lists(
    st.tuples(st.sampled_from([512, 4096, 65536, 128 * 1024, 256 * 1024 + 512, 1 * MiB]),
              st.sampled_from([0, 0, 0, 1, 8, -1])),  # sectors skipped before (-1: restart)
    min_size=1, max_size=24,
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # a context per example
@given(reads=_big_reads, result=st.sampled_from([None, None, -1, 0, 4096]))
def test_mixed_big_and_small_reads_land_right(big_image, monkeypatch, reads, result):
    """Sequential runs of any sizes, broken anywhere; the copier's read whole, failed or
    short: every buffer gets the image's bytes."""
    with monkeypatch.context() as m:
        _copier_calls(m, result)
        sector, reqs = 0, []
        for n, skip in reads:
            sector = 0 if skip < 0 else sector + skip
            if (sector * 512 + n) > 16 * MiB:
                sector = 0
            reqs.append((sector, n))
            sector += n // 512
        trio.run(_read_all, big_image, reqs)
