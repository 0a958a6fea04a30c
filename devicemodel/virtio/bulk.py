"""A big block request checked and turned into a ``struct iovec`` array with no Python
work per descriptor.

Linux sends a large virtio-blk read or write as one indirect table: a 16-byte readable
header, up to seg_max data pages (all device-writable for a read, all readable for a
write), a 1-byte writable status, chained 0 → 1 → … in order. Walked entry by entry,
then turned into one memoryview per page, a 256-entry table cost about 125 µs of Python
against a 115 µs copy. Here the table's bytes (one snapshot: the guest may rewrite the
table meanwhile, we only ever look at the copy) are read as one big integer, and every
check and the iovec array come from a few operations on the whole of it (masks cached
per table size), with no Python value per entry (a 128-entry table: 8.6 µs; with a list
of addresses and lengths, 18.8 µs):

- the shape: every entry's flags and next, masked out, equal those of Linux's chain;
- the bounds: in a 128-bit lane per entry (no borrow can cross lanes), each address is
  subtracted from 2**127 plus the last address its buffer may start at (the end of the
  RAM at GPA 0 less the buffer's length: 16, 4096 or 1 when the data are whole pages,
  else address and length both are); a lane keeps bit 127 exactly when its buffer ends
  inside that RAM, so every iovec lies inside that mapping;
- the iovecs: a descriptor (addr u64, len u32, flags u16, next u16) with flags and next
  masked off *is* a ``struct iovec`` (base u64, len u64) once the host address of
  guest-physical 0 is added to its address.

Anything else is left to the general walker, which applies the same rules.
"""

from __future__ import annotations

import struct
from functools import lru_cache

VIRTQ_DESC_F_NEXT = 1  # (virtio 1.2 §2.7.5; queue.py, which imports this module, has them too)
VIRTQ_DESC_F_WRITE = 2
PAGE = 4096


class Bulk:
    """A request of that shape: head, the guest addresses of its header and status byte,
    whether the data is device-writable (a read), the data's length, the iovec array of
    its data buffers (``count`` entries) and the table's bytes (the snapshot checked)."""

    __slots__ = ("head", "hdr", "status", "to_driver", "length", "iov", "count", "raw")

    def __init__(self, head: int, raw: bytes, hdr: int, status: int, to_driver: bool,
                 length: int, iov: bytes) -> None:
        self.head, self.raw, self.hdr, self.status = head, raw, hdr, status
        self.to_driver, self.length, self.iov = to_driver, length, iov
        self.count = (len(raw) >> 4) - 2

    @property
    def addrs(self) -> list[int]:
        """Every buffer's guest address (header, data…, status), for the general path."""
        return memoryview(self.raw).cast("Q")[0::2].tolist()

    @property
    def lens(self) -> list[int]:
        """Every buffer's length, likewise."""
        return memoryview(self.raw).cast("I")[2::4].tolist()


#: every table size Linux may send (4 … MAX_INDIRECT entries) has its own entry: a stream
#: whose pages merge into segments sends tables of many sizes, and a miss costs ~0.3 ms
_SIZES = 512


def _lanes(n: int, pattern: bytes) -> int:
    """``pattern`` (one entry's 16 bytes) repeated for n entries, as an integer."""
    return int.from_bytes(pattern * n, "little")


def _entries(entries: list[tuple[int, int, int, int]]) -> int:
    """Descriptors (addr, len, flags, next) laid out as a table, as an integer."""
    return int.from_bytes(b"".join(struct.pack("<QIHH", *e) for e in entries), "little")


class _Table:
    """What every n-entry table is checked against, as integers over the whole table."""

    def __init__(self, n: int, lo_end: int, base: int) -> None:
        nxt, write = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

        def chain(data_flags: int) -> int:  # flags and next of Linux's chain, 0 → 1 → …
            flags = [nxt] + [data_flags] * (n - 2) + [write]
            return _entries([(0, 0, f, i + 1 if i < n - 1 else 0) for i, f in
                             enumerate(flags)])

        # flags and next (the status byte's flags only: Linux leaves its next at n)
        self.links = _lanes(n - 1, bytes(12) + b"\xff" * 4) + (0xFFFF << (128 * n - 32))
        self.reads, self.writes = chain(nxt | write), chain(nxt)
        self.buffers = _lanes(n, b"\xff" * 12 + bytes(4))  # addr and len
        self.addrs = _lanes(n, b"\xff" * 8 + bytes(8))
        self.lens = _lanes(n, bytes(8) + b"\xff" * 4 + bytes(4))
        self.pages = _entries([(0, 16, 0, 0)] + [(0, PAGE, 0, 0)] * (n - 2) + [(0, 1, 0, 0)])
        # 2**127 plus the highest address each buffer of a page-sized table may start at;
        # and 2**127 plus the end of the RAM, for the sums address + length
        top = bytes(7) + b"\x80"
        self.starts = _entries([(lo_end - 16, 0, 0, 0)] + [(lo_end - PAGE, 0, 0, 0)] * (n - 2)
                               + [(lo_end - 1, 0, 0, 0)]) + _lanes(n, bytes(8) + top)
        self.ends = _lanes(n, lo_end.to_bytes(8, "little") + top)
        self.bit127 = _lanes(n, bytes(15) + b"\x80")
        self.base = _lanes(n, base.to_bytes(8, "little") + bytes(8))


@lru_cache(maxsize=_SIZES)
def _table(n: int, lo_end: int, base: int) -> _Table:
    return _Table(n, lo_end, base)


def bulk_of(head: int, raw: bytes, lo_end: int, base: int) -> Bulk | None:
    """The :class:`Bulk` of table bytes ``raw`` (n ≥ 4 entries), or None if the table
    is not exactly that shape in the RAM below ``lo_end`` (mapped at host ``base``)."""
    n = len(raw) >> 4
    if lo_end < PAGE:
        return None
    c = _table(n, lo_end, base)
    table = int.from_bytes(raw, "little")
    links = table & c.links
    if links == c.reads:
        to_driver = True
    elif links == c.writes:
        to_driver = False
    else:
        return None
    buffers = table & c.buffers
    if buffers & c.lens == c.pages:  # whole pages (Linux's usual): each start in the RAM
        if (c.starts - (buffers & c.addrs)) & c.bit127 != c.bit127:
            return None
        length = PAGE * (n - 2)
    else:  # each address + length in the RAM (a lane of 128 bits: no carry out of it)
        words = memoryview(raw).cast("I")
        if words[2] != 16 or words[-2] != 1:
            return None
        if (c.ends - (buffers & c.addrs) - ((buffers >> 64) & c.addrs)) & c.bit127 != c.bit127:
            return None
        length = sum(words[6 : 4 * n - 4 : 4])
    iov = (buffers + c.base).to_bytes(16 * n, "little")[16:-16]
    dwords = memoryview(raw).cast("Q")
    return Bulk(head, raw, dwords[0], dwords[-2], to_driver, length, iov)


__all__ = ["Bulk", "bulk_of"]
