"""Passthrough on the ACRN backend: the hypervisor owns config space and does vMSI-X on
MSI itself; the device model gives the virtual BAR a guest address and sends exactly
acrn-dm's ioctls (acrn-facts §3.7, §5.6). Checked as bytes against the recording HSM fake.
"""

from __future__ import annotations

import struct

import pytest

from devicemodel.config import ConfigError
from devicemodel.vm import running
from tests.support.acrn_fake import (
    ASSIGN_PCIDEV,
    DEASSIGN_PCIDEV,
    RESET_PTDEV_INTR,
    SET_PTDEV_INTR,
    FakeHsm,
    new_hv,
)

SLOT = 5
VIRT_BDF = SLOT << 3
PHYS_BDF = 0xFE00 | SLOT << 3  # the synthetic device's BDF for slot 5


def pcidev(line: int, pin: int, bars: tuple[int, ...]) -> bytes:
    """struct acrn_pcidev (36 B): type, virt_bdf, phys_bdf, intr_line, intr_pin, pad, bar[6]."""
    return struct.pack("<IHHBB2x6I", 0, VIRT_BDF, PHYS_BDF, line, pin, *bars)


def calls(fake: FakeHsm, *requests: int) -> list[tuple[int, bytes]]:
    return [(r, a) for r, a in fake.calls if r in requests]


async def test_vmsix_on_msi_is_the_bar_address_in_assign_pcidev():
    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    args = ["-m", "128M", "-s", f"{SLOT},passthru,sim:4,vmsix_on_msi", "vm1"]
    async with running(args, hypervisor=hv) as vm:
        dev = vm.passthrough(SLOT)
        assert dev.vmsix is None  # the hypervisor emulates it, not us
        bar0, bar1 = dev.bar(0).addr, dev.bar(1).addr
        assert (bar0, bar1) == (0x8000_0000, 0x8000_1000)  # passthrough first, 4 KiB each
        assert not dev.bar(1).trap and not dev.bar(0).trap  # never registered by the DM
        want = pcidev(0xFF, 0, (bar0, bar1, 0, 0, 0, 0))
        assert calls(fake, ASSIGN_PCIDEV, SET_PTDEV_INTR) == [(ASSIGN_PCIDEV, want)]
        dev.cfg_write(0x04, 2, 0x7)  # even with decoding on, the hypervisor maps them
        assert not [r for r in vm.mmio.ranges() if r.base in (bar0, bar1)]
    assert calls(fake, DEASSIGN_PCIDEV) == [(DEASSIGN_PCIDEV, want)]


async def test_keep_gsi_sets_up_intx_before_assigning():
    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    args = ["-m", "128M", "-s", f"{SLOT},passthru,sim:4,keep_gsi", "vm1"]
    async with running(args, hypervisor=hv) as vm:
        dev = vm.passthrough(SLOT)
        gsi = dev.intx.gsi
        line, pin = dev.cfg.get8(0x3C), dev.cfg.get8(0x3D)
        assert pin == 1 and gsi is not None
        intx = struct.pack("<IHHIII", 0, VIRT_BDF, PHYS_BDF, gsi, 11, 0)
        got = calls(fake, ASSIGN_PCIDEV, SET_PTDEV_INTR)
        # acrn-dm assigns before INTx is routed (INTLINE still 255), then binds the pin
        assert got == [(ASSIGN_PCIDEV, pcidev(0xFF, pin, (0x8000_0000, 0, 0, 0, 0, 0))),
                       (SET_PTDEV_INTR, intx)]
        assert line != 0xFF  # the guest's INTLINE is routed all the same
    reset = struct.pack("<IHHIII", 0, VIRT_BDF, PHYS_BDF, gsi, 0, 0)
    assert calls(fake, RESET_PTDEV_INTR, DEASSIGN_PCIDEV)[0] == (RESET_PTDEV_INTR, reset)


async def test_irq_option_overrides_the_physical_pin():
    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    args = ["-m", "128M", "-s", f"{SLOT},passthru,sim:4,keep_gsi,irq=42", "vm1"]
    async with running(args, hypervisor=hv) as vm:
        gsi = vm.passthrough(SLOT).intx.gsi
        intx = struct.pack("<IHHIII", 0, VIRT_BDF, PHYS_BDF, gsi, 42, 0)
        assert calls(fake, SET_PTDEV_INTR) == [(SET_PTDEV_INTR, intx)]


async def test_no_intx_without_keep_gsi_for_an_msi_device():
    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    async with running(["-m", "128M", "-s", f"{SLOT},passthru,sim:4", "vm1"], hypervisor=hv):
        assert calls(fake, SET_PTDEV_INTR) == []
        assert len(calls(fake, ASSIGN_PCIDEV)) == 1


async def test_acrn_mode_wants_the_bar_the_hypervisor_will_pick():
    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    args = ["-m", "128M", "-s", f"{SLOT},passthru,sim:4,vmsix_on_msi,2", "vm1"]
    with pytest.raises(ConfigError, match="first unused BAR, 1; write vmsix_on_msi,1"):
        async with running(args, hypervisor=hv):
            pass
    assert calls(fake, ASSIGN_PCIDEV) == []
