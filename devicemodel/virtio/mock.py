"""A mock guest driver for tests: builds split rings in guest memory and plays the driver.

Like rust-vmm virtio-queue's mock, it writes descriptor tables, avail and used rings into
a ``MemoryMap`` exactly where a driver would, so tests drive the real ``Virtqueue`` and
devices without a transport. It can also write any malformed table a hostile driver could.
``GuardedMemory`` is guest RAM with PROT_NONE guard pages around every region and a log
of every range the device model asked for, to prove nothing outside RAM is touched.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..memory import GuestMemoryError, MemoryMap
from .queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
)

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class GuardedMemory(MemoryMap):
    """Guest RAM whose regions sit between PROT_NONE pages; ``accesses`` logs every view.

    A stray access past a region would fault the process instead of silently reading
    host memory, and ``accesses`` lets a test check what was asked for. With
    ``spans=True`` it also offers :meth:`spans`, so the devices' hot paths (which slice
    the region views directly, unlogged) run against the guarded regions too.
    """

    def __init__(self, layout: Sequence[tuple[int, int]], *, spans: bool = False) -> None:
        super().__init__()
        self._offer_spans = spans
        self._maps: list[mmap.mmap] = []
        self._gstarts: list[int] = []
        self._gregions: list[tuple[int, int, memoryview]] = []
        self.accesses: list[tuple[int, int]] = []
        for gpa, size in sorted(layout):
            mm = mmap.mmap(-1, size + 2 * PAGE)
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            for addr in (base, base + PAGE + size):
                if _libc.mprotect(addr, PAGE, 0) != 0:  # PROT_NONE
                    raise OSError(ctypes.get_errno(), "mprotect guard page")
            self._maps.append(mm)
            self._gstarts.append(gpa)
            self._gregions.append((gpa, size, memoryview(mm)[PAGE : PAGE + size]))

    @property
    def layout(self) -> list[tuple[int, int]]:
        return [(g, s) for g, s, _ in self._gregions]

    def view(self, gpa: int, length: int) -> memoryview:
        self.accesses.append((gpa, length))
        if gpa < 0 or length < 0 or gpa + length > 1 << 64:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        i = bisect.bisect(self._gstarts, gpa) - 1
        if i < 0:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")
        start, size, mv = self._gregions[i]
        off = gpa - start
        if off + length > size:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not RAM")
        return mv[off : off + length]

    def spans(self) -> tuple[tuple[int, int, memoryview], ...] | None:
        if not self._offer_spans:
            return None
        return tuple((g, g + s, mv) for g, s, mv in self._gregions)

    def in_ram(self, gpa: int, length: int) -> bool:
        return any(g <= gpa and gpa + length <= g + s for g, s, _ in self._gregions)

    def snapshot(self) -> list[bytes]:
        return [bytes(mv) for _, _, mv in self._gregions]


@dataclass
class Buffer:
    """A guest buffer the mock placed: where it is and whether the device may write it."""

    addr: int
    length: int
    writable: bool


@dataclass
class Chain:
    head: int
    buffers: list[Buffer] = field(default_factory=list)
    indirect_table: int | None = None


class MockDriver:
    """The driver side of one split queue, laid out at ``base`` in ``mem``.

    Descriptors, avail and used rings come first (virtio 1.x layout, page aligned), then
    a bump allocator for buffers and indirect tables in ``[data_base, data_end)``.
    """

    def __init__(self, mem: MemoryMap, base: int, size: int = 256, *, index: int = 0,
                 data_size: int = 4 << 20, max_size: int | None = None) -> None:
        self.mem = mem
        self.size = size
        self.index = index
        self.desc_addr = base
        self.avail_addr = base + 16 * size
        self.used_addr = (self.avail_addr + 6 + 2 * size + PAGE - 1) & ~(PAGE - 1)
        ring_end = (self.used_addr + 6 + 8 * size + PAGE - 1) & ~(PAGE - 1)
        self.data_base = ring_end
        self.data_end = ring_end + data_size
        self._next = self.data_base
        self.avail_idx = 0
        self.last_used_idx = 0
        self._free = list(range(size))
        self.chains: dict[int, Chain] = {}
        self._owned: dict[int, list[int]] = {}
        self.max_size = max_size or size
        mem.view(base, self.data_end - base)[:] = bytes(self.data_end - base)

    # -- the device-side queue as a transport would configure it ----------------------

    def queue(self) -> Virtqueue:
        q = Virtqueue(self.mem, self.index, self.max_size)
        q.size = self.size
        q.desc_addr, q.avail_addr, q.used_addr = self.desc_addr, self.avail_addr, self.used_addr
        q.ready = True
        return q

    # -- allocation -------------------------------------------------------------------

    def alloc(self, length: int, align: int = 16) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + length > self.data_end:
            self._next = self.data_base  # wrap: tests keep few buffers alive at once
            addr = self._next
            if addr + length > self.data_end:
                raise MemoryError(f"mock data area too small for {length} bytes")
        self._next = addr + length
        return addr

    # -- raw ring writes (hostile tables welcome) -------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, next_: int,
                   table: int | None = None) -> None:
        base = self.desc_addr if table is None else table
        _DESC.pack_into(self.mem.view(base + 16 * i, 16), 0, addr & (2**64 - 1),
                        length & 0xFFFF_FFFF, flags & 0xFFFF, next_ & 0xFFFF)

    def set_avail_entry(self, slot: int, head: int) -> None:
        self.mem.write_u16(self.avail_addr + 4 + 2 * (slot % self.size), head)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail_addr, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_addr + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_addr + 4 + 8 * self.size)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_addr)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_addr + 2)

    # -- well-formed chains ------------------------------------------------------------

    def add_chain(self, readable: Iterable[bytes] = (), writable: Iterable[int] = (), *,
                  indirect: bool = False, publish: bool = True) -> int:
        """Place buffers (payloads to read, sizes to write) as one chain; return its head."""
        bufs: list[Buffer] = []
        for data in readable:
            addr = self.alloc(max(len(data), 1))
            self.mem.write(addr, data)
            bufs.append(Buffer(addr, len(data), False))
        for n in writable:
            addr = self.alloc(max(n, 1))
            self.mem.view(addr, n)[:] = b"\xa5" * n
            bufs.append(Buffer(addr, n, True))
        return self.add_buffers(bufs, indirect=indirect, publish=publish)

    def add_buffers(self, bufs: Sequence[Buffer], *, indirect: bool = False,
                    publish: bool = True) -> int:
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            head = self._take(1)[0]
            table = self.alloc(16 * len(bufs))
            for i, b in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.write_desc(i, b.addr, b.length, flags, i + 1, table=table)
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            self.chains[head] = Chain(head, list(bufs), table)
            self._owned[head] = [head]
        else:
            idxs = self._take(len(bufs))
            for k, (i, b) in enumerate(zip(idxs, bufs, strict=True)):
                last = k + 1 == len(bufs)
                flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (
                    0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(i, b.addr, b.length, flags, 0 if last else idxs[k + 1])
            head = idxs[0]
            self.chains[head] = Chain(head, list(bufs))
            self._owned[head] = idxs
        if publish:
            self.publish(head)
        return head

    def _take(self, n: int) -> list[int]:
        if len(self._free) < n:
            raise RuntimeError(f"mock queue full: need {n} descriptors, {len(self._free)} free")
        idxs, self._free = self._free[:n], self._free[n:]
        return idxs

    def publish(self, head: int) -> None:
        """Put ``head`` in the avail ring and bump avail.idx (what virtqueue_kick prepares)."""
        self.set_avail_entry(self.avail_idx, head)
        self.set_avail_idx(self.avail_idx + 1)

    def add_many(self, heads: Iterable[int]) -> None:
        for h in heads:
            self.publish(h)

    # -- used ring ---------------------------------------------------------------------

    def get_used(self) -> list[tuple[int, int]]:
        """New used entries since the last call, as (head, written length); frees them."""
        out = []
        idx = self.used_idx()
        while self.last_used_idx != idx:
            slot = self.last_used_idx % self.size
            head, length = _USED_ELEM.unpack(
                self.mem.read(self.used_addr + 4 + 8 * slot, 8))
            out.append((head, length))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            self._free.extend(self._owned.pop(head, []))
        return out

    def written(self, head: int, length: int | None = None) -> bytes:
        """The bytes of ``head``'s writable buffers (the first ``length`` of them)."""
        data = b"".join(self.mem.read(b.addr, b.length)
                        for b in self.chains[head].buffers if b.writable)
        return data if length is None else data[:length]


class RecordingInterrupt:
    """A transport stand-in: records what the device signalled."""

    def __init__(self) -> None:
        self.queue_irqs: list[int] = []
        self.config_irqs = 0
        self.reset_requests = 0

    def notify_queue(self, index: int) -> None:
        self.queue_irqs.append(index)

    def notify_config(self) -> None:
        self.config_irqs += 1

    def needs_reset(self) -> None:
        self.reset_requests += 1


async def wait_used(driver: MockDriver, count: int, timeout: float = 5.0,
                    into: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Poll ``driver``'s used ring until ``count`` new entries arrived (test helper)."""
    import trio

    got: list[tuple[int, int]] = [] if into is None else into
    with trio.fail_after(timeout):
        while len(got) < count:
            got.extend(driver.get_used())
            if len(got) < count:
                await trio.sleep(0.001)
    return got


class FakeTap:
    """A tap stand-in for virtio-net tests without /dev/net/tun: one end of a datagram pair.

    Datagrams keep frame boundaries the way a tap does; the vnet header is whatever the
    device writes, so tests see exactly what a tap would receive.
    """

    def __init__(self, mtu: int = 1500) -> None:
        import socket

        self._ours, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._ours.setblocking(False)
        self.fd = self._ours.fileno()
        self.name = "faketap"
        self.created = False
        self.mtu = mtu
        self.vnet_hdr_len = 10

    def set_vnet_hdr_len(self, n: int) -> None:
        self.vnet_hdr_len = n

    def close(self) -> None:
        self._ours.close()
        self.host.close()
        self.fd = -1
