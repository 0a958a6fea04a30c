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
