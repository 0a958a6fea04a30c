"""Resets reach a passthrough device (issue 18, item 6).

A guest reboots through port 0xCF9 while the device holds a message (raised while its
vector was masked, so the physical pending bit is set): before the fix the host function
was not reset, the pending bit stayed, and the rebooted guest received the old message as
soon as it unmasked that vector, with no new device event. acrn-dm re-runs passthrough
init on a VM reset, which resets the function through sysfs; so do we. A guest's own
Function Level Reset (PCI Express Device Control bit 15) likewise returns MSI-X to
disabled with every entry masked, and resets the host function.
"""

from __future__ import annotations

import pytest
import trio

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.passthru.host import PCIE_DEVCTL, PCIE_DEVCTL_FLR, SIM_PCIE_OFF
from devicemodel.vm import running
from tests.component.test_passthru_vmsix import (
    CMD_MEMORY,
    FLAGS_ENABLE,
    MASKBIT,
    SLOT,
    LinuxGuest,
    args,
    guest_msg,
    no_more_msis,
)

CAP_PCIE = 0x10
RESET_PORT, RESET_SYSTEM_CPU = 0xCF9, 0x06


async def _pending_message(sim: SimHypervisor, vm, k: int = 3) -> LinuxGuest:
    """A guest that set up MSI-X, masked vector k, and a message k the device now holds."""
    guest = LinuxGuest(sim)
    await guest.probe()
    await guest.alloc_irq_vectors(1, 8)
    host = vm.passthrough(SLOT).host
    host.fire(0)
    with trio.fail_after(5):
        assert await sim.next_msi() == guest_msg(0)  # the device works
    await guest.mask(k)
    host.fire(k)
    assert host.msi.pending >> k & 1  # held by the device, shown in the PBA
    assert await guest.pba_bits() >> k & 1
    return guest


async def _reboot(sim: SimHypervisor, vm) -> None:
    """The guest writes 0xCF9; wait until the VM runs again."""
    resets = vm.guest_power.resets
    await sim.guest(0).pio_write(RESET_PORT, 1, RESET_SYSTEM_CPU)
    with trio.fail_after(10):
        while vm.guest_power.resets == resets or sim.state != "running":
            await trio.sleep(0.01)


async def _set_up_again(sim: SimHypervisor, k: int) -> LinuxGuest:
    """The rebooted guest's driver: new messages, every vector unmasked."""
    guest = LinuxGuest(sim)
    await guest.probe()
    msgs = [(0xFEE0_1000, 0x60 + i) for i in range(8)]
    seen = len(sim.msis)
    await guest.alloc_irq_vectors(1, 8, msgs)
    # no device event since the reset: nothing may arrive
    for _ in range(5):
        assert await no_more_msis(sim, seen), sim.msis[seen:]
    return guest


async def test_a_guest_reset_resets_the_passthrough_device():
    sim = SimHypervisor()
    async with running(args("vmsix_on_msi", "sim:8"), hypervisor=sim) as vm:
        dev = vm.passthrough(SLOT)
        resets = dev.host.resets
        await _pending_message(sim, vm, 3)
        await _reboot(sim, vm)
        guest = await _set_up_again(sim, 3)  # the old message does not come back
        assert await guest.pba_bits() == 0
        assert dev.host.resets == resets + 1  # the host function was reset
        dev.host.fire(3)  # a new event is delivered with the new message
        with trio.fail_after(5):
            assert await sim.next_msi() == (0xFEE0_1000, 0x63)


async def test_no_reset_keeps_the_function_as_acrn_dm_does():
    sim = SimHypervisor()
    async with running(args("vmsix_on_msi,no_reset", "sim:8"), hypervisor=sim) as vm:
        dev = vm.passthrough(SLOT)
        await _pending_message(sim, vm, 3)
        await _reboot(sim, vm)
        assert dev.host.resets == 0
        assert not dev.host.msi.enabled  # still: disabled and masked for the new guest
        assert dev.host.msi.mask == 0xFF


async def _flr(guest: LinuxGuest, width: int) -> None:
    """pcie_flr: set Initiate Function Level Reset in Device Control (a word write, as
    Linux does; or the register's high byte alone, or the whole dword with Status)."""
    caps = await guest.caps()
    devctl = caps[CAP_PCIE] + PCIE_DEVCTL
    value = await guest.cfg_r(devctl, 2) | PCIE_DEVCTL_FLR
    if width == 1:
        await guest.cfg_w(devctl + 1, 1, value >> 8)
    else:
        await guest.cfg_w(devctl, width, value)


@pytest.mark.parametrize("width", [2, 1, 4])
async def test_a_guest_flr_disables_msix_masks_every_entry_and_resets_the_function(width):
    sim = SimHypervisor()
    async with running(args("vmsix_on_msi", "sim:8:flr"), hypervisor=sim) as vm:
        dev = vm.passthrough(SLOT)
        resets = dev.host.resets
        guest = await _pending_message(sim, vm, 3)
        assert (await guest.caps())[CAP_PCIE] == SIM_PCIE_OFF
        await _flr(guest, width)
        assert dev.host.resets == resets + 1
        assert await guest.cfg_r(0x04, 2) == 0  # the function's registers are at defaults
        await guest.cfg_w(0x04, 2, CMD_MEMORY)  # pci_restore_state turns decoding back on
        assert not await guest.cfg_r(guest.msix_cap + 2, 2) & FLAGS_ENABLE
        for k in range(8):
            assert await guest.entry_r(k, 12) == MASKBIT
        assert await guest.pba_bits() == 0
        assert dev.host.msi.pending == 0 and not dev.host.msi.enabled
        await _set_up_again(sim, 3)  # the old message does not come back
        dev.host.fire(5)
        with trio.fail_after(5):
            assert await sim.next_msi() == (0xFEE0_1000, 0x65)


@pytest.mark.parametrize("spec", ["sim:8", "sim:8:flr"])
async def test_flr_is_ignored_where_the_device_cannot_do_it(spec):
    """No PCI Express capability, or a write without the FLR bit: nothing is reset."""
    sim = SimHypervisor()
    async with running(args("vmsix_on_msi", spec), hypervisor=sim) as vm:
        dev = vm.passthrough(SLOT)
        resets = dev.host.resets
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 8)
        caps = await guest.caps()
        if CAP_PCIE in caps:  # Device Control written without bit 15
            await guest.cfg_w(caps[CAP_PCIE] + PCIE_DEVCTL, 2, 0x7FFF)
        else:  # the same register offset in a device without the capability
            await guest.cfg_w(SIM_PCIE_OFF + PCIE_DEVCTL, 2, PCIE_DEVCTL_FLR)
        assert dev.host.resets == resets
        assert await guest.cfg_r(guest.msix_cap + 2, 2) & FLAGS_ENABLE


async def test_acrn_vm_reset_deassigns_resets_and_assigns_again():
    """On ACRN the hypervisor owns the device's interrupts: acrn-dm's deinit/init pair on a
    VM reset is DEASSIGN, the sysfs reset, ASSIGN again (with the same BARs)."""
    from tests.component.test_passthru_acrn import calls
    from tests.support.acrn_fake import ASSIGN_PCIDEV, DEASSIGN_PCIDEV, FakeHsm, new_hv

    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    async with running(args("vmsix_on_msi", "sim:8"), hypervisor=hv) as vm:
        dev = vm.passthrough(SLOT)
        resets = dev.host.resets
        (assign,) = calls(fake, ASSIGN_PCIDEV, DEASSIGN_PCIDEV)
        vm.pci.reset()
        assert calls(fake, ASSIGN_PCIDEV, DEASSIGN_PCIDEV) == [
            assign, (DEASSIGN_PCIDEV, assign[1]), assign]
        assert dev.host.resets == resets + 1
