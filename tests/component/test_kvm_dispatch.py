"""The HSM half the KVM backend runs on each exit (hsm_dispatch.py) against the sim
backend's: any guest sequence of port accesses, CF8/CFC included, must reach the device
model as the same requests and give the guest the same values."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.hsm import abi
from devicemodel.hsm.hsm_dispatch import HsmDispatcher, IoEventFdReg, cf8_to_pcicfg
from tests.support.served import served

_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


def pio_answer(port: int, size: int) -> int:
    return (port * 0x9E37 + size) & _MASK[size]


def cfg_answer(bus: int, dev: int, func: int, reg: int, size: int) -> int:
    return ((bus << 24) ^ (dev << 16) ^ (func << 8) ^ reg ^ 0x5A5A_5A5A) & _MASK[size]


class PortLog:
    def __init__(self, log: list) -> None:
        self.log = log

    def read(self, offset: int, size: int) -> int:
        self.log.append(("pio", "r", offset, size))
        return pio_answer(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("pio", "w", offset, size, value))


class CfgLog:
    def __init__(self, log: list) -> None:
        self.log = log

    def cfg_read(self, bus: int, dev: int, func: int, reg: int, size: int) -> int:
        self.log.append(("cfg", "r", bus, dev, func, reg, size))
        return cfg_answer(bus, dev, func, reg, size)

    def cfg_write(self, bus: int, dev: int, func: int, reg: int, size: int, value: int) -> None:
        self.log.append(("cfg", "w", bus, dev, func, reg, size, value))


def through_hsm_dispatch(ops: list[tuple[int, int, bool, int]]) -> tuple[list, list]:
    """Run the accesses the way the KVM vCPU thread does, with a stand-in device model."""
    page = memoryview(bytearray(abi.IOREQ_PAGE_SIZE))
    hsm = HsmDispatcher()
    log: list = []
    seen: list[int] = []
    for port, size, write, value in ops:
        direction = abi.IOREQ_DIR_WRITE if write else abi.IOREQ_DIR_READ
        value &= _MASK[size] if write else 0
        page[: abi.SLOT_PROCESSED_OFF] = bytes(abi.SLOT_PROCESSED_OFF)
        abi.SLOT_U32.pack_into(page, abi.SLOT_TYPE_OFF, abi.IOREQ_TYPE_PORTIO)
        abi.SLOT_ADDR_REQ.pack_into(page, abi.SLOT_REQS_OFF, direction, 0, port, size)
        abi.SLOT_U32.pack_into(page, abi.SLOT_VALUE_OFF, value)
        abi.SLOT_U32.pack_into(page, abi.SLOT_PROCESSED_OFF, abi.IOREQ_STATE_PENDING)
        done = hsm.dispatch(page, 0, abi.IOREQ_TYPE_PORTIO, direction, port, size, value)
        state = abi.SLOT_U32.unpack_from(page, abi.SLOT_PROCESSED_OFF)[0]
        assert (state == abi.IOREQ_STATE_COMPLETE) == done
        if not done:
            (rtype,) = abi.SLOT_U32.unpack_from(page, abi.SLOT_TYPE_OFF)
            if rtype == abi.IOREQ_TYPE_PCICFG:
                bus, dev, func, reg = (abi.SLOT_U32.unpack_from(
                    page, abi.SLOT_PCI_BDFR_OFF + 4 * i)[0] for i in range(4))
                if write:
                    log.append(("cfg", "w", bus, dev, func, reg, size, value))
                else:
                    log.append(("cfg", "r", bus, dev, func, reg, size))
                    abi.SLOT_U32.pack_into(page, abi.SLOT_VALUE_OFF,
                                           cfg_answer(bus, dev, func, reg, size))
            else:
                assert rtype == abi.IOREQ_TYPE_PORTIO
                if write:
                    log.append(("pio", "w", port, size, value))
                else:
                    log.append(("pio", "r", port, size))
                    abi.SLOT_U32.pack_into(page, abi.SLOT_VALUE_OFF, pio_answer(port, size))
        if not write:
            seen.append(abi.SLOT_U32.unpack_from(page, abi.SLOT_VALUE_OFF)[0] & _MASK[size])
    return log, seen


async def through_sim(ops: list[tuple[int, int, bool, int]]) -> tuple[list, list]:
    log: list = []
    seen: list[int] = []
    async with served(pci=CfgLog(log)) as s:
        s.ports.register(0, 0x10000, PortLog(log), "everything")
        guest = s.sim.guest()
        for port, size, write, value in ops:
            if write:
                await guest.pio_write(port, size, value)
            else:
                seen.append(await guest.pio_read(port, size))
    return log, seen


PORTS = st.one_of(st.integers(0xCF8, 0xCFF), st.integers(0, 0xFFFF - 4))
OPS = st.lists(
    st.tuples(PORTS, st.sampled_from((1, 2, 4)), st.booleans(),
              st.one_of(st.integers(0, 0xFFFF_FFFF),
                        st.integers(0, 0x7FFF_FFFF).map(lambda v: v | 0x8000_0000))),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(OPS)
async def test_kvm_hsm_half_agrees_with_sim(ops):
    assert through_hsm_dispatch(ops) == await through_sim(ops)


@given(st.integers(0, 0xFFFF_FFFF), st.integers(0xCFC, 0xCFF))
def test_cf8_decode_covers_extended_registers(cf8, port):
    bus, dev, func, reg = cf8_to_pcicfg(cf8, port)
    assert 0 <= bus <= 0xFF and 0 <= dev <= 0x1F and 0 <= func <= 7
    assert reg == ((cf8 >> 16) & 0xF00) | (cf8 & 0xFC) | (port - 0xCFC)
    assert 0 <= reg <= 0xFFF


def test_ioeventfd_matching_follows_acrn():
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        hsm = HsmDispatcher()
        hsm.add_ioeventfd(IoEventFdReg(efd, 0x1000, 4, pio=False, datamatch=7))
        page = memoryview(bytearray(abi.IOREQ_PAGE_SIZE))
        mmio, w, r = abi.IOREQ_TYPE_MMIO, abi.IOREQ_DIR_WRITE, abi.IOREQ_DIR_READ
        assert not hsm.dispatch(page, 0, mmio, w, 0x1000, 4, 8)  # other data
        assert not hsm.dispatch(page, 0, mmio, w, 0x1002, 2, 7)  # not the exact address
        assert not hsm.dispatch(page, 0, abi.IOREQ_TYPE_PORTIO, w, 0x1000, 4, 7)  # PIO
        assert hsm.dispatch(page, 0, mmio, w, 0x1000, 2, 7)  # narrower write matches
        assert os.eventfd_read(efd) == 1
        abi.SLOT_U64.pack_into(page, abi.SLOT_VALUE_OFF, 0xFFFF)
        assert hsm.dispatch(page, 0, mmio, r, 0x1002, 2, 0)  # reads inside return 0
        assert abi.SLOT_U64.unpack_from(page, abi.SLOT_VALUE_OFF)[0] == 0
        hsm.clearing = True
        assert hsm.dispatch(page, 0, mmio, r, 0x5000, 4, 0)  # clearing completes all
    finally:
        os.close(efd)


_reg = st.builds(
    lambda pio, address, length, match: (pio, address, length, match),
    st.booleans(), st.integers(0xC00, 0xD10), st.sampled_from([1, 2, 4, 8]),
    st.one_of(st.none(), st.integers(0, 3)))


@settings(max_examples=200, deadline=None)
@given(regs=st.lists(_reg, max_size=4), cf8=st.integers(0, 0xFFFF_FFFF),
       pio=st.booleans(),
       address=st.one_of(st.sampled_from([0xCF8, 0xCFC, 0xCFD, 0xCFE, 0xCFF]),
                         st.integers(0xC00, 0xD18)), size=st.sampled_from([1, 2, 4, 8]),
       write=st.booleans(), value=st.integers(0, 3), drop=st.integers(0, 4))
def test_the_hsm_half_claims_nothing_outside_its_claimed_addresses(
        regs, cf8, pio, address, size, write, value, drop):
    """The KVM vCPU thread skips ``dispatch`` for an address outside ``claimed_pio`` /
    ``claimed_mmio`` (requests.py): that is only right if ``dispatch`` neither completes
    nor rewrites a slot for any such address, whatever is registered (or was, and was
    removed) and whatever CF8 holds."""
    hsm = HsmDispatcher()
    fds = []
    try:
        added = []
        for r_pio, r_addr, r_len, match in regs:
            fds.append(os.eventfd(0, os.EFD_NONBLOCK))
            reg = IoEventFdReg(fds[-1], r_addr, r_len, r_pio, match)
            hsm.add_ioeventfd(reg)
            added.append(reg)
        if added and drop < len(added):
            hsm.remove_ioeventfd(added[drop])
        hsm.pci_conf_addr = cf8
        page = memoryview(bytearray(abi.IOREQ_PAGE_SIZE))
        rtype = abi.IOREQ_TYPE_PORTIO if pio else abi.IOREQ_TYPE_MMIO
        direction = abi.IOREQ_DIR_WRITE if write else abi.IOREQ_DIR_READ
        before = bytes(page)
        done = hsm.dispatch(page, 0, rtype, direction, address, size, value)
        claimed = hsm.claimed_pio if pio else hsm.claimed_mmio
        if address not in claimed:
            assert not done and bytes(page) == before
    finally:
        for fd in fds:
            os.close(fd)
