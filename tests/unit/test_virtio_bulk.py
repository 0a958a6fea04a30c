"""virtio/bulk.py: a big blk request's table turned into iovecs with no per-entry Python.

The data must land exactly where the general path (walker + memoryviews) puts it, and
every table that is not exactly Linux's shape, or reaches past the RAM, is refused (the
walker then applies its own rules: tests/fuzz/test_fuzz_rings_raw.py checks the two
agree on the chains)."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.memory import GuestMemory
from devicemodel.virtio.blk.io.image import DiskImage
from devicemodel.virtio.bulk import bulk_of
from devicemodel.virtio.queue import Virtqueue

MiB = 1 << 20
HDR, STATUS = 0x20_0000, 0x20_0100


@pytest.fixture
def ram():  # noqa: ANN201
    mem = GuestMemory(128 * MiB, name="bulk-test")
    q = Virtqueue(mem, 0, 256)
    q.desc_addr, q.avail_addr, q.used_addr = 0x10000, 0x11000, 0x12000
    q.start(event_idx=True, indirect=True)
    yield mem, q
    q.stop()
    mem.close()


def _table(pages: list[int], write: bool, size: int = 4096) -> list[list[int]]:
    data_flags = 1 if write else 3
    return ([[HDR, 16, 1, 1]] + [[p, size, data_flags, j + 2] for j, p in enumerate(pages)]
            + [[STATUS, 1, 2, 0]])


def _raw(entries: list[list[int]]) -> bytes:
    return b"".join(struct.pack("<QIHH", *e) for e in entries)


@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("n", [4, 17, 256])
def test_data_lands_where_the_walker_says(ram, tmp_path, write, n):
    mem, q = ram
    lo_end, lo = q.low_ram
    rnd = random.Random(n)
    pages = [p << 12 for p in rnd.sample(range(0x400, 0x7000), n - 2)]
    b = bulk_of(7, _raw(_table(pages, write)), lo_end, q._lo_base)
    assert b is not None and (b.head, b.count, b.to_driver) == (7, n - 2, not write)
    assert b.length == 4096 * (n - 2)
    chain = q.chain_of(b)
    assert list(chain.addrs) == [HDR, *pages, STATUS]
    assert (chain.nreadable, chain.writable_len) == ((n - 1, 1) if write else (1, b.length + 1))
    path = tmp_path / "img"
    content = os.urandom(8 * MiB)
    path.write_bytes(content if not write else bytes(8 * MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        image = DiskImage(fd, 8 * MiB)
        if write:
            for i, p in enumerate(pages):
                lo[p : p + 4096] = content[i * 4096 : (i + 1) * 4096]
        assert image.transfer_iov(write, b.iov, b.count, 4096, b.length, sync=True)
        disk = path.read_bytes()
        for i, p in enumerate(pages):
            want = content[4096 + i * 4096 : 8192 + i * 4096] if not write else \
                content[i * 4096 : (i + 1) * 4096]
            got = bytes(lo[p : p + 4096]) if not write else disk[4096 * (i + 1) : 4096 * (i + 2)]
            assert got == want, f"page {i}"
    finally:
        os.close(fd)


@pytest.mark.parametrize("entry,field,value,why", [
    (-1, 1, 16, "a status longer than one byte (the general path writes its last byte)"),
    (0, 1, 15, "a short header"),
    (1, 3, 3, "a chain that skips an entry"),
    (2, 2, 1, "a readable page among writable ones"),
    (-1, 2, 3, "a status with NEXT"),
    (2, 0, 128 * MiB - 4095, "a page past the end of RAM"),
    (1, 1, 0xFFFF_FFFF, "a length past the end of RAM"),
    (1, 2, 3 | 4, "an indirect flag inside the table"),
])
def test_anything_else_is_left_to_the_walker(ram, entry, field, value, why):
    mem, q = ram
    lo_end, _ = q.low_ram
    entries = _table([0x40_0000 + 4096 * i for i in range(4)], False)
    entries[entry][field] = value
    assert bulk_of(0, _raw(entries), lo_end, q._lo_base) is None, why


def _reference(raw: bytes, lo_end: int,
               base: int) -> tuple[bool, int, list[tuple[int, int]]] | None:
    """bulk_of's rules, entry by entry: (to_driver, length, iovecs) or None."""
    n = len(raw) // 16
    ents = [struct.unpack_from("<QIHH", raw, 16 * i) for i in range(n)]
    if ents[0][1] != 16 or ents[0][2] != 1 or ents[-1][1] != 1 or ents[-1][2] != 2:
        return None
    if any(e[3] != i + 1 for i, e in enumerate(ents[:-1])):
        return None
    data_flags = {e[2] for e in ents[1:-1]}
    if data_flags not in ({3}, {1}):
        return None
    if any(a + ln > lo_end for a, ln, _, _ in ents):
        return None
    return (data_flags == {3}, sum(e[1] for e in ents[1:-1]),
            [(a + base, ln) for a, ln, _, _ in ents[1:-1]])


_END = 128 * MiB


@st.composite
def _tables(draw: st.DrawFn) -> bytes:
    """Linux's tables near the end of the RAM, some of them with one field changed."""
    n = draw(st.integers(4, 40))
    pages = draw(st.booleans())
    addr = st.one_of(st.integers(_END - 3 * 4096, _END + 16),
                     st.integers(0, 2**64 - 1), st.integers(0, _END))
    length = st.just(4096) if pages else st.one_of(st.integers(0, 2 * 4096),
                                                    st.integers(0, 2**32 - 1))
    write = draw(st.booleans())
    ents = ([[draw(addr), 16, 1, 1]]
            + [[draw(addr), draw(length), 1 if write else 3, i + 2] for i in range(n - 2)]
            + [[draw(addr), 1, 2, draw(st.sampled_from([0, n, 0xFFFF]))]])
    for _ in range(draw(st.integers(0, 2))):
        e = draw(st.integers(0, n - 1))
        f = draw(st.integers(0, 3))
        ents[e][f] = draw(st.integers(0, [2**64 - 1, 2**32 - 1, 0xFFFF, 0xFFFF][f]))
    return _raw(ents)


@settings(max_examples=500, deadline=None)
@given(raw=_tables(), base=st.integers(0, 2**47))
def test_bulk_of_agrees_with_the_rules_entry_by_entry(raw, base):
    """Hostile tables: every buffer must end inside the RAM (an iovec outside it would
    let the guest's read overwrite our own memory), exactly Linux's chain, or None."""
    want = _reference(raw, _END, base)
    b = bulk_of(3, raw, _END, base)
    if want is None:
        assert b is None
        return
    assert b is not None
    iov = [struct.unpack_from("<QQ", b.iov, 16 * i) for i in range(b.count)]
    assert (b.to_driver, b.length, iov) == want
    n = len(raw) // 16
    assert (b.hdr, b.status) == (struct.unpack_from("<Q", raw)[0],
                                 struct.unpack_from("<Q", raw, 16 * (n - 1))[0])
    assert b.addrs == [struct.unpack_from("<Q", raw, 16 * i)[0] for i in range(n)]


@pytest.mark.parametrize("page,at,ok", [
    (0, _END - 16, True), (0, _END - 15, False),  # the header
    (1, _END - 4096, True), (1, _END - 4095, False),  # a page
    (-1, _END - 1, True), (-1, _END, False),  # the status byte
])
def test_a_buffer_may_end_exactly_at_the_end_of_ram(page, at, ok):
    entries = _table([0x40_0000 + 4096 * i for i in range(4)], False)
    entries[page][0] = at
    assert (bulk_of(0, _raw(entries), _END, 0) is not None) == ok
    entries[2][1] = 512  # not whole pages: the general check
    assert (bulk_of(0, _raw(entries), _END, 0) is not None) == ok
