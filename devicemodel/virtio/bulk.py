"""A big block request checked and turned into a ``struct iovec`` array with no Python
work per descriptor.

Linux sends a large virtio-blk read or write as one indirect table: a 16-byte readable
header, up to seg_max data pages (all device-writable for a read, all readable for a
write), a 1-byte writable status, chained 0 → 1 → … in order. Walked entry by entry,
then turned into one memoryview per page, a 256-entry table cost about 125 µs of Python
against a 115 µs copy. Here the table's bytes (one snapshot: the guest may rewrite the
table meanwhile, we only ever look at the copy) are checked with C-level comparisons of
strided views, and the data descriptors become the iovec array by integer arithmetic
on the whole run: a descriptor (addr u64, len u32, flags u16, next u16) with flags and
next masked off *is* a ``struct iovec`` (base u64, len u64) once the host address of
guest-physical 0 is added to its address. Bounds: every address plus every length
(the largest of each) lies below the end of the RAM at GPA 0, so every iovec is inside
that mapping. Anything else is left to the general walker, which applies the same rules.
"""

from __future__ import annotations

import operator
import struct
from functools import lru_cache

VIRTQ_DESC_F_NEXT = 1  # (virtio 1.2 §2.7.5; queue.py, which imports this module, has them too)
VIRTQ_DESC_F_WRITE = 2


class Bulk:
    """A request of that shape: head, its buffers (as the walker lists them), whether
    the data is device-writable (a read), the data's length, and the iovec array of its
    data buffers (``count`` entries)."""

    __slots__ = ("head", "addrs", "lens", "to_driver", "length", "iov", "count")

    def __init__(self, head: int, addrs: list[int], lens: list[int], to_driver: bool,
                 length: int, iov: bytes) -> None:
        self.head, self.addrs, self.lens = head, addrs, lens
        self.to_driver, self.length, self.iov = to_driver, length, iov
        self.count = len(lens) - 2


#: every table size Linux may send (4 … MAX_INDIRECT entries) has its own entry: a stream
#: whose pages merge into segments sends tables of many sizes, and a miss costs ~10 µs
_SIZES = 512


@lru_cache(maxsize=_SIZES)
def _expected(n: int) -> tuple[bytes, bytes]:
    """For an n-entry table chained 0 → 1 → … in order: each entry's flags and next
    (one u32: flags | next << 16; the last entry's next left out) as bytes, for a read
    and for a write."""
    nexts = [x << 16 for x in range(1, n)] + [0]
    nxt, write = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

    def words(data_flags: int) -> bytes:
        flags = [nxt] + [data_flags] * (n - 2) + [write]
        return struct.pack(f"<{n}I", *map(operator.or_, flags, nexts))[:-2]

    return words(nxt | write), words(nxt)


@lru_cache(maxsize=_SIZES)
def _lanes(count: int, base: int) -> tuple[int, int]:
    """(mask keeping addr and len of ``count`` descriptors, ``base`` in every addr)."""
    mask = int.from_bytes((b"\xff" * 12 + bytes(4)) * count, "little")
    add = int.from_bytes((base.to_bytes(8, "little") + bytes(8)) * count, "little")
    return mask, add


def bulk_of(head: int, raw: bytes, lo_end: int, base: int) -> Bulk | None:
    """The :class:`Bulk` of table bytes ``raw`` (n ≥ 4 entries), or None if the table
    is not exactly that shape in the RAM below ``lo_end`` (mapped at host ``base``)."""
    n = len(raw) >> 4
    words = memoryview(raw).cast("I")
    # every entry's flags | next << 16 (but the last one's next, which nothing follows)
    shape = words[3::4].tobytes()[:-2]
    reads, writes = _expected(n)
    if shape == reads:
        to_driver = True
    elif shape == writes:
        to_driver = False
    else:
        return None
    lens = words[2::4].tolist()
    if lens[0] != 16 or lens[-1] != 1:
        return None
    addrs = memoryview(raw).cast("Q")[0::2].tolist()
    if max(addrs) + max(lens) > lo_end:
        return None
    count = n - 2
    mask, add = _lanes(count, base)
    iov = ((int.from_bytes(raw[16 : 16 * (n - 1)], "little") & mask) + add).to_bytes(
        16 * count, "little")
    return Bulk(head, addrs, lens, to_driver, sum(lens) - 17, iov)


__all__ = ["Bulk", "bulk_of"]
