"""One owner of a passthrough device's MSI capability per backend (issue 18, item 7).

Under VFIO (the KVM backend) VFIO_DEVICE_SET_IRQS makes the host kernel own the device's
MSI; Linux keeps its own copy of the per-vector mask word and writes it back whole when it
masks or unmasks one of its interrupts (pci_msi_update_mask). The device model used to
write the same mask register (and enable, MME, INTx Disable) through sysfs config, so a
mask the guest set could be undone by the kernel and the guest received a message on a
vector it had masked. ``VfioKernel`` below is a synthetic device with that kernel in
front of it; the device model must leave the capability alone and mask on its side of the
per-message eventfds (docs/vmsix-on-msi.md, "Who writes the MSI capability").
"""

from __future__ import annotations

import pytest
import trio

from devicemodel.passthru import device as ptdev
from devicemodel.passthru.host import SIM_MSI_OFF, SimHostDevice
from devicemodel.pci import caps as pcaps
from devicemodel.vm import running
from tests.component.test_passthru_vmsix import SLOT, LinuxGuest, guest_msg, no_more_msis
from tests.unit.test_passthru_host import KvmLike

MSI_LEN = 0x18  # 64-bit MSI with per-vector masking


class VfioKernel(SimHostDevice):
    """A device whose MSI the host kernel owns once it has the eventfds: every config
    write from outside (the device model) to the MSI capability is recorded, and
    ``kernel_updates_mask`` writes the kernel's mask word back, as Linux does."""

    def __init__(self, vectors: int, bdf: int) -> None:
        super().__init__(vectors, bdf=bdf)
        self.foreign_msi_writes: list[tuple[int, int, int]] = []

    def config_write(self, off: int, size: int, value: int) -> None:
        if self._eventfds is not None and off < SIM_MSI_OFF + MSI_LEN \
                and off + size > SIM_MSI_OFF:
            self.foreign_msi_writes.append((off, size, value))
        super().config_write(off, size, value)

    def kernel_updates_mask(self) -> None:
        regs = pcaps.msi_offsets(self.cs.get16(SIM_MSI_OFF + 2))
        assert regs.mask is not None
        self.cs.set32(SIM_MSI_OFF + regs.mask, self.kernel_mask)
        for k in range(self.vectors):
            self._flush(k)


@pytest.fixture
def vfio_device(monkeypatch):
    made: list[VfioKernel] = []

    def open_host(opts, slot, ctx):  # noqa: ANN001
        made.append(VfioKernel(int(opts.device.split(":")[1]), 0xFE00 | slot.dev << 3))
        return made[-1]

    monkeypatch.setattr(ptdev, "open_host", open_host)
    return made


def _args(extra: str) -> list[str]:
    return ["-m", "128M", "-s", "0:0,hostbridge", "-s", f"{SLOT},passthru,sim:4{extra}",
            "vm1"]


async def test_vmsix_mask_holds_when_the_kernel_rewrites_its_mask_word(vfio_device):
    sim = KvmLike()
    async with running(_args(",vmsix_on_msi"), hypervisor=sim):
        host = vfio_device[0]
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        host.fire(1)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(1)
        await guest.mask(2)
        host.kernel_updates_mask()  # Linux masks/unmasks one of its own interrupts
        host.fire(2)
        for _ in range(5):
            assert await no_more_msis(sim, 1), f"masked vector 2 delivered: {sim.msis}"
        assert await guest.pba_bits() == 0b100  # held, and the guest can see it
        await guest.unmask(2)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(2)  # delivered once unmasked
        assert host.foreign_msi_writes == [], "the device model wrote the kernel's MSI"


async def test_plain_msi_mask_holds_when_the_kernel_rewrites_its_mask_word(vfio_device):
    sim = KvmLike()
    async with running(_args(""), hypervisor=sim):
        host = vfio_device[0]
        g = sim.guest(0)
        msi = SIM_MSI_OFF

        async def w(off: int, size: int, val: int) -> None:
            await g.pci_cfg_write(0, SLOT, 0, off, size, val)

        await w(0x04, 2, 0x6)
        # Linux msi_capability_init for 4 messages: mask, program, MME=2, enable, unmask
        await w(msi + 0x10, 4, 0xF)
        await w(msi + 4, 4, 0xFEE0_1000)
        await w(msi + 8, 4, 0)
        await w(msi + 12, 2, 0x40)
        ctrl = await g.pci_cfg_read(0, SLOT, 0, msi + 2, 2)
        await w(msi + 2, 2, (ctrl & ~0x70) | 0x21)
        await w(msi + 0x10, 4, 0x2)  # message 1 masked, the others not
        host.fire(0)
        with trio.fail_after(5):
            assert await sim.next_msi() == (0xFEE0_1000, 0x40)
        host.kernel_updates_mask()
        host.fire(1)
        for _ in range(5):
            assert await no_more_msis(sim, 1), f"masked message 1 delivered: {sim.msis}"
        assert await g.pci_cfg_read(0, SLOT, 0, msi + 0x14, 4) == 0x2  # pending
        await w(msi + 0x10, 4, 0x0)
        with trio.fail_after(5):
            assert await sim.next_msi() == (0xFEE0_1000, 0x41)
        assert host.foreign_msi_writes == [], "the device model wrote the kernel's MSI"


async def test_a_reset_drops_what_waited_in_the_eventfds(vfio_device):
    """Item 6 on this backend: a message held in its eventfd when the guest reboots is
    not delivered to the next guest."""
    sim = KvmLike()
    async with running(_args(",vmsix_on_msi"), hypervisor=sim) as vm:
        host = vfio_device[0]
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        await guest.mask(3)
        host.fire(3)
        assert await guest.pba_bits() == 0b1000
        vm.pci.reset()
        assert host.resets == 2  # at start and at this reset
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        for _ in range(5):
            assert await no_more_msis(sim, 0), f"an old message came back: {sim.msis}"
        host.fire(3)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(3)


async def test_on_the_sim_backend_the_device_model_owns_it():
    """The sim's remap table: no kernel in between, we program the capability."""
    from devicemodel.hsm.sim import SimHypervisor
    from devicemodel.passthru.host import HostMsi
    from devicemodel.passthru.kernel_msi import KernelOwnedMsi

    async with running(_args(",vmsix_on_msi"), hypervisor=SimHypervisor()) as vm:
        msi = vm.passthrough(SLOT).vmsix.msi
        assert type(msi) is HostMsi and not isinstance(msi, KernelOwnedMsi)
        assert msi.mask == 0xF  # written by us: every vector masked at start
