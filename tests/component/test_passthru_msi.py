"""Plain MSI of a passthrough device on the sim backend (the device model virtualizes it
through interrupt remapping), and the KVM/VFIO-style remapper: eventfd per message routed
by irqfd."""

from __future__ import annotations

import pytest
import trio

from devicemodel.config import ConfigError
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.hsm.sim_remap import SimRemapper, decode_remappable, remappable_address
from devicemodel.irq.remap import IrqfdRemapper
from devicemodel.passthru.host import SimHostDevice
from devicemodel.passthru.kernel_msi import KernelOwnedMsi
from devicemodel.passthru.vmsix_on_msi import VmsixOnMsi, check_eligible
from devicemodel.pci import config as pc
from devicemodel.vm import running

SLOT = 6
MSI = 0x50  # where the synthetic device has its MSI capability


async def test_plain_msi_is_virtualized_with_every_message():
    sim = SimHypervisor()
    args = ["-m", "128M", "-s", f"{SLOT},passthru,sim:4", "vm1"]
    async with running(args, hypervisor=sim) as vm:
        g = sim.guest(0)

        async def w(off, size, val):
            await g.pci_cfg_write(0, SLOT, 0, off, size, val)

        async def r(off, size):
            return await g.pci_cfg_read(0, SLOT, 0, off, size)

        host = vm.passthrough(SLOT).host
        assert await r(MSI, 1) == 0x05  # the guest sees MSI, MMC = 2 (not hidden)
        assert (await r(MSI + 2, 2) >> 1) & 7 == 2
        await w(0x04, 2, 0x6)  # memory + bus master
        # Linux msi_capability_init for 2 messages: mask, program, MME=1, enable
        await w(MSI + 0x10, 4, 0x3)
        await w(MSI + 4, 4, 0xFEE0_2000)
        await w(MSI + 8, 4, 0)
        await w(MSI + 12, 2, 0x40)
        ctrl = await r(MSI + 2, 2)
        await w(MSI + 2, 2, (ctrl & ~0x70) | 0x10)
        await w(0x04, 2, 0x406)
        await w(MSI + 2, 2, (ctrl & ~0x70) | 0x11)
        await w(MSI + 0x10, 4, 0x0)
        assert host.msi.enabled and host.msi.control >> 4 & 7 == 1
        assert decode_remappable(*host.msi.message()) is not None
        host.fire(0)
        host.fire(1)
        host.fire(3)  # four sources, two messages: source 3 shares message 1
        with trio.fail_after(5):
            got = [await sim.next_msi() for _ in range(3)]
        assert got == [(0xFEE0_2000, 0x40), (0xFEE0_2000, 0x41), (0xFEE0_2000, 0x41)]
        await w(MSI + 0x10, 4, 0x2)  # mask message 1: held, pending visible to the guest
        host.fire(1)
        assert await r(MSI + 0x14, 4) == 0x2
        assert len(sim.msis) == 3
        await w(MSI + 0x10, 4, 0x0)
        with trio.fail_after(5):
            assert await sim.next_msi() == (0xFEE0_2000, 0x41)
        await w(MSI + 2, 2, ctrl & ~0x71)  # disable: the device goes quiet on MSI
        assert not host.msi.enabled
        host.fire(0)
        await trio.sleep(0)
        assert len(sim.msis) == 4
    assert not host.msi.enabled and sim.remap_table == {}


async def test_irqfd_remapper_routes_each_message_through_an_eventfd():
    """KVM/VFIO: the kernel owns the device's MSI (KernelOwnedMsi); a masked entry's
    message waits in its eventfd and shows in the PBA."""
    sim = SimHypervisor()
    async with running(["-m", "128M", "vm1"], hypervisor=sim) as vm:
        host = SimHostDevice(4)
        msi, bar = check_eligible(host)
        msi = KernelOwnedMsi(host, msi.offset)
        cfg = pc.ConfigSpace(extended=True)
        cfg.set_bytes(0, host.snapshot())
        remappers: list[IrqfdRemapper] = []

        def factory(n: int) -> IrqfdRemapper:
            remappers.append(IrqfdRemapper(vm.irq, host, n))
            return remappers[-1]

        v = VmsixOnMsi(host, msi, bar, cfg, factory)
        host.config_write(0x04, 2, 0x6)
        cfg.write(MSI + 2, 2, 0xC000)  # enable + function mask
        v.config_written(MSI + 2, 2)
        for k in range(4):
            v.bar_write(16 * k, 8, 0xFEE0_0000 | k << 12)
            v.bar_write(16 * k + 8, 4, 0x50 + k)
            v.bar_write(16 * k + 12, 4, 0)
        cfg.write(MSI + 2, 2, 0x8000)
        v.config_written(MSI + 2, 2)
        assert host.msi.mask == 0
        host.fire(2)
        with trio.fail_after(5):
            assert await sim.next_msi() == (0xFEE0_2000, 0x52)
        v.bar_write(16 * 2 + 12, 4, 1)
        host.fire(2)
        await trio.sleep(0.05)
        assert len(sim.msis) == 1 and v.pending() == 0b100
        fds = list(remappers[0].fds)
        v.close()
        assert remappers[0].fds == [] and host._eventfds is None
        assert not host.msi.enabled
        for fd in fds:
            assert fd not in sim._irqfds


def test_remappable_address_round_trips_every_handle_bit():
    for handle in (0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x1234):
        addr = remappable_address(handle)
        assert addr >> 20 == 0xFEE and addr & 0x10
        assert decode_remappable(addr, 0) == handle
    assert decode_remappable(remappable_address(8), 3) == 11  # SHV: handle + subhandle
    assert decode_remappable(remappable_address(8, shv=False), 3) == 8
    assert decode_remappable(0xFEE0_1000, 0x31) is None  # compatibility format
    assert decode_remappable(0x1000, 0) is None  # not an interrupt at all


async def test_sim_remapper_blocks_are_aligned_and_faults_are_recorded():
    sim = SimHypervisor()
    async with running(["-m", "128M", "vm1"], hypervisor=sim):
        a, b = SimHostDevice(4, bdf=0xFE08), SimHostDevice(8, bdf=0xFE10)
        ra, rb = SimRemapper(sim, a, 4), SimRemapper(sim, b, 8)
        assert ra.base % 4 == 0 and rb.base % 8 == 0
        assert set(range(ra.base, ra.base + 4)).isdisjoint(range(rb.base, rb.base + 8))
        ra.deliver(0xFEE0_1000, 0x31)  # compatibility format: blocked
        ra.deliver(remappable_address(ra.base), 1)  # no entry yet: fault
        assert len(ra.faults) == 2 and sim.msis == []
        ra.route(1, 0xFEE0_1000, 0x33)
        ra.deliver(remappable_address(ra.base), 1)
        assert sim.msis == [(0xFEE0_1000, 0x33)]
        ra.deliver(remappable_address(rb.base), 0)  # another device's block: not ours
        assert len(ra.faults) == 3
        ra.close()
        rb.close()
        assert sim.remap_table == {}


class NoRemapHypervisor(SimHypervisor):
    """A backend with neither a remap table nor eventfds."""

    name = "plain"

    def interrupt_remapper(self) -> None:
        return None

    @property
    def supports_eventfds(self) -> bool:
        return False


async def test_a_backend_without_remapping_refuses_vmsix_at_start():
    argv = ["-m", "128M", "-s", f"{SLOT},passthru,sim:4,vmsix_on_msi", "vm1"]
    with pytest.raises(ConfigError, match="vmsix_on_msi: the plain backend offers no "
                                          "interrupt remapping"):
        async with running(argv, hypervisor=NoRemapHypervisor()):
            pass


async def test_a_remapper_that_fails_leaves_the_vectors_masked(monkeypatch):
    from devicemodel.passthru import device as ptdev

    def broken(*args, **kw):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(ptdev, "remapper_for", broken)
    sim = SimHypervisor()
    argv = ["-m", "128M", "-s", f"{SLOT},passthru,sim:4,vmsix_on_msi", "vm1"]
    async with running(argv, hypervisor=sim) as vm:
        g = sim.guest(0)
        dev = vm.passthrough(SLOT)
        await g.pci_cfg_write(0, SLOT, 0, 0x04, 2, 0x6)
        await g.pci_cfg_write(0, SLOT, 0, MSI + 2, 2, 0x8000)
        table = dev.bar(1).addr
        await g.mmio_write(table, 4, 0xFEE0_0000)
        await g.mmio_write(table + 8, 4, 0x41)
        await g.mmio_write(table + 12, 4, 0)  # unmask: no remapper, so it stays masked
        assert dev.host.msi.mask == 0b1111
        dev.host.fire(0)
        await trio.sleep(0)
        assert sim.msis == []
        assert await g.mmio_read(table + 0x800, 4) == 1  # held, and the guest can see it
