"""The split virtqueue (virtio 1.2 §2.7): a small queue type and a descriptor-chain walker.

The guest is untrusted. Every ring and buffer address is checked against guest RAM
(``MemoryMap.view``'s bounds and 2^64 wrap checks; for buffers in the RAM below or above
the PCI hole the walker does the same comparison inline, from ``MemoryMap.spans``, and
maps views only when asked), chains are walked with hard limits (index < size, at most
``size`` direct descriptors, one level of indirection, device-readable before
device-writable), and anything malformed raises :class:`VirtqueueError`. The device turns
that into DEVICE_NEEDS_RESET for itself only (``VirtioDevice.fail``).

Rings are mapped once, at :meth:`Virtqueue.start`, as memoryviews of guest RAM; the hot
path is ``struct.Struct`` on those views, never construct (design.md §6).

Torn indices: ``struct.pack_into`` zeroes its destination before packing, so a driver
on another CPU could read an index stored that way as 0 (seen: used.idx read as 0 mid-run).
Ring fields a driver reads while we write them go through a ``'H'`` cast: one store.

Memory ordering: the device model runs on x86 (TSO), where stores are not reordered with
stores nor loads with loads. The one reordering that matters is a load passing an earlier
store (publishing used.idx, then reading used_event; writing avail_event, then re-reading
avail.idx). :func:`_full_barrier` orders those with a locked instruction (a lock
acquire/release), as ``mb()`` does in C.
"""

from __future__ import annotations

import ctypes
import struct
import threading

from ..memory import GuestMemoryError, MemoryMap
from .bulk import Bulk, bulk_of
from .chain import DescriptorChain
from .hot_ring import DESC as _DESC
from .hot_ring import TABLE3 as _TABLE3
from .hot_ring import USED_ELEM as _USED_ELEM
from .hot_ring import HotRing

# Descriptor flags (§2.7.5)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags (§2.7.6, §2.7.8)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

#: Largest split queue the spec allows.
MAX_QUEUE_SIZE = 32768
#: Most entries an indirect table may have. The spec lets a table be as long as the
#: driver likes; a bound keeps one hostile request from pinning the event loop.
MAX_INDIRECT = 1024

_U16 = struct.Struct("<H")

#: Linux's most common block request: one ring descriptor → a 3-entry indirect table in
#: the RAM at GPA 0 (16-byte readable header, one data buffer, 1-byte writable status):
#: (head, header, data, data length, data device-writable, status), all checked in RAM.
Triple = tuple[int, int, int, int, bool, int]

#: a locked instruction's worth of full memory barrier: acquire, then release (``mb()``)
barrier_lock = threading.Lock()

#: ``struct.Struct`` for a whole indirect table of n descriptors, by n (at most MAX_INDIRECT).
_TABLES: dict[int, struct.Struct] = {}
#: (1, 2, ..., n-1) by n: the ``next`` fields of a table that is chained in order.
_IN_ORDER: dict[int, tuple[int, ...]] = {}


def _table_struct(n: int) -> struct.Struct:
    s = _TABLES.get(n)
    if s is None:
        s = _TABLES[n] = struct.Struct("<" + "QIHH" * n)
        _IN_ORDER[n] = tuple(range(1, n))
    return s


#: ``struct.Struct`` for n used elements in a row, by n
_USED_RUNS: dict[int, struct.Struct] = {}


def _full_barrier() -> None:
    """A full memory barrier (a locked read-modify-write on x86)."""
    barrier_lock.acquire()
    barrier_lock.release()


class VirtqueueError(Exception):
    """The driver broke the virtqueue (or device request) protocol.

    Raised for malformed rings, descriptors and requests; the device that sees it stops
    and signals DEVICE_NEEDS_RESET. Never raised for host-side I/O errors.
    """


class Virtqueue:
    """One split virtqueue, configured by the transport and driven by the device.

    The transport writes ``size``, ``desc_addr``, ``avail_addr``, ``used_addr`` and
    ``ready`` as the driver programs them (``size`` starts at ``max_size``), then the device
    calls :meth:`start` when the driver sets DRIVER_OK. ``last_avail_idx`` and ``used_idx``
    are the device's ring positions; a vhost-user back end sets both from
    SET_VRING_BASE before :meth:`start` and reads ``last_avail_idx`` for GET_VRING_BASE.
    """

    __slots__ = (
        "mem", "index", "max_size", "size", "desc_addr", "avail_addr", "used_addr", "ready",
        "last_avail_idx", "used_idx", "event_idx", "indirect", "signalled_used",
        "_desc", "_avail", "_avail16", "_used", "_used16", "_mask", "_used_event_off",
        "_avail_event_off", "started", "_nudged_at",
        "_lo_end", "_lo_view", "_lo_base", "_hi_start", "_hi_end", "_hi_view",
    )

    def __init__(self, mem: MemoryMap, index: int, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two in 1..32768")
        self.mem = mem
        self.index = index
        self.max_size = max_size
        self.size = max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.ready = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.event_idx = False
        self.indirect = False
        self.started = False
        self.signalled_used = 0
        self._nudged_at = -1  # the used idx an interrupt was last re-sent for
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._avail16: memoryview | None = None  # the avail ring as u16s
        self._used: memoryview | None = None
        self._used16: memoryview | None = None  # the used ring as u16s: one store each
        self._mask = 0
        self._used_event_off = 0
        self._avail_event_off = 0
        # the RAM below and above the PCI hole (``MemoryMap.spans``), for inlined bounds
        # checks in the walker; lo_end -1 / hi_start > hi_end: use ``mem.view``
        self._lo_end = -1
        self._lo_view: memoryview | None = None
        self._lo_base = -1  # host address of GPA 0 (bulk.py), -1: unknown
        self._hi_start = 1
        self._hi_end = 0
        self._hi_view: memoryview | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the power-on state (device reset): unconfigured, not ready."""
        self.size = self.max_size
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.ready = False
        self.last_avail_idx = self.used_idx = 0
        self.stop()

    def stop(self) -> None:
        """Forget the ring mappings; the configuration and positions stay."""
        self.started = False
        self._desc = self._avail = self._avail16 = self._used = self._used16 = None
        self._lo_end = self._lo_base = -1
        self._lo_view = None
        self._hi_start, self._hi_end, self._hi_view = 1, 0, None

    def start(self, *, event_idx: bool, indirect: bool) -> None:
        """Validate the ring addresses and map the rings (at DRIVER_OK).

        ``event_idx`` and ``indirect`` say whether VIRTIO_F_EVENT_IDX and
        VIRTIO_F_INDIRECT_DESC were negotiated. Raises :class:`VirtqueueError` when the
        driver's queue configuration is unusable.
        """
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtqueueError(f"queue {self.index}: size {size} is not a power of two "
                                 f"up to {self.max_size}")
        if self.desc_addr & 15 or self.avail_addr & 1 or self.used_addr & 3:
            raise VirtqueueError(f"queue {self.index}: misaligned ring address")
        try:
            self._desc = self.mem.view(self.desc_addr, 16 * size)
            self._avail = self.mem.view(self.avail_addr, 6 + 2 * size)
            self._used = self.mem.view(self.used_addr, 6 + 8 * size)
            self._used16 = self._used.cast("H")
            self._avail16 = self._avail.cast("H")  # flags, idx, ring[size], used_event
        except GuestMemoryError as e:
            self.stop()
            raise VirtqueueError(f"queue {self.index}: ring outside guest RAM ({e})") from None
        spans = list(self.mem.spans() or ())
        if spans and spans[0][0] == 0:
            _, self._lo_end, self._lo_view = spans.pop(0)
            try:  # the view keeps the mapping alive until stop()
                self._lo_base = ctypes.addressof(ctypes.c_char.from_buffer(self._lo_view))
            except (TypeError, ValueError):  # read-only or empty: no bulk requests
                self._lo_base = -1
        if spans:
            self._hi_start, self._hi_end, self._hi_view = spans[0]
        self._mask = size - 1
        self._used_event_off = 4 + 2 * size
        self._avail_event_off = 4 + 8 * size
        self.event_idx = event_idx
        self.indirect = indirect
        self.signalled_used = self._nudged_at = self.used_idx
        self.started = True

    def hot_ring(self) -> HotRing | None:
        """The ring's views for an inlined hot path; None unless started with its
        RAM at GPA 0 mapped (``HotRing``)."""
        avail16, desc, low, used, used16 = (self._avail16, self._desc, self._lo_view,
                                            self._used, self._used16)
        if avail16 is None or desc is None or low is None or used is None or used16 is None:
            return None
        return HotRing(avail16, desc, low, self._lo_end, used, used16, 2 + self.size,
                       self._avail_event_off >> 1)

    # -- driver → device ---------------------------------------------------------------

    def avail_idx(self) -> int:
        assert self._avail is not None
        return _U16.unpack_from(self._avail, 2)[0]

    def interrupt_unheeded(self) -> bool:
        """Whether the driver seems to wait for an interrupt it did not get: with
        EVENT_IDX, its used_event (where its handler stopped) is short of our used idx,
        by at most a ring's worth (a driver that turned interrupts off leaves used_event
        anywhere: Linux writes 0). Without EVENT_IDX the ring does not say how far the
        driver got, so never. Asked of an idle queue now and then: a guest whose memory
        barriers are missing (QEMU TCG before 8.1 elides them with one vCPU) can miss
        the interrupt the ring protocol promised it, and would wait forever. True at
        most once per used idx."""
        avail, used_idx = self._avail, self.used_idx
        if avail is None or not self.event_idx or used_idx == self._nudged_at:
            return False
        short = (used_idx - _U16.unpack_from(avail, self._used_event_off)[0]) & 0xFFFF
        if 0 < short <= self.size:
            self._nudged_at = used_idx
            return True
        return False

    def describe(self) -> str:
        """Both sides' ring indices in one line, for a stall report: whether the driver
        made buffers available that we have not taken (a lost kick), or we used buffers
        it was not told of (a lost interrupt), or neither (nothing was in flight)."""
        avail, used16 = self._avail, self._used16
        if avail is None or used16 is None:
            return f"queue {self.index}: not started"
        try:
            flags, avail_idx = _U16.unpack_from(avail, 0)[0], _U16.unpack_from(avail, 2)[0]
            used_event = _U16.unpack_from(avail, self._used_event_off)[0]
            used_flags, used_idx = used16[0], used16[1]
            avail_event = used16[self._avail_event_off >> 1]
        except (ValueError, IndexError, OSError) as e:  # the memory went away
            return f"queue {self.index}: rings unreadable ({e})"
        return (f"queue {self.index}: size {self.size}, event_idx {int(self.event_idx)}; "
                f"avail idx {avail_idx} flags {flags:#x}, popped to {self.last_avail_idx}, "
                f"avail_event {avail_event}; used idx {used_idx} flags {used_flags:#x} "
                f"(ours {self.used_idx}), used_event {used_event}, last interrupt check at "
                f"{self.signalled_used}")

    def has_available(self) -> bool:
        """True if the driver has made buffers available that we have not popped."""
        if self._avail is None:
            return False
        return _U16.unpack_from(self._avail, 2)[0] != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None if the ring is empty (or not started)."""
        avail = self._avail
        if avail is None:
            return None
        idx = _U16.unpack_from(avail, 2)[0]
        pending = (idx - self.last_avail_idx) & 0xFFFF
        if not pending:
            return None
        if pending > self.size:
            raise VirtqueueError(
                f"queue {self.index}: avail idx {idx} is {pending} ahead of {self.last_avail_idx}"
                f" (queue size {self.size})"
            )
        slot = self.last_avail_idx & self._mask
        head = _U16.unpack_from(avail, 4 + 2 * slot)[0]
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def _pending(self, avail: memoryview) -> int:
        """How many chains the driver made available that we have not popped."""
        last = self.last_avail_idx
        idx = _U16.unpack_from(avail, 2)[0]
        pending = (idx - last) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"queue {self.index}: avail idx {idx} is {pending} ahead of {last}"
                f" (queue size {self.size})"
            )
        return pending

    def pop_batch(self, limit: int) -> list[DescriptorChain]:
        """Up to ``limit`` available chains in ring order, [] if none (or not started).

        A malformed chain after good ones ends the batch and stays at the front of the
        ring, so the next call raises for it: the good requests before it still get served.
        """
        avail = self._avail
        if avail is None:
            return []
        pending = self._pending(avail)
        last = self.last_avail_idx
        mask = self._mask
        walk = self._walk
        unpack = _U16.unpack_from
        chains: list[DescriptorChain] = []
        # Linux's usual request: one ring descriptor pointing at an indirect table in the
        # RAM at GPA 0; checked here without the general walk's set-up (same rules).
        lo = self._lo_view if self.indirect else None
        lo_end, size, desc = self._lo_end, self.size, self._desc
        unpack_desc, whole = _DESC.unpack_from, self._whole_table
        try:
            for _ in range(min(pending, limit)):
                head = unpack(avail, 4 + 2 * (last & mask))[0]
                chain = None
                if lo is not None and head < size:
                    addr, length, flags, _ = unpack_desc(desc, 16 * head)  # type: ignore[arg-type]
                    if (flags == VIRTQ_DESC_F_INDIRECT and not length & 15
                            and 32 <= length <= 16 * MAX_INDIRECT and addr + length <= lo_end):
                        chain = whole(head, lo[addr : addr + length], length >> 4)
                chains.append(chain or walk(head))
                last = (last + 1) & 0xFFFF
        except VirtqueueError:
            if not chains:
                raise
        self.last_avail_idx = last
        return chains

    def pop_batch_triples(self, limit: int) -> list[DescriptorChain | Triple | Bulk]:
        """:meth:`pop_batch`, except that a chain shaped as a :data:`Triple` comes back as
        that tuple, checked with one unpack and no chain object (a block device's hot path:
        its per-request Python work is most of a cached 4 KiB read's cost), and a bigger
        table of the same shape as a :class:`~.bulk.Bulk`. The heads are read in one slice
        of the avail ring (after its index, as one by one: x86 keeps loads in order)."""
        avail, avail16, lo = self._avail, self._avail16, self._lo_view
        if avail is None or avail16 is None or lo is None or not self.indirect:
            return self.pop_batch(limit)  # type: ignore[return-value]
        n = min(self._pending(avail), limit)
        last = self.last_avail_idx
        size, desc, lo_end, base = self.size, self._desc, self._lo_end, self._lo_base
        first = 2 + (last & self._mask)  # ring[i] is u16 number 2 + i, used_event follows
        heads = avail16[first : min(first + n, 2 + size)].tolist()
        if len(heads) < n:  # the batch wraps around the ring's end
            heads += avail16[2 : 2 + n - len(heads)].tolist()
        unpack_desc, unpack_table = _DESC.unpack_from, _TABLE3.unpack_from
        out: list[DescriptorChain | Triple | Bulk] = []
        append = out.append
        try:
            for head in heads:
                if head < size:
                    addr, length, flags, _ = unpack_desc(desc, head << 4)  # type: ignore[arg-type]
                    if flags == VIRTQ_DESC_F_INDIRECT and length == 48 and addr + 48 <= lo_end:
                        a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _ = unpack_table(lo, addr)
                        # header readable → data (either way) → status writable, in order
                        if (l0 == 16 and f0 == VIRTQ_DESC_F_NEXT and n0 == 1 and n1 == 2
                                and l2 == 1 and f2 == VIRTQ_DESC_F_WRITE
                                and f1 & ~VIRTQ_DESC_F_WRITE == VIRTQ_DESC_F_NEXT
                                and a0 + 16 <= lo_end and a1 + l1 <= lo_end and a2 < lo_end):
                            append((head, a0, a1, l1, f1 != VIRTQ_DESC_F_NEXT, a2))
                            continue
                    elif (flags == VIRTQ_DESC_F_INDIRECT and not length & 15 and base >= 0
                            and 64 <= length <= 16 * MAX_INDIRECT and addr + length <= lo_end):
                        bulk = bulk_of(head, bytes(lo[addr : addr + length]), lo_end, base)
                        if bulk is not None:
                            append(bulk)
                            continue
                append(self._walk(head))
        except VirtqueueError:
            if not out:
                raise
        self.last_avail_idx = (last + len(out)) & 0xFFFF
        return out

    def chain_of(self, t: Triple | Bulk) -> DescriptorChain:
        """The :class:`DescriptorChain` of a :data:`Triple` or a :class:`~.bulk.Bulk`
        (for the general path)."""
        if isinstance(t, Bulk):
            nread = 1 if t.to_driver else len(t.lens) - 1
            rlen = sum(t.lens[:nread])
            return DescriptorChain(t.head, t.addrs, t.lens, nread, rlen, t.length + 17 - rlen,
                                   True, self)
        head, hdr, data, dlen, writable, status = t
        if writable:
            return DescriptorChain(head, (hdr, data, status), (16, dlen, 1), 1, 16, dlen + 1,
                                   True, self)
        return DescriptorChain(head, (hdr, data, status), (16, dlen, 1), 2, 16 + dlen, 1,
                               True, self)

    def undo_pop(self, count: int = 1) -> None:
        """Give back the last ``count`` popped chains (e.g. rx buffers a frame did not need)."""
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF

    @property
    def low_ram(self) -> tuple[int, memoryview | None]:
        """(end, view) of the RAM at GPA 0 while started, else (-1, None): a hot path may
        index ``view`` at a validated chain's addresses once it has checked ``< end``."""
        return self._lo_end, self._lo_view

    def map_buffer(self, addr: int, length: int) -> memoryview:
        """A memoryview of guest RAM [addr, addr+length) (GuestMemoryError if not RAM)."""
        end = addr + length
        if addr >= 0 and end <= self._lo_end:
            return self._lo_view[addr:end]  # type: ignore[index]
        hs = self._hi_start
        if hs <= addr and end <= self._hi_end:
            return self._hi_view[addr - hs : end - hs]  # type: ignore[index]
        return self.mem.view(addr, length)

    def _walk(self, head: int) -> DescriptorChain:
        """Validate one chain. A buffer in the RAM below or above the PCI hole is checked
        inline; anything else (or a memory map that vets accesses) through ``mem.view``.
        An indirect table chained in order (as Linux builds them) is checked whole."""
        size = self.size
        if head >= size:
            raise VirtqueueError(f"queue {self.index}: head index {head} >= size {size}")
        table = self._desc
        assert table is not None
        lo_end = self._lo_end
        unpack = _DESC.unpack_from
        limit = size
        indirect_table = False
        addrs: list[int] = []
        lens: list[int] = []
        nreadable = 0
        rlen = wlen = 0
        low = True
        i = head
        count = 0
        try:
            while True:
                count += 1
                if count > limit:
                    raise VirtqueueError(
                        f"queue {self.index}: chain at {head} loops or exceeds {limit} descriptors"
                    )
                addr, length, flags, nxt = unpack(table, 16 * i)
                if flags & VIRTQ_DESC_F_INDIRECT:
                    if indirect_table:
                        raise VirtqueueError(f"queue {self.index}: nested indirect table")
                    if not self.indirect:
                        raise VirtqueueError(
                            f"queue {self.index}: indirect descriptor without INDIRECT_DESC"
                        )
                    if flags & VIRTQ_DESC_F_NEXT:
                        raise VirtqueueError(f"queue {self.index}: indirect descriptor with NEXT")
                    n = length // 16
                    if length % 16 or not 0 < n <= MAX_INDIRECT:
                        raise VirtqueueError(
                            f"queue {self.index}: indirect table length {length} is invalid"
                        )
                    table = self.mem.view(addr, length)
                    if count == 1 and n > 1:
                        chain = self._whole_table(head, table, n)
                        if chain is not None:
                            return chain
                    indirect_table = True
                    limit = n
                    size = n
                    count = 0
                    i = 0
                    continue
                # addr and length are unsigned, so end <= lo_end means inside [0, lo_end)
                end = addr + length
                if end > lo_end:
                    low = False
                    if not (self._hi_start <= addr and end <= self._hi_end):
                        self.mem.view(addr, length)  # raises GuestMemoryError unless it is RAM
                if flags & VIRTQ_DESC_F_WRITE:
                    wlen += length
                else:
                    if len(addrs) != nreadable:
                        raise VirtqueueError(
                            f"queue {self.index}: readable descriptor after a writable one"
                        )
                    nreadable += 1
                    rlen += length
                addrs.append(addr)
                lens.append(length)
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                if nxt >= size:
                    raise VirtqueueError(f"queue {self.index}: next index {nxt} >= {size}")
                i = nxt
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: buffer outside guest RAM ({e})") from None
        return DescriptorChain(head, addrs, lens, nreadable, rlen, wlen, low, self)

    def _whole_table(self, head: int, table: memoryview, n: int) -> DescriptorChain | None:
        """The chain of an indirect table whose entries are chained in order (0 → 1 → … →
        n-1: NEXT on all but the last, readable ones first, no other flag) and all lie in
        the RAM at GPA 0, checked with one unpack and C-level comparisons; None for any
        other table, which the general walk then handles (and rejects if it must)."""
        flat = _table_struct(n).unpack_from(table)
        if flat[3::4][:-1] != _IN_ORDER[n]:
            return None
        flags = flat[2::4]
        last = flags[-1]
        nreadable = flags.count(VIRTQ_DESC_F_NEXT)  # readable ones; the last is counted below
        if (flags.count(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE) + nreadable != n - 1
                or flags[:nreadable].count(VIRTQ_DESC_F_NEXT) != nreadable):
            return None
        if last == 0:
            if nreadable != n - 1:
                return None
            nreadable = n
        elif last != VIRTQ_DESC_F_WRITE:
            return None
        addrs = flat[0::4]
        lens = flat[1::4]
        if max(addrs) + max(lens) > self._lo_end:  # a bound on every addr + len
            return None
        rlen = sum(lens[:nreadable])
        return DescriptorChain(head, addrs, lens, nreadable, rlen, sum(lens) - rlen, True, self)

    # -- device → driver ---------------------------------------------------------------

    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written to its writable buffers."""
        used, used16 = self._used, self._used16
        if used is None or used16 is None:
            return  # the queue was reset under us: the chain is gone with it
        _USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx & self._mask), head,
                             written & 0xFFFF_FFFF)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        used16[1] = self.used_idx  # used.idx, one store

    def add_used_batch(self, entries: list[tuple[int, int]]) -> None:
        """:meth:`add_used` for every (head, written) pair, publishing used.idx once."""
        self.add_used_flat([v for entry in entries for v in entry])

    def add_used_flat(self, flat: list[int]) -> None:
        """:meth:`add_used_batch` of the pairs laid flat: head, written, head, written…"""
        used, used16 = self._used, self._used16
        if used is None or used16 is None or not flat:
            return
        mask = self._mask
        idx = self.used_idx
        start, n = idx & mask, len(flat) >> 1
        if start + n <= self.size:  # one pack for the whole run (no wrap in between)
            run = _USED_RUNS.get(n) or _USED_RUNS.setdefault(n, struct.Struct("<" + "II" * n))
            try:
                run.pack_into(used, 4 + 8 * start, *flat)
            except struct.error:  # a length of 4 GiB or more: its low 32 bits, as add_used
                run.pack_into(used, 4 + 8 * start, *[v & 0xFFFF_FFFF for v in flat])
            idx = (idx + n) & 0xFFFF
        else:
            pack = _USED_ELEM.pack_into
            for i in range(0, 2 * n, 2):
                pack(used, 4 + 8 * (idx & mask), flat[i], flat[i + 1] & 0xFFFF_FFFF)
                idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        used16[1] = idx  # used.idx, after the elements: x86 does not reorder stores

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added since last asked.

        Call after a batch of :meth:`add_used`; with EVENT_IDX this consumes the batch.
        """
        if self._used is None:
            return False
        assert self._avail is not None
        _full_barrier()
        if self.event_idx:
            used_event = _U16.unpack_from(self._avail, self._used_event_off)[0]
            new = self.used_idx
            old = self.signalled_used
            self.signalled_used = new
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not _U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> bool:
        """Ask the driver to kick us for new buffers; True if some arrived meanwhile.

        A worker calls this before sleeping and goes on instead if it returns True: the
        driver may have added buffers before it saw the request.
        """
        used16 = self._used16
        if used16 is None:
            return False
        if self.event_idx:
            used16[self._avail_event_off >> 1] = self.last_avail_idx
        else:
            used16[0] &= ~VIRTQ_USED_F_NO_NOTIFY
        _full_barrier()
        return self.has_available()

    def disable_notification(self) -> None:
        """Tell the driver it need not kick us (we are polling the ring anyway)."""
        used16 = self._used16
        if used16 is None or self.event_idx:
            return  # with EVENT_IDX a stale avail_event already suppresses kicks
        used16[0] |= VIRTQ_USED_F_NO_NOTIFY
