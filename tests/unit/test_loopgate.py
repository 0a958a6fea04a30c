"""The loop gate (a request thread serves only while the loop sleeps), ``on_loop``, and the
request server's ``scan_here``/``serve_here`` over random slot contents."""

from __future__ import annotations

import threading
import time

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.hsm import abi
from devicemodel.ioreq import IoreqServer
from devicemodel.loopgate import LoopGate, on_loop
from tests.support.ioreq_slots import FakeHv, check_random_slots, slot


def in_thread(fn):
    """``fn()`` on a fresh thread, its result."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_a_gate_nobody_installed_never_lets_a_thread_in():
    gate = LoopGate()
    assert in_thread(gate.try_enter) is False


def test_a_gate_installed_outside_trio_stays_closed():
    """(A test may step ``serve()`` by hand, outside trio.run: nothing gates then.)"""
    gate = LoopGate()
    gate.install()
    assert in_thread(gate.try_enter) is False
    gate.remove()


async def test_a_thread_gets_in_only_while_the_loop_sleeps():
    gate = LoopGate()
    gate.install()
    try:
        # the loop runs this task now: it holds the gate
        assert in_thread(gate.try_enter) is False
        # while the loop sleeps (here: waiting for that thread) the thread gets in, and
        # the loop runs no task again until it left
        def enter_and_leave_later() -> float:
            assert gate.try_enter()
            threading.Timer(0.05, gate.leave).start()
            return time.monotonic()

        entered = await trio.to_thread.run_sync(enter_and_leave_later)
        assert time.monotonic() - entered >= 0.04
    finally:
        gate.remove()
    assert await trio.to_thread.run_sync(gate.try_enter) is False  # removed: closed


async def test_no_task_runs_while_a_thread_is_behind_the_gate():
    gate = LoopGate()
    gate.install()
    ran_inside: list[bool] = []
    inside = threading.Event()
    try:
        async def ticker():
            while True:
                ran_inside.append(inside.is_set())
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)

            def hold():
                for _ in range(20):
                    while not gate.try_enter():
                        time.sleep(0.0005)
                    inside.set()
                    time.sleep(0.002)
                    inside.clear()
                    gate.leave()
                    time.sleep(0.001)

            await trio.to_thread.run_sync(hold)
            nursery.cancel_scope.cancel()
    finally:
        gate.remove()
    assert ran_inside and not any(ran_inside)


async def test_on_loop_runs_on_the_loop_thread_once_however_often_asked():
    gate = LoopGate()
    gate.install()
    loop_thread = threading.get_ident()
    calls: list[int] = []

    def record():
        calls.append(threading.get_ident())

    try:
        on_loop(record)  # on the loop: at once
        assert calls == [loop_thread]

        def from_thread():
            assert gate.try_enter()
            try:
                for _ in range(5):
                    on_loop(record)
            finally:
                gate.leave()

        await trio.to_thread.run_sync(from_thread)
        with trio.fail_after(5):
            while len(calls) < 2:
                await trio.sleep(0.001)
        await trio.sleep(0.01)
        assert calls == [loop_thread, loop_thread]
    finally:
        gate.remove()


class ThreadFakeHv(FakeHv):
    """The first attach lets a request thread scan (``scan_here``) while the loop sleeps;
    the loop then scans what is left, and the second attach ends serving. NOTIFY stores
    COMPLETE as the HSM does, so the loop does not serve a slot the thread finished."""

    completes = True

    def __init__(self) -> None:
        super().__init__()
        self.server: IoreqServer | None = None
        self.here: list[int] = []

    def notify_request_finish(self, vcpu: int) -> None:
        super().notify_request_finish(vcpu)
        assert self.server is not None
        abi.SLOT_U32.pack_into(self.server.page,
                               abi.slot_offset(vcpu) + abi.SLOT_PROCESSED_OFF,
                               abi.IOREQ_STATE_COMPLETE)

    def set_inline_server(self, server: IoreqServer | None) -> None:
        if server is not None:
            self.server = server

    async def attach_ioreq_client(self) -> bool:
        self.attached += 1
        if self.attached == 1 and self.server is not None:
            server = self.server
            before = len(self.finished)
            await trio.to_thread.run_sync(server.scan_here)
            self.here = self.finished[before:]
        return self.attached == 1


def _serve_in_trio(server: IoreqServer) -> None:
    async def main():
        with trio.fail_after(5):
            await server.serve()

    trio.run(main)


@settings(max_examples=100, deadline=None)
@given(vcpu_num=st.integers(1, 16), slots=st.lists(slot, min_size=16, max_size=16))
def test_random_slots_split_between_a_request_thread_and_the_loop(vcpu_num, slots):
    """Whatever the slots hold, each owned slot is completed exactly once, by the thread
    when its handler is vcpu_safe (PIO at 0x3F8, PCI config reads) and by the loop
    otherwise, and the state field is never written."""
    hv = ThreadFakeHv()
    check_random_slots(vcpu_num, slots, hv, _serve_in_trio, safe_ports=True)
    assert len(set(hv.finished)) == len(hv.finished)
    for v in hv.here:  # nothing whose handler is not vcpu_safe was served on the thread
        s = slots[v]
        mmio_unsafe = (s["type"] == 1 and s["size"] in (1, 2, 4, 8)
                       and 0xC000_0000 <= s["address"] <= 0xC000_1000 - s["size"])
        b, d, f, r = s["bdfr"]
        pci_write = (s["type"] == 2 and s["direction"] == 1 and s["size"] in (1, 2, 4)
                     and b <= 0xFF and d <= 0x1F and f <= 7 and r <= 0xFFF)
        assert not mmio_unsafe and not pci_write, (v, s)


# --- the thread's answer is the loop's answer -------------------------------------------


class LoggedPci:
    """PCI config space that records accesses; ``safe`` says what may be served off the
    loop."""

    def __init__(self, safe: bool) -> None:
        self.safe = safe
        self.log: list[tuple] = []

    def vcpu_safe(self, bus, dev, func, reg, size, write):
        return self.safe

    def cfg_read(self, bus, dev, func, reg, size):
        self.log.append(("r", bus, dev, func, reg, size))
        return (0xA5A5_0000 | reg) if reg != 0x44 else 1 // 0  # one register raises

    def cfg_write(self, bus, dev, func, reg, size, value):
        self.log.append(("w", bus, dev, func, reg, size, value))


def _answer(offset: int, size: int) -> int:
    if offset == 5:
        raise RuntimeError("a device bug")  # answered with all-ones, on either side
    return 0x1122_3344_5566_7788 >> offset


def _server(s: dict, vcpu: int, safe: bool) -> tuple[IoreqServer, FakeHv, list]:
    from devicemodel.bus import MmioBus, PortBus
    from devicemodel.ioreq import new_ioreq_page
    from tests.support.ioreq_slots import _write_slot
    from tests.support.served import Recorder

    page = new_ioreq_page()
    for v in range(16):  # every other slot FREE: only ``vcpu``'s can be ours
        abi.SLOT_U32.pack_into(page, abi.slot_offset(v) + abi.SLOT_PROCESSED_OFF,
                               abi.IOREQ_STATE_FREE)
    _write_slot(page, vcpu, s)
    ports, mmio = PortBus(), MmioBus()
    port_dev, mmio_dev = Recorder(answer=_answer), Recorder(answer=_answer)
    ports.register(0x3F8, 8, port_dev, vcpu_safe=safe)
    mmio.register(0xC000_0000, 0x1000, mmio_dev, vcpu_safe=safe)
    pci = LoggedPci(safe)
    hv = FakeHv()
    server = IoreqServer(hv, page, 16, ports, mmio, pci)  # type: ignore[arg-type]
    return server, hv, [port_dev.log, mmio_dev.log, pci.log]


@settings(max_examples=150, deadline=None)
@given(s=slot, vcpu=st.integers(0, 15), safe=st.booleans())
def test_a_request_thread_answers_exactly_as_the_loop_would_or_leaves_the_slot_alone(
        s, vcpu, safe):
    """Whatever the slot holds (hostile sizes, types, addresses; a handler that raises):
    ``serve_here`` on a request thread leaves the page, the handlers, the counters and
    the completions exactly as the loop's ``scan`` does; when the handler is not
    vcpu_safe it touches nothing, and the loop's later scan gives the same result."""
    loop_side, loop_hv, loop_logs = _server(s, vcpu, safe)
    thread_side, thread_hv, thread_logs = _server(s, vcpu, safe)
    before = bytes(thread_side.page)

    async def main() -> bool:
        loop_side.scan()
        thread_side.gate.install()  # as serve() does: the loop sleeps while it waits
        try:
            return await trio.to_thread.run_sync(thread_side.serve_here, vcpu)
        finally:
            thread_side.gate.remove()

    served_here = trio.run(main)
    owned = s["state"] == abi.IOREQ_STATE_PROCESSING and s["kernel_handled"] == 0
    if served_here:
        assert owned
    else:  # untouched: no handler ran, no byte changed, nothing completed
        assert not (owned and safe and s["type"] in (0, 1, 2)), "a safe access refused"
        assert bytes(thread_side.page) == before
        assert thread_logs == [[], [], []] and thread_hv.finished == []
        thread_side.scan()  # the loop serves it later
    assert bytes(thread_side.page) == bytes(loop_side.page)
    assert thread_logs == loop_logs
    assert thread_side.stats == loop_side.stats
    assert thread_hv.finished == loop_hv.finished == ([vcpu] if owned else [])
