"""The virtqueue and virtio-blk fast paths hold every guarantee of the vetted paths.

``Virtqueue`` checks buffers in the RAM below and above the PCI hole inline (no
``MemoryMap.view`` call) when the memory map does not vet accesses itself, and virtio-blk
serves plain reads (header, one data buffer, status byte) without the general parser,
merging sequential ones into one ``preadv``. The hostile-ring tests use ``GuardedMemory``,
which vets every access and so takes the slow paths; here the same hostile rings run on a
plain ``MemoryMap`` with the same layout, and the walker must agree with the vetted one
chain for chain.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest
import trio
from hypothesis import given
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
from devicemodel.virtio.mock import MockDriver, RecordingInterrupt, wait_used
from devicemodel.virtio.queue import Virtqueue, VirtqueueError
from tests import test_virtio_hostile as h
from tests.test_virtio_blk import rig


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


def test_plain_memory_takes_the_fast_path_and_guarded_memory_does_not():
    assert PLAIN.spans() is not None and h.MEM.spans() is None
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
    assert _outcomes(PLAIN, r) == _outcomes(h.MEM, r)


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
    h.test_hostile_rings_vs_blk.hypothesis.inner_test(image, r, rtype)


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
    real = blk._preadv_nowait

    def counting(fd, views, offset):
        calls.append(len(views))
        return real(fd, views, offset)

    monkeypatch.setattr(blk, "_preadv_nowait", counting)
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
