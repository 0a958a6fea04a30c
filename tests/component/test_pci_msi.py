"""MSI, MSI-X and INTx of emulated functions, driven the way Linux drives them, through the
sim guest; the dummy device's I/O register at offset 4 raises its interrupts."""

from __future__ import annotations

import trio

from devicemodel.pci import caps
from tests.support.pci_guest import sim_vm

DUMMY = (0, 3, 0)
IO = 0x2000
MSIX_BAR = 0x8000_2000  # BAR3 of "3,dummy,msix=N": after BAR1/BAR2


async def _trigger(sim, vector: int) -> None:
    await sim.guest(0).pio_write(IO + 4, 4, vector)


async def _no_msi(sim) -> None:
    """Nothing was injected (the device runs synchronously inside the request)."""
    before = len(sim.msis)
    await trio.testing.wait_all_tasks_blocked()
    assert len(sim.msis) == before


async def test_msi_multi_message_mask_and_pending() -> None:
    async with sim_vm("3,dummy") as (_, sim, guest):
        fn = next(f for f in await guest.scan() if f.dev == 3)
        off = fn.cap(caps.CAP_ID_MSI)
        ctrl = await guest.read(DUMMY, off + 2, 2)
        assert ctrl == 0x0184  # 64-bit, per-vector mask, 4 messages capable
        await _trigger(sim, 0)
        await _no_msi(sim)  # MSI off: dropped
        # Linux msi_capability_init: address, data, mask, then MME + enable
        await guest.write(DUMMY, off + 4, 4, 0xFEE0_1000)
        await guest.write(DUMMY, off + 8, 4, 0)
        await guest.write(DUMMY, off + 12, 2, 0x4060)
        await guest.write(DUMMY, off + 16, 4, 0xF)
        await guest.write(DUMMY, off + 2, 2, ctrl | 0x21)  # MME = 2 (4 vectors), enable
        assert await guest.read(DUMMY, off + 2, 2) == 0x01A5
        await _trigger(sim, 2)
        await _no_msi(sim)
        assert await guest.read(DUMMY, off + 20, 4) == 0b0100  # pending while masked
        await guest.write(DUMMY, off + 16, 4, 0x0)  # unmask: the held message arrives
        assert await sim.next_msi() == (0xFEE0_1000, 0x4062)
        assert await guest.read(DUMMY, off + 20, 4) == 0
        await _trigger(sim, 5)  # 5 % 4 = vector 1
        assert await sim.next_msi() == (0xFEE0_1000, 0x4061)
        # data changed while enabled is used at once (Linux affinity change)
        await guest.write(DUMMY, off + 12, 2, 0x4070)
        # acrn-dm's magic: 0xABCDEF % 4 = 3 as any value, then every allocated vector
        await sim.guest(0).pio_write(IO + 4, 4, 0xABCDEF)
        assert [await sim.next_msi() for _ in range(5)] == [
            (0xFEE0_1000, 0x4070 + i) for i in (3, 0, 1, 2, 3)]
        # read-only bits: capable count, 64-bit, PVM, address bits 1:0, pending
        await guest.write(DUMMY, off + 2, 2, 0)
        assert await guest.read(DUMMY, off + 2, 2) == 0x0184
        await guest.write(DUMMY, off + 4, 4, 0xFFFF_FFFF)
        assert await guest.read(DUMMY, off + 4, 4) == 0xFFFF_FFFC
        await guest.write(DUMMY, off + 16, 4, 0xFFFF_FFFF)
        assert await guest.read(DUMMY, off + 16, 4) == 0xF
        await guest.write(DUMMY, off, 4, 0xFFFF_FFFF)  # ID and next pointer stay
        assert await guest.read(DUMMY, off, 2) == 0x0005


async def _msix_setup(guest, sim, entries: int) -> tuple[int, int]:
    """Linux msix_capability_init: enable + function mask, program entries, unmask function."""
    fn = next(f for f in await guest.scan() if f.dev == 3)
    off = fn.cap(caps.CAP_ID_MSIX)
    bar = next(b for b in fn.bars if b.idx == 3)
    g = sim.guest(0)
    ctrl = await guest.read(DUMMY, off + 2, 2)
    assert ctrl == entries - 1
    await guest.write(DUMMY, off + 2, 2, ctrl | caps.MSIX_CTRL_ENABLE | caps.MSIX_CTRL_FMASK)
    for i in range(entries):  # entries start masked
        assert await g.mmio_read(bar.addr + 16 * i + 12, 4) == 1
        await g.mmio_write(bar.addr + 16 * i, 4, 0xFEE0_0000 | (i << 12))
        await g.mmio_write(bar.addr + 16 * i + 4, 4, 0)
        await g.mmio_write(bar.addr + 16 * i + 8, 4, 0x30 + i)
    await guest.write(DUMMY, off + 2, 2, ctrl | caps.MSIX_CTRL_ENABLE)
    return off, bar.addr


async def test_msix_linux_sequence_and_pba() -> None:
    async with sim_vm("0:0,hostbridge", "3,dummy,msix=8") as (_, sim, guest):
        off, base = await _msix_setup(guest, sim, 8)
        assert base == MSIX_BAR
        g = sim.guest(0)
        pba = base + 0x1000
        for i in range(8):
            await g.mmio_write(base + 16 * i + 12, 4, 0)  # unmask
        await _trigger(sim, 3)
        assert await sim.next_msi() == (0xFEE0_3000, 0x33)
        # a masked vector sets its PBA bit and arrives on unmask
        await g.mmio_write(base + 16 * 5 + 12, 4, 1)
        await _trigger(sim, 5)
        await _no_msi(sim)
        assert await g.mmio_read(pba, 8) == 1 << 5
        await g.mmio_write(base + 16 * 5 + 12, 4, 0)
        assert await sim.next_msi() == (0xFEE0_5000, 0x35)
        assert await g.mmio_read(pba, 4) == 0
        # function mask holds every vector; clearing it delivers them in order
        await guest.write(DUMMY, off + 2, 2, caps.MSIX_CTRL_ENABLE | caps.MSIX_CTRL_FMASK)
        for v in (6, 1):
            await _trigger(sim, v)
        await _no_msi(sim)
        assert await g.mmio_read(pba, 1) == 0b0100_0010
        await guest.write(DUMMY, off + 2, 2, caps.MSIX_CTRL_ENABLE)
        assert [await sim.next_msi() for _ in range(2)] == [(0xFEE0_1000, 0x31),
                                                             (0xFEE0_6000, 0x36)]
        # MSI-X off: dropped, nothing pending
        await guest.write(DUMMY, off + 2, 2, 0)
        await _trigger(sim, 2)
        await _no_msi(sim)
        assert await g.mmio_read(pba, 4) == 0


async def test_msix_table_access_rules() -> None:
    async with sim_vm("3,dummy,msix=4") as (_, sim, guest):
        off, base = await _msix_setup(guest, sim, 4)
        g = sim.guest(0)
        # an 8-byte write reaches the table as two 4-byte halves
        await g.mmio_write(base + 16, 8, 0x0000_0001_FEE0_2000)
        assert await g.mmio_read(base + 16, 8) == 0x0000_0001_FEE0_2000
        # 2-byte and unaligned writes are dropped; reads of 1/2/4/8 work
        await g.mmio_write(base + 24, 2, 0xAAAA)
        await g.mmio_write(base + 26, 4, 0xAAAA_AAAA)
        assert await g.mmio_read(base + 24, 4) == 0x31
        assert await g.mmio_read(base + 24, 1) == 0x31
        assert await g.mmio_read(base + 25, 2) == 0xFFFF  # unaligned read: all-ones
        # read-only fields: vector control bits 31:1 and address bits 1:0
        await g.mmio_write(base + 28, 4, 0xFFFF_FFFE)
        assert await g.mmio_read(base + 28, 4) == 0
        await g.mmio_write(base + 16, 4, 0xFEE0_2003)
        assert await g.mmio_read(base + 16, 4) == 0xFEE0_2000
        # the PBA is read-only; the gap between table and PBA reads all-ones
        await g.mmio_write(base + 0x1000, 8, 0xFF)
        assert await g.mmio_read(base + 0x1000, 8) == 0
        assert await g.mmio_read(base + 0x800, 4) == 0xFFFF_FFFF
        # MSI enabled as well: MSI-X stays quiet (acrn-dm's rule), INTx not needed
        msi = 0x40
        await guest.write(DUMMY, msi + 2, 2, 0x0185)
        await g.mmio_write(base + 12, 4, 0)
        await _trigger(sim, 0)
        msg = await sim.next_msi()
        assert msg[0] == 0 and msg[1] == 0  # the MSI (unprogrammed), not entry 0
        assert await g.mmio_read(base + 0x1000, 4) == 0


async def test_intx_routing_and_holding() -> None:
    async with sim_vm("0:0,hostbridge", "3,dummy,intx", "4,dummy,intx",
                      "4:1,dummy,intx") as (vm, sim, guest):
        g = sim.guest(0)
        assert await guest.read(DUMMY, 0x3D, 1) == 1  # INTA
        assert await guest.read((0, 4, 1), 0x3D, 1) == 2  # least-used pin of slot 4
        pci = vm.pci
        routes = pci.intx.routes()
        assert [(r.slot, r.pin, r.gsi) for r in routes] == [(3, 1, 16), (4, 1, 17), (4, 2, 18)]
        assert await guest.read(DUMMY, 0x3C, 1) == routes[0].irq
        assert routes[0].irq in (3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15)
        assert sim.irqlines[16] == 1 and sim.irqlines[17] == 1  # idle high (active low)

        async def line(v: int) -> None:
            await g.pio_write(IO + 7, 1, v)

        await line(1)
        assert sim.irqlines[16] == 0
        assert await guest.read(DUMMY, 0x06, 2) & 0x08  # Interrupt Status
        await line(0)
        assert sim.irqlines[16] == 1
        assert not await guest.read(DUMMY, 0x06, 2) & 0x08
        # INTxDIS holds an assert as pending; clearing it raises the line
        await guest.write(DUMMY, 0x04, 2, 0x0407)
        await line(1)
        assert sim.irqlines[16] == 1
        assert await guest.read(DUMMY, 0x06, 2) & 0x08
        await guest.write(DUMMY, 0x04, 2, 0x0007)
        assert sim.irqlines[16] == 0
        # enabling MSI drops the line and holds it; disabling MSI raises it again
        await guest.write(DUMMY, 0x42, 2, 0x0185)
        assert sim.irqlines[16] == 1
        await guest.write(DUMMY, 0x42, 2, 0x0184)
        assert sim.irqlines[16] == 0
        await line(0)
        assert sim.irqlines[16] == 1
        assert sim.irqlines[17] == 1


async def test_reset_restores_power_on_state() -> None:
    async with sim_vm("3,dummy,msix=4") as (vm, sim, guest):
        off, base = await _msix_setup(guest, sim, 4)
        g = sim.guest(0)
        await guest.write(DUMMY, 0x04, 2, 0)
        await guest.write(DUMMY, 0x14, 4, 0x9000_0000)
        await guest.write(DUMMY, 0x04, 2, 0x7)
        assert vm.pci is not None
        vm.pci.reset()
        assert await guest.read(DUMMY, 0x14, 4) == 0x8000_0000
        assert await guest.read(DUMMY, off + 2, 2) == 3
        assert await g.mmio_read(base + 12, 4) == 1  # entries masked again
        await g.mmio_write(0x8000_0000, 4, 9)
        assert await g.mmio_read(0x8000_0000, 4) == 9
        assert await g.mmio_read(0x9000_0000, 4) == 0xFFFF_FFFF
