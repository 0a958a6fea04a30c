"""Hypothesis-generated hostile rings against real devices, and the properties they must
keep (tests/unit/test_virtio_hostile.py runs them; tests/fuzz/test_fuzz_virtqueue.py and
test_fuzz_rings_raw.py run them longer).

Properties: nothing but VirtqueueError-turned-NEEDS_RESET comes out of a device, nothing
hangs, and the device writes guest RAM only inside buffers the driver marked
device-writable (plus the used ring). Guest RAM sits between PROT_NONE guard pages, so
a host access outside it would kill the test process.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from devicemodel.memory import MiB
from devicemodel.virtio.blk import VirtioBlk, parse_blk_options
from devicemodel.virtio.blk.lane import run_lane
from devicemodel.virtio.console import VirtioConsole, parse_console_options
from devicemodel.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC
from devicemodel.virtio.mock import FakeTap, GuardedMemory, RecordingInterrupt
from devicemodel.virtio.net import VirtioNet, parse_net_options
from devicemodel.virtio.queue import (
    MAX_INDIRECT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
)
from devicemodel.virtio.rnd import VirtioRnd

LOW = 1 * MiB
HIGH = 0x1_0000_0000
HIGH_SIZE = 64 * 1024
SIZE = 8
DESC, AVAIL, USED = 0x10000, 0x10080, 0x11000
TABLES = (0x20000, 0x20400)
DATA = 0x30000
RING_AREA = (DESC, TABLES[1] + 16 * 64)  # what the device must never scribble on

MEM = GuardedMemory([(0, LOW), (HIGH, HIGH_SIZE)], spans=True)  # hot paths included
_DESC = struct.Struct("<QIHH")

addresses = st.one_of(
    st.integers(DATA, DATA + 0x10000),
    st.sampled_from([LOW - 16, LOW - 1, LOW, HIGH - 8, HIGH, HIGH + HIGH_SIZE - 16,
                     2**64 - 16, 2**64 - 1, *TABLES, DESC, USED]),
    st.integers(HIGH, HIGH + HIGH_SIZE),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(st.integers(0, 600), st.sampled_from([16, 32, 48, 512, 4096]),
                    st.integers(0, 2**32 - 1))
flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
descriptors = st.tuples(addresses, lengths, flags, st.integers(0, 15))
tables = st.lists(descriptors, min_size=SIZE, max_size=SIZE)
rings = st.fixed_dictionaries({
    "desc": tables,
    "ind0": st.lists(descriptors, min_size=1, max_size=16),
    "ind1": st.lists(descriptors, min_size=1, max_size=16),
    "avail": st.lists(st.integers(0, 15), min_size=SIZE, max_size=SIZE),
    "avail_idx": st.one_of(st.integers(0, 12), st.integers(0, 0xFFFF)),
    "event_idx": st.booleans(),
    "indirect": st.booleans(),
    "payload": st.binary(min_size=16, max_size=64),
})


_ZERO_LOW, _ZERO_HIGH = bytes(LOW), bytes(HIGH_SIZE)


def lay_out(r: dict) -> list[tuple[int, int]]:
    """Write the rings; return the ranges a correct device may write."""
    MEM.view(0, LOW)[:] = _ZERO_LOW
    MEM.view(HIGH, HIGH_SIZE)[:] = _ZERO_HIGH
    # plausible request headers in the data area so blk gets past its header check
    header = r["payload"][:16]
    MEM.write(DATA, (header + bytes(64 - len(header))) * (0x10000 // 64))
    allowed = [(USED, 6 + 8 * SIZE)]
    for base, table in ((DESC, r["desc"]), (TABLES[0], r["ind0"]), (TABLES[1], r["ind1"])):
        for i, (a, n, f, nx) in enumerate(table):
            _DESC.pack_into(MEM.view(base + 16 * i, 16), 0, a, n, f, nx)
    for i, h in enumerate(r["avail"]):
        MEM.write_u16(AVAIL + 4 + 2 * i, h)
    MEM.write_u16(AVAIL + 2, r["avail_idx"])

    def writable(table: list) -> None:
        for a, n, f, _ in table:
            if f & VIRTQ_DESC_F_WRITE:
                allowed.append((a, n))

    writable(r["desc"])
    for a, n, f, _ in r["desc"]:
        if f & VIRTQ_DESC_F_INDIRECT and n % 16 == 0 and 0 < n // 16 <= MAX_INDIRECT:
            for base, table in zip(TABLES, (r["ind0"], r["ind1"]), strict=True):
                if a == base:
                    writable(table[: n // 16])
    return allowed


def changed_outside(before: list[bytes], allowed: list[tuple[int, int]]) -> list[int]:
    bad = []
    for (gpa, size), old in zip(MEM.layout, before, strict=True):
        new = MEM.read(gpa, size)
        if new == old:
            continue
        for off in range(0, size, 4096):
            if new[off : off + 4096] == old[off : off + 4096]:
                continue
            for k in range(off, min(off + 4096, size)):
                if new[k] != old[k]:
                    addr = gpa + k
                    if not any(a <= addr < a + n for a, n in allowed):
                        bad.append(addr)
    return bad


def make_queue(r: dict, index: int = 0, max_size: int = SIZE) -> Virtqueue:
    q = Virtqueue(MEM, index, max_size)
    q.size = SIZE
    q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
    return q


def queues_for(dev, r: dict, hostile_index: int) -> list[Virtqueue]:
    """The device's queues: the hostile ring at ``hostile_index``, the others not ready."""
    qs = [Virtqueue(MEM, i, dev.queue_max_size(i)) for i in range(dev.num_queues)]
    qs[hostile_index] = make_queue(r, hostile_index, dev.queue_max_size(hostile_index))
    return qs


async def drive(dev, r: dict, hostile_index: int = 0) -> RecordingInterrupt:
    irq = RecordingInterrupt()
    feats = dev.device_features & ~(
        (0 if r["event_idx"] else VIRTIO_F_RING_EVENT_IDX)
        | (0 if r["indirect"] else VIRTIO_F_RING_INDIRECT_DESC))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run)
            dev.activate(feats, queues_for(dev, r, hostile_index), irq)
            dev.queue_notify(hostile_index)
            while True:
                await trio.testing.wait_all_tasks_blocked(0.001)
                if dev.limiter.borrowed_tokens == 0:
                    break
                await trio.sleep(0.002)
            nursery.cancel_scope.cancel()
    return irq


def check(dev, r: dict, hostile_index: int = 0) -> None:
    allowed = lay_out(r)
    before = MEM.snapshot()
    irq = trio.run(drive, dev, r, hostile_index)
    assert irq.reset_requests <= 1
    assert (irq.reset_requests == 1) == (dev.failure is not None)
    aliased = any(a < RING_AREA[1] and RING_AREA[0] < a + n for a, n in allowed[1:])
    if not aliased:  # a buffer over the rings lets the device rewrite the rings legally
        assert changed_outside(before, allowed) == []


COMMON = settings(max_examples=100, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])


def against_blk(checker, image: str, r: dict, rtype: int) -> None:  # noqa: ANN001
    """Run ``checker`` on a blk device, the ring's header made a request of ``rtype``."""
    r = dict(r)
    sector = 0 if r["payload"][0] & 1 else int.from_bytes(r["payload"][8:16], "little")
    r["payload"] = struct.pack("<IIQ", rtype, 0, sector)
    dev = VirtioBlk(parse_blk_options(image + ",discard"))
    try:
        checker(dev, r)
    finally:
        dev.close()


def check_data_plane(dev: VirtioBlk, r: dict, lane: bool = False) -> tuple[bool, list[bytes]]:
    """``check`` for blk's data-plane path (vhost-user: a thread serves the ring with
    blocking I/O), called here on the test's thread batch by batch (``lane``: by the
    thread's own loop, ``blk/lane.py``, stopped where it would first sleep): only
    VirtqueueError may come of it, and guest RAM changes only inside device-writable
    buffers. Returns whether it came, and guest RAM as the device left it (the
    avail_event field zeroed: the lane writes it where it would sleep)."""
    allowed = lay_out(r)
    before = MEM.snapshot()
    dev.features = dev.device_features & ~(
        (0 if r["event_idx"] else VIRTIO_F_RING_EVENT_IDX)
        | (0 if r["indirect"] else VIRTIO_F_RING_INDIRECT_DESC))
    q = make_queue(r, 0, dev.queue_max_size(0))
    try:
        q.start(event_idx=r["event_idx"], indirect=r["indirect"])
        if not (lane and run_lane(LaneHost(q), dev, lambda: None)):  # type: ignore[arg-type]
            for _ in range(SIZE + 2):
                if not dev.serve_blocking(q):
                    break
        failed = False
    except VirtqueueError:
        failed = True  # the device would be marked NEEDS_RESET
    finally:
        q.stop()
    aliased = any(a < RING_AREA[1] and RING_AREA[0] < a + n for a, n in allowed[1:])
    if not aliased:
        assert changed_outside(before, allowed) == []
    MEM.write_u16(USED + 4 + 8 * SIZE, 0)
    return failed, MEM.snapshot()


@dataclass
class LaneHost:
    """Stands in for the ``Dataplane`` of ``run_lane`` on the test's thread: where the
    thread would sleep, ``post_next`` makes the driver's next move (take what was used,
    post a request); once it has none, the loop stops."""

    q: Virtqueue
    post_next: Callable[[], bool] = lambda: False
    stopping: bool = False
    idle_s: float = 0.0
    looked_again: list[int] = field(default_factory=list)

    def poll(self, _timeout: float) -> list[tuple[int, int]]:
        if not self.post_next():
            self.stopping = True
        return [(0, 1)]  # a kick

    def look_again(self, q: Virtqueue) -> None:
        self.looked_again.append(q.used_idx)


def image(tmp_path_factory) -> str:  # noqa: ANN001 - pytest's TempPathFactory
    """A 1 MiB disk image for ``rings_vs_blk`` (the ``hostile_image`` fixture)."""
    path = tmp_path_factory.mktemp("hostile") / "disk.img"
    path.write_bytes(b"\x5a" * (1 * MiB))
    return str(path)


def rings_vs_rnd(r: dict) -> None:
    check(VirtioRnd(), r)


def rings_vs_blk(image: str, r: dict, rtype: int) -> None:
    against_blk(check, image, r, rtype)


def pop_never_raises_anything_else(r: dict) -> None:
    lay_out(r)
    q = make_queue(r)
    q.start(event_idx=r["event_idx"], indirect=r["indirect"])
    for _ in range(SIZE + 2):
        try:
            chain = q.pop()
        except VirtqueueError:
            return
        if chain is None:
            return
        for v in chain.readable + chain.writable:
            assert len(v) <= LOW
        q.add_used(chain.head, chain.writable_len)


def rings_vs_net(r: dict, rx: bool, frames: list[bytes]) -> None:
    tap = FakeTap()
    dev = VirtioNet(parse_net_options("tap=faketap"), tap=tap)  # type: ignore[arg-type]
    try:
        for f in frames:
            tap.host.send(f)
        check(dev, r, 0 if rx else 1)
    finally:
        dev.close()


def rings_vs_console(tmp_path_factory, r: dict, index: int) -> None:  # noqa: ANN001
    out = tmp_path_factory.mktemp("con") / "out"
    dev = VirtioConsole(parse_console_options(f"@file:a={out},file:b={out}"))
    try:
        check(dev, r, index)
    finally:
        dev.close()
