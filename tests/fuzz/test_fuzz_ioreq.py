"""Request slots into the IoreqServer.

1. ``tests/test_ioreq_fuzz.py``'s property (random slot bytes never break the server, it
   completes exactly the slots it owns and never writes ``processed``), re-run here with
   the fuzz settings so it gets a long mode.
2. Well-formed-looking requests aimed at every range a real VM registers (all emulated
   devices' BARs, platform ports, CF8/CFC-converted PCICFG, the ECAM window): no device
   handler may raise (the server would hide it, answering all-ones: ``handler_error``
   must stay 0), every read answers within its size, and a completed slot keeps state.
"""

from __future__ import annotations

import logging
import struct
import traceback

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.hsm import abi
from devicemodel.ioreq import IoreqServer, new_ioreq_page
from tests import test_ioreq_fuzz as base

from ._common import count, drive, fuzz_settings
from ._vm import build_vm, reset_vm

_inner = base.test_random_slots_never_break_the_server.hypothesis.inner_test


@fuzz_settings(50)
@given(vcpu_num=st.integers(1, 16), slots=st.lists(base.slot, min_size=16, max_size=16))
def test_random_slot_bytes(vcpu_num, slots):
    count("ioreq.slot_bytes")
    _inner(vcpu_num, slots)


@pytest.fixture(scope="module")
def vm():
    vm, _ = build_vm()
    yield vm
    vm._release()


def _targets(vm) -> list[tuple[int, int, int]]:
    """(request type, base, length) of everything registered, plus holes around it."""
    out = [(abi.IOREQ_TYPE_PORTIO, r.base, r.length) for r in vm.ports.ranges()]
    out += [(abi.IOREQ_TYPE_MMIO, r.base, min(r.length, 0x10000)) for r in vm.mmio.ranges()]
    out += [(abi.IOREQ_TYPE_PORTIO, 0xCF8, 8), (abi.IOREQ_TYPE_MMIO, 0x7FFF_F000, 0x2000),
            (abi.IOREQ_TYPE_PORTIO, 0, 0x10000)]
    return out


op = st.tuples(
    st.integers(0, 10_000),                      # which target (mod number of targets)
    st.integers(0, 0xFFFF_FFFF),                 # offset inside it (mod length)
    st.sampled_from([1, 2, 4, 8, 3, 0]),         # size
    st.booleans(),                               # write?
    st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 0xFF, 0xFFFF_FFFF])),
    st.tuples(st.sampled_from([0, 0, 0, 1, 255]),
              st.one_of(st.sampled_from([0, 3, 4, 5, 6, 7, 8, 9, 31]), st.integers(0, 31)),
              st.sampled_from([0, 0, 0, 1, 7]),
              st.one_of(st.integers(0, 0x100), st.integers(0, 0x1000))),
    st.booleans(),                               # PCICFG instead of the target
)


class _Tracebacks(logging.Handler):
    """Keeps the tracebacks the server logs (at DEBUG) when a handler raises."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append("".join(traceback.format_exception(*record.exc_info)))


class _Hv:
    def __init__(self) -> None:
        self.finished: list[int] = []

    def notify_request_finish(self, vcpu: int) -> None:
        self.finished.append(vcpu)


@fuzz_settings(60)
@given(ops=st.lists(op, min_size=1, max_size=40))
def test_requests_into_every_device(vm, ops):
    count("ioreq.devices")
    reset_vm(vm)
    targets = _targets(vm)
    page_mm = new_ioreq_page()
    page = memoryview(page_mm)
    hv = _Hv()
    tb = _Tracebacks()
    ioreq_log = logging.getLogger("devicemodel.ioreq")
    ioreq_log.addHandler(tb)
    old_level = ioreq_log.level
    ioreq_log.setLevel(logging.DEBUG)
    server = IoreqServer(hv, page_mm, 1, vm.ports, vm.mmio, vm.pci)  # type: ignore[arg-type]
    try:
        for which, offset, size, write, value, bdfr, pcicfg in ops:
            rtype, base_addr, length = targets[which % len(targets)]
            addr = base_addr + offset % length
            direction = abi.IOREQ_DIR_WRITE if write else abi.IOREQ_DIR_READ
            if pcicfg:
                rtype = abi.IOREQ_TYPE_PCICFG
            page[0:256] = bytes(256)
            struct.pack_into("<I", page, 0, rtype)
            struct.pack_into("<IIQQQ", page, 64, direction, 0, addr, size, value)
            if pcicfg:
                struct.pack_into("<IIII", page, abi.SLOT_PCI_BDFR_OFF, *bdfr)
            struct.pack_into("<II", page, abi.SLOT_KERNEL_HANDLED_OFF, 0,
                             abi.IOREQ_STATE_PROCESSING)
            assert server.scan() == 1
            assert hv.finished[-1] == 0
            (state,) = struct.unpack_from("<I", page, abi.SLOT_PROCESSED_OFF)
            assert state == abi.IOREQ_STATE_PROCESSING  # the DM never writes it
            if not write:
                wide = rtype == abi.IOREQ_TYPE_MMIO
                (result,) = struct.unpack_from("<Q" if wide else "<I", page,
                                               abi.SLOT_VALUE_OFF)
                # a request the server rejects as malformed may answer 4 bytes of ones
                # (the hypervisor masks by size); a handled one answers within its size
                if size in (1, 2, 4, 8) and not pcicfg and (wide or addr <= 0xFFFF):
                    assert result < 1 << (8 * size)
        assert server.stats["handler_error"] == 0, \
            "a device handler raised:\n" + "".join(tb.seen)
    finally:
        ioreq_log.removeHandler(tb)
        ioreq_log.setLevel(old_level)
        server.page.release()
        page.release()
        page_mm.close()


def test_guest_accesses_through_the_hsm_path(tmp_path):
    """Guest port/MMIO accesses posted by the sim vCPU into a running VM: the HSM half
    (hsm/hsm_dispatch.py, shared with the KVM backend: cached CF8, CFC..CFF turned into
    PCICFG in place, ioeventfd matching) and the IoreqServer answer each one; the vCPU
    always gets a value within its access size, no handler raises, nothing hangs."""
    import trio

    from devicemodel.hsm.sim import SimHypervisor
    from devicemodel.vm import running

    from ._vm import IMAGE, SLOTS

    with open(IMAGE, "wb") as f:
        f.truncate(1 << 20)
    accesses = st.lists(st.tuples(
        st.sampled_from(["pio", "pio", "mmio"]),
        st.one_of(st.sampled_from([0xCF8, 0xCFC, 0xCFD, 0xCFE, 0xCFF, 0x70, 0x71, 0x3F8,
                                   0x3FD, 0x400, 0x404, 0xCF9, 0x2000, 0x3000, 0x3010,
                                   0x4000, 0x6000]),
                  st.integers(0, 0xFFFF),
                  st.integers(0x8000_0000, 0x8002_0000), st.integers(0xE000_0000, 0xE010_0000)),
        st.sampled_from([1, 2, 4, 8]),
        st.booleans(),
        st.one_of(st.integers(0, 2**64 - 1),
                  st.builds(lambda b, d, f, r: 0x8000_0000 | b << 16 | d << 11 | f << 8 | r,
                            st.sampled_from([0, 0, 1]), st.sampled_from([0, 3, 4, 5, 6, 7, 8]),
                            st.sampled_from([0, 0, 1]), st.integers(0, 0xFF)))),
        min_size=1, max_size=30)

    async def main() -> None:
        args = ["-m", "128M"]
        for s in SLOTS:
            if "lpc" not in s:
                args += ["-s", s]
        sim = SimHypervisor()
        async with running([*args, "fuzzvm"], hypervisor=sim) as vm:
            await trio.to_thread.run_sync(run_examples, vm, sim)

    def run_examples(vm, sim) -> None:
        @fuzz_settings(40)
        @given(ops=accesses)
        def one(ops):
            count("ioreq.hsm_path")
            trio.from_thread.run(play, vm, sim, ops)

        drive(one)

    async def play(vm, sim, ops) -> None:
        g = sim.guest(0)
        errors = vm.server.stats["handler_error"]
        with trio.fail_after(10):
            for kind, addr, size, write, value in ops:
                if kind == "pio":
                    size = min(size, 4)
                    if write:
                        value = _no_poweroff(addr, size, value)
                        await g.pio_write(addr, size, value & ((1 << 8 * size) - 1))
                    else:
                        got = await g.pio_read(addr, size)
                        assert 0 <= got < 1 << 32
                elif write:
                    await g.mmio_write(addr, size, value & ((1 << 8 * size) - 1))
                else:
                    got = await g.mmio_read(addr, size)
                    assert 0 <= got < 1 << 64
        assert vm.server.stats["handler_error"] == errors, "a device handler raised"

    trio.run(main)


def _no_poweroff(addr: int, size: int, value: int) -> int:
    """Clear SLP_EN (PM1a control bit 13, in port 0x405) and the 0xCF9 reset bits in a
    port write: a guest may power its VM off or reset it, which would end the VM these
    inputs share (found by the fast long mode, as SimVmGone on every later input)."""
    for port, bits in ((0x405, 0x20), (0xCF9, 0x0C)):
        i = port - addr
        if 0 <= i < size:
            value &= ~(bits << 8 * i)
    return value
