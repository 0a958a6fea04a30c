"""The ACRN waiter thread (hsm/attach.py) against the fake HSM: hostile requests answered
on it exactly as the loop answers them, and a stop while it sits in ATTACH (a VM
shutdown, a cancelled server, an ATTACH error) that ends it without a hang or a leak."""

from __future__ import annotations

import errno
import struct
import threading
import time

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.bus import MmioBus, PortBus
from devicemodel.ioreq import IoreqServer, new_ioreq_page
from tests.support.acrn_fake import ATTACH, MMIO, PCICFG, PORTIO, FakeHsm, new_hv
from tests.support.served import Recorder

u32 = st.integers(0, 2**32 - 1)
request = st.fixed_dictionaries({
    "rtype": st.one_of(st.sampled_from([PORTIO, MMIO, PCICFG, 3, 7]), u32),
    "direction": st.one_of(st.sampled_from([0, 1]), u32),
    "addr": st.one_of(st.sampled_from([0x510, 0x514, 0x517, 0xC000_0000, 0xC000_0FFC,
                                       0xFFFF, 0x1_0000]), st.integers(0, 2**64 - 1)),
    "size": st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 16]), st.integers(0, 2**64 - 1)),
    "value": u32,
    "bdfr": st.one_of(st.just((0, 3, 0, 0x10)), st.tuples(u32, u32, u32, u32)),
})


class Pci:
    def __init__(self, safe: bool) -> None:
        self.safe = safe
        self.log: list[tuple] = []

    def vcpu_safe(self, bus, dev, func, reg, size, write):
        return self.safe

    def cfg_read(self, bus, dev, func, reg, size):
        self.log.append(("r", bus, dev, func, reg, size))
        return 0x8086_0000 | reg

    def cfg_write(self, bus, dev, func, reg, size, value):
        self.log.append(("w", bus, dev, func, reg, size, value))


def _answer(offset: int, size: int) -> int:
    if offset == 7:
        raise ValueError("a device bug")  # all-ones, and the waiter lives on
    return 0xDEAD_BEEF_0BAD_F00D >> offset


def _fake_post(fake: FakeHsm, vcpu: int, r: dict) -> None:
    """post() with the fields clipped to what the slot layout holds."""
    size = r["size"] & (2**64 - 1)
    if r["rtype"] == PORTIO:  # PIO: the value is a u32, the size a u64
        fake.post(vcpu, r["rtype"], r["direction"], r["addr"], size, r["value"])
    elif r["rtype"] == PCICFG:
        fake.post(vcpu, r["rtype"], r["direction"], 0, size & 0xFFFF_FFFF, r["value"],
                  r["bdfr"])
    else:
        fake.post(vcpu, r["rtype"], r["direction"], r["addr"], size, r["value"])


def serve_requests(requests: list[dict], safe: bool) -> tuple[list[bytes], list, int, set]:
    """Post each request in turn as a vCPU would (from another thread) and wait for its
    completion; the slots after each, the handlers' logs, the waiter's in-place rounds,
    and the threads that answered."""

    async def main():
        fake, hv = new_hv(FakeHsm(vcpu_num=2))
        page = new_ioreq_page()
        hv.create_vm("vm1", page)
        ports, mmio = PortBus(), MmioBus()
        port_dev, mmio_dev = Recorder(answer=_answer), Recorder(answer=_answer)
        threads: set[int] = set()

        def read(offset, size, dev=port_dev):
            threads.add(threading.get_ident())
            return Recorder.read(dev, offset, size)

        port_dev.read = read  # type: ignore[method-assign]
        ports.register(0x510, 8, port_dev, vcpu_safe=safe)
        mmio.register(0xC000_0000, 0x1000, mmio_dev, vcpu_safe=safe)
        pci = Pci(safe)
        server = IoreqServer(hv, page, 2, ports, mmio, pci)
        hv.create_ioreq_client()
        hv.start_vm()
        after: list[bytes] = []

        def guest() -> None:
            for i, r in enumerate(requests):
                _fake_post(fake, i % 2, r)
                deadline = time.monotonic() + 5
                while len(fake.notified) != i + 1:
                    assert time.monotonic() < deadline, f"request {r} not completed"
                    time.sleep(0.0002)
                after.append(fake.slot(i % 2))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve)
                with trio.fail_after(30):
                    await trio.to_thread.run_sync(guest)
                waiter = hv._waiter
                assert waiter is not None and waiter.alive  # no request ended it
                here = waiter.served_here
                hv.destroy_ioreq_client()
        finally:
            hv.close()
        assert fake.notified == [i % 2 for i in range(len(requests))]
        return after, [port_dev.log, mmio_dev.log, pci.log], here, threads

    return trio.run(main)


@settings(max_examples=25, deadline=None)
@given(requests=st.lists(request, min_size=1, max_size=8))
def test_hostile_requests_on_the_waiter_thread_get_the_loops_answers(requests):
    """Whatever the HSM posts (unknown types, sizes 0/3/16/huge, addresses past the
    bus, bad BDFs, a handler that raises), a vcpu_safe device answered on the waiter
    thread leaves each slot and the device exactly as a device served on the loop, and
    the waiter thread is still serving afterwards."""
    slots_loop, logs_loop, _, threads_loop = serve_requests(requests, safe=False)
    slots_here, logs_here, here, _ = serve_requests(requests, safe=True)
    assert slots_here == slots_loop
    assert logs_here == logs_loop
    assert threads_loop <= {threading.get_ident()}  # unsafe: only ever on the loop


def test_safe_requests_are_answered_on_the_waiter_thread():
    """(The property above holds however the work was split; here it is split.)"""
    reqs = [dict(rtype=PORTIO, direction=0, addr=0x512, size=1, value=0, bdfr=(0, 0, 0, 0))]
    _, logs, here, threads = serve_requests(reqs * 30, safe=True)
    assert len(logs[0]) == 30 and here >= 25
    assert threads - {threading.get_ident()}


# --- stopping while the waiter sits in ATTACH -------------------------------------------


async def _waiting(fake: FakeHsm) -> None:
    with trio.fail_after(5):
        while fake.attach_waiting != 1:
            await trio.sleep(0.001)


def _setup(fake: FakeHsm):
    fake_, hv = new_hv(fake)
    page = new_ioreq_page()
    hv.create_vm("vm1", page)
    server = IoreqServer(hv, page, 2, PortBus(), MmioBus())
    hv.create_ioreq_client()
    hv.start_vm()
    return hv, server


async def test_a_vm_shutdown_while_the_waiter_sits_in_attach_ends_it_at_once():
    fake = FakeHsm(vcpu_num=2)
    hv, server = _setup(fake)
    threads_before = threading.active_count()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        await _waiting(fake)
        waiter = hv._waiter
        assert waiter is not None and waiter.alive
        start = time.monotonic()
        hv.close()  # destroys the client (ATTACH returns -ENODEV), closes the fd
    assert time.monotonic() - start < 1.0  # serve returned at once, no 10 s ATTACH wait
    assert not waiter.alive and fake.open_fds == set()
    assert threading.active_count() <= threads_before  # the waiter is gone


async def test_a_cancelled_server_then_close_leaves_no_thread_behind():
    fake = FakeHsm(vcpu_num=2)
    hv, server = _setup(fake)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        await _waiting(fake)
        nursery.cancel_scope.cancel()  # e.g. the VM's nursery unwinding on an error
    waiter = hv._waiter
    assert waiter is not None and waiter.alive  # still in ATTACH: nothing woke it
    start = time.monotonic()
    hv.close()
    assert time.monotonic() - start < 1.0 and not waiter.alive
    assert fake.open_fds == set()


async def test_a_request_posted_after_a_cancel_is_not_served_by_a_dead_server():
    """The server stopped offering (set_inline_server(None)): the waiter hands the
    request to nobody rather than serving it behind a loop that no longer gates."""
    fake = FakeHsm(vcpu_num=2)
    hv, server = _setup(fake)
    server.ports.register(0x510, 8, Recorder(answer=1), vcpu_safe=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        await _waiting(fake)
        nursery.cancel_scope.cancel()
    await trio.to_thread.run_sync(fake.post, 0, PORTIO, 0, 0x510, 1)
    await trio.sleep(0.05)
    assert fake.notified == []  # nobody completed it: the VM is going away
    hv.close()
    assert fake.open_fds == set()


async def test_an_attach_error_ends_serving_and_the_thread():
    fake = FakeHsm(vcpu_num=2)
    hv, server = _setup(fake)
    fake.errors[ATTACH] = [errno.EFAULT]
    with trio.fail_after(5):
        await server.serve()  # returns: acrn-dm leaves its loop on such an error
    waiter = hv._waiter
    assert waiter is None  # dropped; a new client would get a new thread
    hv.close()
    assert fake.open_fds == set()


async def test_a_new_client_after_destroy_gets_a_new_waiter_that_serves():
    fake = FakeHsm(vcpu_num=2)
    hv, server = _setup(fake)
    dev = Recorder(answer=0x77)
    server.ports.register(0x510, 8, dev, vcpu_safe=True)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            await _waiting(fake)
            first = hv._waiter
            hv.destroy_ioreq_client()  # serve returns (-ENODEV)
        hv.create_ioreq_client()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            await _waiting(fake)
            assert hv._waiter is not first and first is not None and not first.alive
            await trio.to_thread.run_sync(fake.post, 1, PORTIO, 0, 0x511, 1)
            while fake.notified != [1]:
                await trio.sleep(0.001)
            assert fake.slot(1)[88] == 0x77  # the value (+24 of the request)
            hv.destroy_ioreq_client()
        assert struct.unpack_from("<I", fake.slot(1), 136)[0] == 1  # COMPLETE
    hv.close()
    assert fake.open_fds == set()
