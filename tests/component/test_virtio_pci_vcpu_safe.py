"""Which virtio-pci register accesses a request thread (a KVM vCPU, the ACRN waiter) may
answer itself behind the loop gate, and that it answers them exactly as the loop does.

``handle_slot(off, vcpu_safe_only=True)`` is the decision a request thread makes: True
means it served the slot (the loop will not see it), False that it left the slot alone
for the loop. A Linux probe is mostly common-config accesses; status writes (which start
and reset the device), notify and device config stay on the loop.
"""

from __future__ import annotations

import struct

import pytest

from devicemodel.hsm import abi
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.virtio.pci.layout import (
    C_DFSELECT,
    C_NUMQ,
    C_Q_SELECT,
    C_Q_SIZE,
    C_STATUS,
    DEVICE_OFF,
    ISR_OFF,
    L_HOST_FEATURES,
    L_ISR,
    L_QUEUE_NOTIFY,
    L_QUEUE_PFN,
    L_QUEUE_SEL,
    L_STATUS,
    NOTIFY_OFF,
)
from devicemodel.vm import running

_HEAD = struct.Struct("<I60xIIQQQ")  # type; direction, reserved, address, size, value
VCPU = 1  # a slot no vCPU of the sim uses while the test runs synchronously
MARK = 0x5A5A_5A5A_5A5A_5A5A


def _slot(vm, rtype: int, addr: int, size: int, write: bool, value: int = MARK):  # noqa: ANN001
    off = abi.slot_offset(VCPU)
    direction = abi.IOREQ_DIR_WRITE if write else abi.IOREQ_DIR_READ
    _HEAD.pack_into(vm.server.page, off, rtype, direction, 0, addr, size, value)
    return off


def _value(vm, off: int) -> int:  # noqa: ANN001
    return struct.unpack_from("<Q", vm.server.page, off + abi.SLOT_VALUE_OFF)[0]


def _access(vm, rtype: int, addr: int, size: int, write: bool = False,  # noqa: ANN001
            value: int = 0) -> tuple[bool, int]:
    """(served here, what the slot's value field holds after)."""
    off = _slot(vm, rtype, addr, size, write, value if write else MARK)
    here = vm.server.handle_slot(off, True)
    return here, _value(vm, off)


def _loop(vm, rtype: int, addr: int, size: int) -> int:  # noqa: ANN001
    off = _slot(vm, rtype, addr, size, False)
    assert vm.server.handle_slot(off)
    return _value(vm, off)


MMIO, PIO = abi.IOREQ_TYPE_MMIO, abi.IOREQ_TYPE_PORTIO


@pytest.mark.parametrize("dev", ["virtio-rnd", "virtio-blk"])
async def test_modern_common_config_is_answered_here_status_and_notify_are_not(tmp_path, dev):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    opts = f"{img},modern" if dev == "virtio-blk" else "modern"
    async with running(["-m", "128M", "-s", f"3,{dev},{opts}", "vm1"],
                       hypervisor=SimHypervisor()) as vm:
        bar4 = vm.device(3).bar(4).addr
        fn = vm.device(3)
        # reads of the common configuration: served here, the same value as the loop's
        for off, size in ((C_NUMQ, 2), (C_DFSELECT, 4), (C_Q_SIZE, 2), (C_STATUS, 1)):
            here, got = _access(vm, MMIO, bar4 + off, size)
            assert here and got == _loop(vm, MMIO, bar4 + off, size) != MARK
        assert _access(vm, MMIO, bar4 + ISR_OFF, 1) == (True, 0)
        # plain writes: served here and they take
        assert _access(vm, MMIO, bar4 + C_Q_SELECT, 2, True, 0)[0]
        assert fn.queue_sel == 0
        # a status write (it starts or resets the device), device config, notify and the
        # ISR written: left alone, the slot untouched, the device unchanged
        status = fn.status
        for off, size, write in ((C_STATUS, 1, True), (DEVICE_OFF, 4, False),
                                 (NOTIFY_OFF, 2, True), (ISR_OFF, 1, True)):
            here, got = _access(vm, MMIO, bar4 + off, size, write, 0xF if write else 0)
            assert not here and got == (0xF if write else MARK)
        assert fn.status == status


async def test_legacy_registers_reads_and_plain_writes_here_the_rest_on_the_loop(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    async with running(["-m", "128M", "-s", f"3,virtio-blk,{img}", "vm1"],
                       hypervisor=SimHypervisor()) as vm:
        bar0 = vm.device(3).bar(0).addr
        for off, size in ((L_HOST_FEATURES, 4), (L_STATUS, 1), (L_ISR, 1)):
            here, got = _access(vm, PIO, bar0 + off, size)
            assert here and got & 0xFFFF_FFFF == _loop(vm, PIO, bar0 + off, size) & 0xFFFF_FFFF
        assert _access(vm, PIO, bar0 + L_QUEUE_SEL, 2, True, 0)[0]
        for off, size in ((L_QUEUE_PFN, 4), (L_QUEUE_NOTIFY, 2), (L_STATUS, 1)):
            assert not _access(vm, PIO, bar0 + off, size, True, 1)[0]
        assert not _access(vm, PIO, bar0 + 20, 4)[0]  # device config (MSI-X off)
