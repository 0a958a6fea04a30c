"""The interrupt layer (devicemodel/irq/): MSI-X table and PBA, its deliveries, MSI, the
per-vector eventfds of a peer-owned table, INTx lines.

The threaded properties are the ones data-plane threads rely on (design.md §5): a thread
raising vectors while the guest masks, unmasks, rewrites entries and toggles the
function never gets a vector delivered while masked or with a stale message, and every
vector raised while masked is delivered exactly once when it is unmasked.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.irq.delivery import EventfdVectors, InjectDelivery, IrqfdDelivery
from devicemodel.irq.intx import Intx, IntxRouter
from devicemodel.irq.msi import MsiVectors, message_data
from devicemodel.irq.msix import ENTRY_SIZE, MsixBar, MsixDelivery, MsixTable, bar_size_for
from devicemodel.irq.remap import RemapDelivery, RemapRoutes
from devicemodel.irq.services import Line

N = 8


@contextmanager
def frequent_switches() -> Iterator[None]:
    """Let the GIL change hands every microsecond, so threads really interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


class Recorder(MsixDelivery):
    """Checks each delivery against the table's state at that instant (the table's lock
    is held) and logs it with a sequence number."""

    def __init__(self, seq: Iterator[int]) -> None:
        self.seq = seq
        self.log: list[tuple[int, str, int]] = []  # (seq, who, vector)
        self.errors: list[str] = []

    def deliver(self, vector: int, address: int, data: int) -> None:
        t = self.table
        assert t is not None
        if not t.deliverable(vector):
            self.errors.append(f"vector {vector} delivered while masked or disabled")
        if t.entry(vector)[:2] != (address, data):
            self.errors.append(f"vector {vector} delivered with a stale message")
        who = "device" if threading.current_thread().name == "signaller" else "guest"
        self.log.append((next(self.seq), who, vector))


def _unmask_all(t: MsixTable) -> None:
    for v in range(t.entries):
        t.write_table(v * ENTRY_SIZE + 12, 4, 0)
    t.set_control(True, False)


guest_op = st.one_of(
    st.tuples(st.just("mask"), st.integers(0, N - 1)),
    st.tuples(st.just("unmask"), st.integers(0, N - 1)),
    st.tuples(st.just("rewrite"), st.integers(0, N - 1), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1)),
    st.tuples(st.just("rewrite8"), st.integers(0, N - 1), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("control"), st.booleans(), st.booleans()),
)


class LoggedTable(MsixTable):
    """Logs each vector it holds pending (under its lock, like deliveries)."""

    def __init__(self, entries: int, delivery: Recorder) -> None:
        self.recorder = delivery
        super().__init__(entries, delivery)

    def _hold(self, vector: int) -> None:
        super()._hold(vector)
        self.recorder.log.append((next(self.recorder.seq), "held", vector))


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(guest_op, min_size=1, max_size=40), seed=st.integers(0, 2**32 - 1))
def test_a_thread_signalling_while_the_guest_reprograms_loses_nothing(ops, seed):
    rec = Recorder(itertools.count())
    t = LoggedTable(N, rec)
    t.set_control(True, False)
    for v in range(N):  # start with some vectors live
        t.write_table(v * ENTRY_SIZE, 8, 0xFEE0_0000 | v << 12)
        t.write_table(v * ENTRY_SIZE + 8, 4, 0x40 + v)
        if v % 2:
            t.write_table(v * ENTRY_SIZE + 12, 4, 0)
    delivered_now = [0]
    rnd = random.Random(seed)
    stop = threading.Event()
    started = threading.Event()

    def signaller() -> None:
        started.set()
        while not stop.is_set():
            if t.send(rnd.randrange(N)):
                delivered_now[0] += 1

    thread = threading.Thread(target=signaller, name="signaller")
    with frequent_switches():
        thread.start()
        started.wait()
        for op in ops * 3:
            kind, v = op[0], op[1]
            if kind == "mask":
                t.write_table(v * ENTRY_SIZE + 12, 4, 1)
            elif kind == "unmask":
                t.write_table(v * ENTRY_SIZE + 12, 4, 0)
            elif kind == "rewrite":
                t.write_table(v * ENTRY_SIZE, 4, op[2])
                t.write_table(v * ENTRY_SIZE + 8, 4, op[3])
            elif kind == "rewrite8":
                t.write_table(v * ENTRY_SIZE, 8, op[2])
            else:
                t.set_control(op[1], op[2])
        stop.set()
        thread.join()
    _unmask_all(t)  # everything held goes out now
    assert rec.errors == []  # never delivered masked, never with a stale message
    assert t.pba == 0
    # every send that said "delivered" was one delivery, made by the signalling thread
    assert delivered_now[0] == sum(1 for _, who, _ in rec.log if who == "device")
    pending = [False] * N
    for _, what, v in sorted(rec.log):
        if what == "held":
            pending[v] = True
        elif what == "guest":  # on unmask or function unmask: only what was held, once
            assert pending[v], f"vector {v} delivered on unmask without being held"
            pending[v] = False
        else:
            pending[v] = False  # a new raise delivers the held message with it
    assert pending == [False] * N, "a held vector was never delivered"


def test_table_rules_entries_start_masked_and_read_only_bits_stay():
    sink = []
    t = MsixTable(4, InjectDelivery(type("S", (), {"inject_msi": lambda s, a, d:
                                                   sink.append((a, d))})()))
    bar = MsixBar(t, 0, 0x800)
    assert all(t.masked(v) for v in range(4))
    assert bar.read(12, 4) == 1 and bar.read(0x800, 8) == 0
    bar.write(0, 4, 0xFEE0_0003)  # address bits 1:0 are hard-wired
    bar.write(12, 4, 0xFFFF_FFFF)  # only the mask bit exists
    assert bar.read(0, 4) == 0xFEE0_0000 and bar.read(12, 4) == 1
    bar.write(2, 2, 0xFFFF)  # narrow writes are dropped
    assert bar.read(0, 4) == 0xFEE0_0000
    assert bar.read(3, 4) == 0xFFFF_FFFF and bar.read(0x40, 4) == 0xFFFF_FFFF  # gap
    t.set_control(True, False)
    assert not t.send(0) and bar.read(0x800, 8) == 1  # masked: pending in the PBA
    bar.write(0x800, 4, 0)  # the PBA is read-only
    assert bar.read(0x800, 8) == 1
    bar.write(12, 4, 0)  # unmask: delivered once, PBA clear
    assert sink == [(0xFEE0_0000, 0)] and bar.read(0x800, 8) == 0
    t.set_control(False, False)
    assert not t.send(0) and t.pba == 0  # disabled: dropped, nothing pending
    assert bar_size_for(4) == 0x2000 and bar_size_for(256) == 0x2000


class FakeEventfds:
    def __init__(self, fail: bool = False) -> None:
        self.irqfds: dict[int, tuple[int, int]] = {}
        self.calls: list[tuple] = []
        self.fail = fail

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None:
        self.calls.append((fd, address, data, deassign))
        if self.fail:
            raise OSError(22, "no")
        if deassign:
            del self.irqfds[fd]
        else:
            self.irqfds[fd] = (address, data)

    def ioeventfd(self, *args, **kw) -> None:
        raise AssertionError("not used")


class Injected:
    def __init__(self) -> None:
        self.msis: list[tuple[int, int]] = []

    def inject_msi(self, address: int, data: int) -> None:
        self.msis.append((address, data))


def test_irqfd_route_follows_the_entry_and_is_used_only_while_deliverable():
    fds, direct = FakeEventfds(), Injected()
    d = IrqfdDelivery(fds, direct, 2)
    t = MsixTable(2, d)
    try:
        t.set_control(True, False)
        t.write_table(0, 8, 0xFEE0_1000)
        t.write_table(8, 4, 0x31)
        assert fds.irqfds == {}  # no route before the vector is ever delivered
        t.write_table(12, 4, 0)
        assert t.send(0)
        assert fds.irqfds == {d.fds[0]: (0xFEE0_1000, 0x31)} and d.sent == 1
        assert os.eventfd_read(d.fds[0]) == 1 and direct.msis == []
        t.write_table(8, 4, 0x32)  # unmasked rewrite: the route moves at once
        assert fds.irqfds[d.fds[0]] == (0xFEE0_1000, 0x32)
        t.write_table(12, 4, 1)
        assert not t.send(0) and t.pba == 1  # masked: held in the PBA, not signalled
        t.write_table(0, 8, 0xFEE0_2000)  # masked rewrite: the route waits
        assert fds.irqfds[d.fds[0]] == (0xFEE0_1000, 0x32)
        t.write_table(12, 4, 0)  # unmask: the held message goes out on the new route
        assert fds.irqfds[d.fds[0]] == (0xFEE0_2000, 0x32) and d.sent == 2 and t.pba == 0
        t.reset()
        assert fds.irqfds == {}  # reset drops every route
    finally:
        t.close()
    assert d.fds == []


def test_irqfd_that_cannot_be_made_falls_back_to_injecting():
    fds, direct = FakeEventfds(fail=True), Injected()
    t = MsixTable(1, IrqfdDelivery(fds, direct, 1))
    t.set_control(True, False)
    t.write_table(0, 8, 0xFEE0_0000)
    t.write_table(12, 4, 0)
    assert t.send(0) and direct.msis == [(0xFEE0_0000, 0)]
    t.close()


def test_an_irqfd_eventfd_that_cannot_be_written_falls_back_to_injecting():
    """(The GIL-holding eventfd write reports failure instead of raising.)"""
    fds, direct = FakeEventfds(), Injected()
    d = IrqfdDelivery(fds, direct, 1)
    t = MsixTable(1, d)
    t.set_control(True, False)
    t.write_table(0, 8, 0xFEE0_0000)
    t.write_table(12, 4, 0)
    os.eventfd_write(d.fds[0], 0xFFFF_FFFF_FFFF_FFFE)  # the counter is full: EAGAIN
    assert t.send(0) and direct.msis == [(0xFEE0_0000, 0)] and d.sent == 0
    t.close()


class FakePhysical:
    """A multi-message MSI device's mask and pending registers."""

    def __init__(self) -> None:
        self.mask = 0
        self.pending = 0
        self.programmed: list[tuple[int, int]] = []

    def set_mask(self, value: int) -> None:
        self.mask = value

    def program(self, address: int, data: int) -> None:
        self.programmed.append((address, data))


class FakeRemapper:
    def __init__(self, count: int) -> None:
        self.count = count
        self.routes: dict[int, tuple[int, int]] = {}
        self.closed = False

    def physical_message(self) -> tuple[int, int]:
        return 0xFEE0_0010, 0

    def route(self, k: int, address: int, data: int) -> bool:
        self.routes[k] = (address, data)
        return True

    def unroute(self, k: int) -> None:
        self.routes.pop(k, None)

    def close(self) -> None:
        self.closed = True


def test_remap_delivery_mirrors_masks_and_shows_the_device_pending_bits():
    phys, made, enables = FakePhysical(), [], []

    def factory(n: int) -> FakeRemapper:
        made.append(FakeRemapper(n))
        return made[-1]

    t = MsixTable(4, RemapDelivery(phys, RemapRoutes("dev", 4, factory), enables.append))
    bar = MsixBar(t, 0, 0x800)
    assert phys.mask == 0b1111 and made == []  # all masked, no remapper yet
    t.set_control(True, True)  # enabled, function masked
    assert enables == [True] and phys.mask == 0b1111
    for k in range(4):
        bar.write(16 * k, 8, 0xFEE0_0000 | k << 12)
        bar.write(16 * k + 8, 4, 0x50 + k)
        bar.write(16 * k + 12, 4, 0)
    assert made[0].routes == {k: (0xFEE0_0000 | k << 12, 0x50 + k) for k in range(4)}
    assert phys.programmed == [(0xFEE0_0010, 0)]  # once
    assert phys.mask == 0b1111  # the function mask holds every vector
    t.set_control(True, False)
    assert phys.mask == 0
    bar.write(16 * 2 + 12, 4, 1)
    assert phys.mask == 0b100
    phys.pending = 0b100
    assert bar.read(0x800, 8) == 0b100  # the PBA is the device's
    t.set_control(False, False)
    assert enables == [True, False] and phys.mask == 0b1111
    t.reset()
    assert made[0].routes == {} and phys.mask == 0b1111
    t.close()
    assert made[0].closed


def test_msi_multiple_messages_mask_and_pending():
    sink, shown = Injected(), []
    m = MsiVectors(sink, on_pending=shown.append)
    assert not m.send(0)  # off: dropped
    m.update(enabled=True, allocated=4, address=0xFEE0_0000, data=0x48, mask=0b10)
    assert m.send(3) and sink.msis == [(0xFEE0_0000, 0x4B)]
    assert not m.send(4)  # beyond the allocation
    assert not m.send(1) and m.pending == 0b10 and shown == [0b10]
    m.update(enabled=True, allocated=4, address=0xFEE0_1000, data=0x48, mask=0)
    assert sink.msis[-1] == (0xFEE0_1000, 0x49) and m.pending == 0 and shown[-1] == 0
    assert message_data(0x4F, 4, 1) == 0x4D


@settings(max_examples=30, deadline=None)
@given(masks=st.lists(st.integers(0, 3), min_size=1, max_size=30), seed=st.integers(0, 99))
def test_msi_from_a_thread_never_goes_out_masked(masks, seed):
    """Deliveries run under the MSI state's lock: each is checked against the mask the
    guest last wrote, at that instant."""
    errors: list[str] = []

    class Checking:
        def inject_msi(self, address: int, data: int) -> None:
            vector = data & 1
            if m._mask >> vector & 1 or not m._enabled:
                errors.append(f"message {vector} sent while masked")

    m = MsiVectors(Checking())
    stop = threading.Event()
    rnd = random.Random(seed)

    def signaller() -> None:
        while not stop.is_set():
            m.send(rnd.randrange(2))

    thread = threading.Thread(target=signaller)
    with frequent_switches():
        thread.start()
        for mask in masks * 3:
            m.update(enabled=True, allocated=2, address=0xFEE0_0000, data=0, mask=mask)
        stop.set()
        thread.join()
    m.update(enabled=True, allocated=2, address=0xFEE0_0000, data=0, mask=0)
    assert errors == [] and m.pending == 0


def test_eventfd_vectors_hold_while_masked_and_signal_once_on_unmask():
    v = EventfdVectors(2)
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        assert not v.send(0) and v.dropped == 1  # no eventfd yet: dropped
        v.set_fds(0, fds)
        assert v.send(0) and os.eventfd_read(fds[0]) == 1
        v.mask(1)
        assert not v.send(1) and not v.send(1) and v.pending == 0b10
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fds[1])
        v.unmask(1)
        assert os.eventfd_read(fds[1]) == 1 and v.pending == 0  # once for both raises
        v.mask(0)
        v.send(0)
        v.set_fds(0, [None])  # torn down: what was held goes with it
        v.unmask(0)
        assert v.pending == 0 and v.sent == 2 and v.dropped == 1
    finally:
        for fd in fds:
            os.close(fd)


class Levels:
    def __init__(self) -> None:
        self.level: dict[int, bool] = {}
        self.pulses: list[int] = []

    def set_line(self, gsi: int, high: bool) -> None:
        self.level[gsi] = high

    def pulse_line(self, gsi: int) -> None:
        self.pulses.append(gsi)


def test_lines_have_polarity_and_intx_holds_while_not_permitted():
    lines = Levels()
    isa = Line(lines, 8)
    isa.assert_()
    assert lines.level[8] is True
    isa.pulse()
    assert lines.pulses == [8]
    router = IntxRouter(lines)
    route = router.route(0, 3, 1)
    assert lines.level[route.gsi] is True  # PCI INTx idles high (active low)
    permitted = [False]
    pin = Intx(lambda: permitted[0])
    pin.connect(lines, route)
    pin.assert_()
    assert lines.level[route.gsi] is True  # MSI on or INTxDIS: held
    permitted[0] = True
    pin.update()
    assert lines.level[route.gsi] is False  # now asserted (low)
    pin.deassert()
    assert lines.level[route.gsi] is True


def test_a_function_served_outside_a_vm_signals_the_peer_eventfds():
    """What a vfio-user server does: a whole virtio-pci function on a standalone context
    (no buses, no backend), its vectors handed to the client's eventfds; the client
    masks and unmasks them, the device raises them as usual."""
    from devicemodel.context import standalone
    from devicemodel.registry import create_pci
    from devicemodel.slot import SlotConfig
    from devicemodel.virtio.pci.layout import C_Q_MSIX, C_Q_SELECT, MODERN_BAR

    lines = Levels()
    fn = create_pci(standalone(lines=lines), SlotConfig(0, 3, 0, "virtio-rnd", "modern"))
    vectors = EventfdVectors(fn.msix.entries)
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(fn.msix.entries)]
    try:
        vectors.set_fds(0, fds)
        fn.hand_interrupts_to(msix=vectors, intx=Line(lines, 0))
        fn.cfg_write(fn.msix.offset + 2, 2, 0x8000)  # MSI-X on (the client forwards it)
        bar = fn.bar(MODERN_BAR)
        bar.write(C_Q_SELECT, 2, 0)
        bar.write(C_Q_MSIX, 2, 1)
        fn.notify_queue(0)
        assert os.eventfd_read(fds[1]) == 1
        vectors.mask(1)
        fn.notify_queue(0)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fds[1])
        vectors.unmask(1)
        assert os.eventfd_read(fds[1]) == 1
        fn.cfg_write(fn.msix.offset + 2, 2, 0)  # MSI-X off: INTx, the peer's line
        fn.notify_queue(0)
        assert lines.level[0] is True
    finally:
        fn.close()
        for fd in fds:
            os.close(fd)
