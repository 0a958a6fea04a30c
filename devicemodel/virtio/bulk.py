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


@lru_cache(maxsize=256)
def _expected(n: int) -> tuple[bytes, bytes]:
    """For an n-entry table chained 0 → 1 → … in order: each entry's flags and next
    (one u32: flags | next << 16; the last entry's next left out) as bytes, for a read
    and for a write."""
    nxt, write = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

    def words(data_flags: int) -> bytes:
        flags = [nxt] + [data_flags] * (n - 2) + [write]
        nexts = list(range(1, n)) + [0]
        return b"".join((f | x << 16).to_bytes(4, "little")
                        for f, x in zip(flags, nexts, strict=True))[:-2]

    return words(nxt | write), words(nxt)


@lru_cache(maxsize=64)
def _delta(n: int, to_driver: bool, base: int) -> int:
    """What turns the data descriptors of such a table, read as one integer, into their
    iovec array: ``base`` added to every addr, the (known) flags and next taken away."""
    count = n - 2
    flags = (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE) if to_driver else VIRTQ_DESC_F_NEXT
    add = remove = 0
    for i in range(count):
        add |= base << (128 * i)
        remove |= (flags | (i + 2) << 16) << (128 * i + 96)
    return add - remove


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
    # the flags and next just checked are exactly what _delta takes away: no borrow
    # crosses a field, and addr + base stays below 2**64 (addr < lo_end, mapped at base)
    iov = (int.from_bytes(raw[16 : 16 * (n - 1)], "little")
           + _delta(n, to_driver, base)).to_bytes(16 * (n - 2), "little")
    return Bulk(head, addrs, lens, to_driver, sum(lens) - 17, iov)


__all__ = ["Bulk", "bulk_of"]
