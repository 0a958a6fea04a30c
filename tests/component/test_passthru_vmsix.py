"""vMSI-X on MSI, seen from a guest that does what Linux does.

The guest side replays drivers/pci/msi/msi.c for ``pci_alloc_irq_vectors(dev, 1, N,
PCI_IRQ_MSI | PCI_IRQ_MSIX)``: MSI-X is tried first; msix_capability_init sets
Enable|MaskAll, reads the table size and BIR/offset, masks every entry, writes each entry
(address lo/hi, data; the entry is masked while written), disables INTx, masks all again,
clears MaskAll; request_irq then unmasks each vector. Teardown (pci_free_irq_vectors)
masks every entry, clears Enable and re-enables INTx.
"""

from __future__ import annotations

import pytest
import trio

from devicemodel.config import ConfigError
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.hsm.sim_remap import decode_remappable
from devicemodel.passthru import device as ptdev
from devicemodel.passthru.host import SimHostDevice
from devicemodel.vm import running

CAP_MSI, CAP_MSIX = 0x05, 0x11
SLOT = 5
MASKBIT = 1
FLAGS_ENABLE, FLAGS_MASKALL = 0x8000, 0x4000
CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 0x2, 0x4, 0x400


def guest_msg(k: int) -> tuple[int, int]:
    """What Linux x86 writes for vector k: destination APIC in address bits 19:12,
    the IDT vector in data."""
    return 0xFEE0_0000 | ((k % 4) << 12), 0x0031 + k


class LinuxGuest:
    """PCI config and MMIO accesses as a Linux guest driver makes them."""

    def __init__(self, sim: SimHypervisor, dev: int = SLOT) -> None:
        self.g = sim.guest(0)
        self.dev = dev
        self.msix_cap = 0
        self.table = 0
        self.pba = 0
        self.tsize = 0

    async def cfg_r(self, off: int, size: int) -> int:
        return await self.g.pci_cfg_read(0, self.dev, 0, off, size)

    async def cfg_w(self, off: int, size: int, value: int) -> None:
        await self.g.pci_cfg_write(0, self.dev, 0, off, size, value)

    async def caps(self) -> dict[int, int]:
        """pci_find_capability for every ID: {id: offset}."""
        found: dict[int, int] = {}
        if not await self.cfg_r(0x06, 2) & 0x10:
            return found
        pos = await self.cfg_r(0x34, 1) & 0xFC
        ttl = 48
        while pos >= 0x40 and ttl:
            ent = await self.cfg_r(pos, 2)
            found.setdefault(ent & 0xFF, pos)
            pos = (ent >> 8) & 0xFC
            ttl -= 1
        return found

    async def bar_addr(self, bir: int) -> int:
        return await self.cfg_r(0x10 + 4 * bir, 4) & ~0xF

    async def probe(self) -> None:
        """pci_msix_init at enumeration, then pci_enable_device + pci_set_master."""
        caps = await self.caps()
        self.msix_cap = caps.get(CAP_MSIX, 0)
        if self.msix_cap:
            ctrl = await self.cfg_r(self.msix_cap + 2, 2)
            if ctrl & FLAGS_ENABLE:
                await self.cfg_w(self.msix_cap + 2, 2, ctrl & ~FLAGS_ENABLE)
        cmd = await self.cfg_r(0x04, 2)
        await self.cfg_w(0x04, 2, cmd | CMD_MEMORY | CMD_MASTER)

    async def msix_ctrl(self, clear: int, set_: int) -> None:
        """pci_msix_clear_and_set_ctrl: a read-modify-write of the 16-bit flags."""
        ctrl = await self.cfg_r(self.msix_cap + 2, 2)
        new = (ctrl & ~clear) | set_
        if new != ctrl:
            await self.cfg_w(self.msix_cap + 2, 2, new)

    async def entry_w(self, k: int, field: int, value: int) -> None:
        await self.g.mmio_write(self.table + 16 * k + field, 4, value)

    async def entry_r(self, k: int, field: int) -> int:
        return await self.g.mmio_read(self.table + 16 * k + field, 4)

    async def alloc_irq_vectors(self, min_vecs: int, max_vecs: int,
                                msgs: list[tuple[int, int]] | None = None) -> int:
        """pci_alloc_irq_vectors(dev, min, max, PCI_IRQ_MSI | PCI_IRQ_MSIX), then
        request_irq on each vector."""
        assert self.msix_cap, "the guest found no MSI-X capability"
        hwsize = (await self.cfg_r(self.msix_cap + 2, 2) & 0x7FF) + 1
        nvec = min(max_vecs, hwsize)
        assert nvec >= min_vecs
        await self.msix_ctrl(0, FLAGS_MASKALL | FLAGS_ENABLE)
        ctrl = await self.cfg_r(self.msix_cap + 2, 2)
        self.tsize = (ctrl & 0x7FF) + 1
        table = await self.cfg_r(self.msix_cap + 4, 4)
        self.table = await self.bar_addr(table & 7) + (table & ~7)
        pba = await self.cfg_r(self.msix_cap + 8, 4)
        self.pba = await self.bar_addr(pba & 7) + (pba & ~7)
        ctrls = [await self.entry_r(k, 12) for k in range(nvec)]  # msix_prepare_msi_desc
        msgs = msgs or [guest_msg(k) for k in range(nvec)]
        for k in range(nvec):  # __pci_write_msi_msg
            unmasked = not ctrls[k] & MASKBIT
            if unmasked:
                await self.entry_w(k, 12, ctrls[k] | MASKBIT)
            address, data = msgs[k]
            await self.entry_w(k, 0, address & 0xFFFF_FFFF)
            await self.entry_w(k, 4, address >> 32)
            await self.entry_w(k, 8, data)
            if unmasked:
                await self.entry_w(k, 12, ctrls[k])
            await self.entry_r(k, 8)
        cmd = await self.cfg_r(0x04, 2)  # pci_intx_for_msi(dev, 0)
        await self.cfg_w(0x04, 2, cmd | CMD_INTX_DISABLE)
        for k in range(self.tsize):  # msix_mask_all
            await self.entry_w(k, 12, MASKBIT)
        await self.msix_ctrl(FLAGS_MASKALL, 0)
        for k in range(nvec):  # request_irq → pci_msix_unmask
            await self.unmask(k)
        return nvec

    async def mask(self, k: int) -> None:
        await self.entry_w(k, 12, MASKBIT)
        await self.entry_r(k, 12)

    async def unmask(self, k: int) -> None:
        await self.entry_w(k, 12, 0)
        await self.entry_r(k, 12)

    async def free_irq_vectors(self, nvec: int) -> None:
        """pci_free_irq_vectors → pci_msix_shutdown."""
        for k in range(nvec):
            await self.mask(k)
        await self.msix_ctrl(FLAGS_ENABLE, 0)
        cmd = await self.cfg_r(0x04, 2)
        await self.cfg_w(0x04, 2, cmd & ~CMD_INTX_DISABLE)

    async def pba_bits(self) -> int:
        return await self.g.mmio_read(self.pba, 8)


def args(extra: str = "vmsix_on_msi", spec: str = "sim:4") -> list[str]:
    return ["-m", "128M", "-s", "0:0,hostbridge", "-s", f"{SLOT},passthru,{spec},{extra}",
            "vm1"]


async def no_more_msis(sim: SimHypervisor, seen: int) -> bool:
    await trio.sleep(0)
    return len(sim.msis) == seen


# --- the guest's view ----------------------------------------------------------------------
async def test_guest_finds_msix_in_place_of_msi():
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim) as vm:
        guest = LinuxGuest(sim)
        caps = await guest.caps()
        host = vm.passthrough(SLOT).host
        assert CAP_MSI not in caps
        assert caps[CAP_MSIX] == host.msi.offset == 0x50  # same offset as the MSI cap
        assert (await guest.cfg_r(0x51, 1)) == 0x68  # MSI's next pointer kept
        assert caps[0x09] == 0x68  # and the chain goes on past it
        ctrl = await guest.cfg_r(0x52, 2)
        assert ctrl == 4 - 1  # table size N-1, disabled, not masked
        assert await guest.cfg_r(0x54, 4) == 0x0000_0001  # table: BIR 1, offset 0
        assert await guest.cfg_r(0x58, 4) == 0x0000_0801  # PBA: BIR 1, offset 0x800
        for off in range(0x5C, 0x68, 4):  # the rest of the old MSI structure is hidden
            assert await guest.cfg_r(off, 4) == 0
        # BAR 1 is a 4 KiB MEM32 BAR (BAR 0 is the device's own)
        await guest.cfg_w(0x14, 4, 0xFFFF_FFFF)
        assert await guest.cfg_r(0x14, 4) == 0xFFFF_F000
        bar1 = vm.passthrough(SLOT).bar(1)
        await guest.cfg_w(0x14, 4, bar1.addr)
        assert await guest.cfg_r(0x14, 4) == bar1.addr


async def test_entries_start_masked_and_readonly_fields_hold():
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim):
        guest = LinuxGuest(sim)
        await guest.probe()
        table = await guest.bar_addr(1)
        for k in range(4):
            assert await sim.guest(0).mmio_read(table + 16 * k + 12, 4) == MASKBIT
        await guest.cfg_w(0x50, 4, 0xFFFF_FFFF)  # ID, next, and all of msgctrl
        assert await guest.cfg_r(0x50, 4) == 0xC003_6811
        await guest.cfg_w(0x52, 2, 0)
        for off, val in ((0x54, 1), (0x58, 0x801)):  # table/PBA offsets are read-only
            await guest.cfg_w(off, 4, 0x1234_5678)
            assert await guest.cfg_r(off, 4) == val
        for off in range(0x5C, 0x68, 4):
            await guest.cfg_w(off, 4, 0xFFFF_FFFF)
            assert await guest.cfg_r(off, 4) == 0
        # table fields: address bits 1:0 and vector-control bits 31:1 do not exist
        await sim.guest(0).mmio_write(table, 4, 0xFEE0_1003)
        assert await sim.guest(0).mmio_read(table, 4) == 0xFEE0_1000
        await sim.guest(0).mmio_write(table + 12, 4, 0xFFFF_FFFE)
        assert await sim.guest(0).mmio_read(table + 12, 4) == 0
        # 2-byte and unaligned writes are dropped; PBA writes are dropped
        await sim.guest(0).mmio_write(table + 8, 2, 0x55)
        await sim.guest(0).mmio_write(table + 6, 4, 0x55)
        assert await sim.guest(0).mmio_read(table + 8, 4) == 0
        await sim.guest(0).mmio_write(table + 0x800, 8, 0xF)
        assert await sim.guest(0).mmio_read(table + 0x800, 8) == 0


# --- Linux's sequence ----------------------------------------------------------------------
async def test_linux_alloc_irq_vectors_routes_message_k_to_entry_k():
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim) as vm:
        guest = LinuxGuest(sim)
        await guest.probe()
        assert await guest.alloc_irq_vectors(1, 8) == 4
        host: SimHostDevice = vm.passthrough(SLOT).host
        msi = host.msi
        # physical side: every message enabled, INTx off, one remappable address
        assert msi.enabled and msi.control >> 4 & 7 == msi.mmc == 2
        assert host.config_read(0x04, 2) & CMD_INTX_DISABLE
        assert msi.mask == 0
        address, data = msi.message()
        base = decode_remappable(address, 0)
        assert address & 0x18 == 0x18 and data == 0  # remappable, SHV=1, subhandle in data
        assert base is not None and base % 4 == 0  # a block aligned to its size
        for k in (2, 0, 3, 1):
            host.fire(k)
            with trio.fail_after(5):
                assert await sim.next_msi() == guest_msg(k)
            assert host.sent[-1] == (address, k)  # the device's own message k
        assert await no_more_msis(sim, 4)


async def test_masked_vector_shows_in_pba_and_is_sent_on_unmask():
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim) as vm:
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        host = vm.passthrough(SLOT).host
        await guest.mask(2)
        assert host.msi.mask == 0b0100
        host.fire(2)
        host.fire(2)  # still one pending message
        assert await no_more_msis(sim, 0)
        assert await guest.pba_bits() == 0b0100
        host.fire(1)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(1)
        await guest.unmask(2)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(2)
        assert await guest.pba_bits() == 0
        assert await no_more_msis(sim, 2)


async def test_function_mask_holds_everything_and_restores_each_entry():
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim) as vm:
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        host = vm.passthrough(SLOT).host
        await guest.mask(3)
        await guest.msix_ctrl(0, FLAGS_MASKALL)
        assert host.msi.mask == 0b1111
        host.fire(0)
        host.fire(3)
        assert await no_more_msis(sim, 0)
        assert await guest.pba_bits() == 0b1001
        await guest.msix_ctrl(FLAGS_MASKALL, 0)
        assert host.msi.mask == 0b1000  # entry 3 stays masked: the guest masked it
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(0)
        assert await no_more_msis(sim, 1)
        assert await guest.pba_bits() == 0b1000
        await guest.unmask(3)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(3)


async def test_disable_then_enable_again_with_new_messages():
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim) as vm:
        guest = LinuxGuest(sim)
        host = vm.passthrough(SLOT).host
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        await guest.free_irq_vectors(4)
        assert not host.msi.enabled
        assert not host.config_read(0x04, 2) & CMD_INTX_DISABLE  # INTx back for the guest
        host.fire(0)
        assert await no_more_msis(sim, 0)
        assert host.intx_asserts == 1
        new = [(0xFEE0_F000, 0x60 + k) for k in range(4)]
        await guest.alloc_irq_vectors(1, 4, new)
        host.fire(1)
        with trio.fail_after(5):
            assert await sim.next_msi() == new[1]


async def test_entry_reprogrammed_while_unmasked_follows_the_guest():
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim) as vm:
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        host = vm.passthrough(SLOT).host
        # irq affinity change: Linux masks, rewrites, unmasks; a careless guest does not
        await guest.entry_w(1, 0, 0xFEE0_3000)
        await guest.entry_w(1, 8, 0x77)
        host.fire(1)
        with trio.fail_after(5):
            assert await sim.next_msi() == (0xFEE0_3000, 0x77)


async def test_teardown_leaves_the_device_as_found_and_a_second_vm_starts(monkeypatch):
    host = SimHostDevice(4, bdf=0xFE28)
    # the host had programmed the device: addresses, data, some masks; MSI off
    host.msi.program(0xFEE0_0000 | 0x123 << 4, 0x4321)
    host.msi.set_mask(0b1010)
    host.config_write(0x04, 2, CMD_INTX_DISABLE)
    before = host.snapshot()
    monkeypatch.setattr(ptdev, "open_host", lambda opts, slot, ctx: host)
    for _ in range(2):  # a second VM gets the device after the first one's teardown
        sim = SimHypervisor()
        host.close = lambda: None  # the same physical device for both VMs
        async with running(args("no_reset,vmsix_on_msi"), hypervisor=sim) as vm:
            assert vm.passthrough(SLOT).host is host
            guest = LinuxGuest(sim)
            await guest.probe()
            await guest.alloc_irq_vectors(1, 4)
            host.fire(3)
            with trio.fail_after(5):
                assert await sim.next_msi() == guest_msg(3)
            assert len(sim.remap_table) == 4
        assert sim.remap_table == {}
        assert host.snapshot() == before
        assert host.resets == 0


async def test_default_teardown_resets_the_device():
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim) as vm:
        host = vm.passthrough(SLOT).host
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        resets = host.resets
    assert host.resets == resets + 1
    assert host.snapshot() == SimHostDevice(4, bdf=host.phys_bdf).snapshot()


async def test_guest_doorbell_in_the_device_bar_raises_an_msix_vector():
    """End to end through the guest only: BAR0 of the device is passed through, and its
    doorbell register makes the device raise message k."""
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim):
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        bar0 = await guest.bar_addr(0)
        await sim.guest(0).mmio_write(bar0 + 0x10, 4, 0xABCD)
        assert await sim.guest(0).mmio_read(bar0 + 0x10, 4) == 0xABCD
        await sim.guest(0).mmio_write(bar0, 4, 9)  # no source 9: ignored
        await sim.guest(0).mmio_write(bar0, 4, 2)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(2)
        assert len(sim.msis) == 1


async def test_vm_reset_returns_to_masked_and_disabled():
    sim = SimHypervisor()
    async with running(args(), hypervisor=sim) as vm:
        guest = LinuxGuest(sim)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        dev = vm.passthrough(SLOT)
        dev.reset()
        assert not dev.host.msi.enabled
        assert await guest.cfg_r(0x52, 2) == 3
        dev.host.fire(0)
        assert await no_more_msis(sim, 0)
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        dev.host.fire(0)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(0)


# --- who may use it ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("sim:4:nomsi", "vmsix_on_msi", "needs an MSI capability"),
        ("sim:4:msix", "vmsix_on_msi", "has MSI-X, pass it through without vmsix_on_msi"),
        ("sim:4:nomask", "vmsix_on_msi", "needs MSI per-vector masking"),
        ("sim:1", "vmsix_on_msi", "more than one MSI message"),
        ("sim:4:allbars", "vmsix_on_msi", "all six are implemented"),
        ("sim:4", "vmsix_on_msi,0", "BAR 0 is implemented by the device"),
        ("sim:4", "bogus", "unknown option 'bogus'"),
        ("sim:4", "romfile=", "romfile=<path>: give a path"),
        ("sim:4", "irq=x1", "irq='x1' is not an IRQ number"),
        ("sim:4", "vmsix_on_msi,7", "vmsix_on_msi BAR 7 is not 0..5"),
        ("sim:3", "vmsix_on_msi", "power of two"),
        ("sim:4:wat", "vmsix_on_msi", "unknown feature 'wat'"),
        ("1/2", "vmsix_on_msi", "not <bus>/<dev>/<func> in hex"),
        ("0/20/0", "vmsix_on_msi", "dev 0..1f"),
    ],
)
async def test_ineligible_devices_are_refused_with_the_reason(spec, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        async with running(args(extra, spec), hypervisor=SimHypervisor()):
            pass


async def test_vmsix_bar_may_be_chosen():
    sim = SimHypervisor()
    async with running(args("vmsix_on_msi,3"), hypervisor=sim) as vm:
        guest = LinuxGuest(sim)
        assert await guest.cfg_r(0x54, 4) == 3
        assert await guest.cfg_r(0x58, 4) == 0x803
        assert vm.passthrough(SLOT).bar(3).size == 0x1000
        await guest.probe()
        await guest.alloc_irq_vectors(1, 4)
        vm.passthrough(SLOT).host.fire(1)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(1)


async def test_32bit_msi_device_works_too():
    sim = SimHypervisor()
    async with running(args(spec="sim:8:32bit"), hypervisor=sim) as vm:
        guest = LinuxGuest(sim)
        await guest.probe()
        assert await guest.alloc_irq_vectors(1, 8) == 8
        host = vm.passthrough(SLOT).host
        host.fire(7)
        with trio.fail_after(5):
            assert await sim.next_msi() == guest_msg(7)
        await guest.mask(5)
        host.fire(5)
        assert await guest.pba_bits() == 1 << 5


async def test_two_vmsix_devices_get_separate_remap_blocks():
    sim = SimHypervisor()
    argv = ["-m", "128M", "-s", "0:0,hostbridge", "-s", f"{SLOT},passthru,sim:4,vmsix_on_msi",
            "-s", "6,passthru,sim:8,vmsix_on_msi", "vm1"]
    async with running(argv, hypervisor=sim) as vm:
        a, b = LinuxGuest(sim, SLOT), LinuxGuest(sim, 6)
        await a.probe()
        await b.probe()
        assert await a.alloc_irq_vectors(1, 32) == 4
        msgs_b = [(0xFEE0_0000, 0x80 + k) for k in range(8)]
        assert await b.alloc_irq_vectors(1, 32, msgs_b) == 8
        ha, hb = vm.passthrough(SLOT).host, vm.passthrough(6).host
        base_a = decode_remappable(*ha.msi.message())
        base_b = decode_remappable(*hb.msi.message())
        assert {base_a, base_a + 3}.isdisjoint(range(base_b, base_b + 8))
        hb.fire(7)
        ha.fire(3)
        with trio.fail_after(5):
            assert [await sim.next_msi(), await sim.next_msi()] == [msgs_b[7], guest_msg(3)]
