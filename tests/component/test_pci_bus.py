"""The PCI bus through the sim guest: BAR sizing and moves, decoding, odd accesses, ECAM,
multi-function, allocation pools; and a hypothesis run of random guest config writes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.bus import MmioBus, PortBus
from devicemodel.config import ConfigError, SlotConfig, parse_args
from devicemodel.irq.services import NoInterrupts
from devicemodel.pci.bus import PciBus
from devicemodel.pci.device import BarKind, PciDevice
from devicemodel.pci.dummy import Dummy, parse_options
from tests.support.pci_guest import ECAM, sim_vm

DUMMY = (0, 3, 0)
BAR1 = 0x8000_0000


async def test_bars_answer_at_their_addresses() -> None:
    async with sim_vm("0:0,hostbridge", "3,dummy") as (_, sim, guest):
        await guest.scan()
        g = sim.guest(0)
        await g.pio_write(0x2000, 2, 0xBEEF)
        assert await g.pio_read(0x2000, 2) == 0xBEEF
        assert await g.pio_read(0x2000, 4) == 0xBEEF
        await g.mmio_write(BAR1 + 0x10, 4, 0x1234_5678)
        assert await g.mmio_read(BAR1 + 0x10, 4) == 0x1234_5678
        # 8-byte accesses are split in two 4-byte calls, low half first
        await g.mmio_write(BAR1 + 0x20, 8, 0x1122_3344_5566_7788)
        assert await g.mmio_read(BAR1 + 0x20, 8) == 0x1122_3344_5566_7788
        assert await g.mmio_read(BAR1 + 0x24, 4) == 0x1122_3344
        # BAR2 is separate storage
        assert await g.mmio_read(0x8000_1000 + 0x10, 4) == 0
        # the rest of the 32-bit hole answers all-ones (fallback), writes vanish
        assert await g.mmio_read(0x9000_0000, 4) == 0xFFFF_FFFF
        await g.mmio_write(0x9000_0000, 4, 0)
        assert await g.mmio_read(0x40_0000_0000, 8) == 0xFFFF_FFFF_FFFF_FFFF


async def test_moved_bar_answers_at_new_address_only() -> None:
    async with sim_vm("3,dummy") as (_, sim, guest):
        g = sim.guest(0)
        await g.mmio_write(BAR1, 4, 0xCAFE)
        await guest.write(DUMMY, 0x04, 2, 0x0004)  # decoding off
        assert await g.mmio_read(BAR1, 4) == 0xFFFF_FFFF
        await guest.write(DUMMY, 0x14, 4, 0x9000_0000)
        await guest.write(DUMMY, 0x10, 4, 0x5000)
        await guest.write(DUMMY, 0x04, 2, 0x0007)
        assert await guest.read(DUMMY, 0x14, 4) == 0x9000_0000
        assert await guest.read(DUMMY, 0x10, 4) == 0x5001
        assert await g.mmio_read(0x9000_0000, 4) == 0xCAFE
        assert await g.mmio_read(BAR1, 4) == 0xFFFF_FFFF
        await g.pio_write(0x5000, 1, 0x5A)
        assert await g.pio_read(0x5000, 1) == 0x5A
        assert await g.pio_read(0x2000, 1) == 0xFF
        # move with decoding on: re-registered at once
        await guest.write(DUMMY, 0x14, 4, 0xA000_0000)
        assert await g.mmio_read(0xA000_0000, 4) == 0xCAFE
        assert await g.mmio_read(0x9000_0000, 4) == 0xFFFF_FFFF


async def test_sizing_with_decoding_on_keeps_registration() -> None:
    """acrn-dm's exception: the all-ones write and the write after it do not move it."""
    async with sim_vm("3,dummy") as (vm, sim, guest):
        g = sim.guest(0)
        await g.mmio_write(BAR1, 4, 0xCAFE)
        await guest.write(DUMMY, 0x14, 4, 0xFFFF_FFFF)
        assert await guest.read(DUMMY, 0x14, 4) == 0xFFFF_F000
        assert await g.mmio_read(BAR1, 4) == 0xCAFE  # still decoded at the old base
        assert await g.mmio_read(0xFFFF_F000, 4) == 0xFFFF_FFFF
        await guest.write(DUMMY, 0x14, 4, BAR1)
        assert await g.mmio_read(BAR1, 4) == 0xCAFE
        assert [r.base for r in vm.mmio.ranges() if "dummy" in r.name] == [BAR1, 0x8000_1000]
        # IO BAR sizing reads back the 16-bit mask with the I/O bit, as acrn-dm
        await guest.write(DUMMY, 0x10, 4, 0xFFFF_FFFF)
        assert await guest.read(DUMMY, 0x10, 4) == 0xFFF9
        await guest.write(DUMMY, 0x10, 4, 0x2000)
        await g.pio_write(0x2000, 1, 7)
        assert await g.pio_read(0x2000, 1) == 7
        # unlike acrn-dm, a new base written right after sizing moves the registration
        await guest.write(DUMMY, 0x14, 4, 0xFFFF_FFFF)
        await guest.write(DUMMY, 0x14, 4, 0x9000_0000)
        assert await g.mmio_read(0x9000_0000, 4) == 0xCAFE
        assert await g.mmio_read(BAR1, 4) == 0xFFFF_FFFF


async def test_command_register_rules() -> None:
    async with sim_vm("3,dummy") as (_, sim, guest):
        g = sim.guest(0)
        assert await guest.read(DUMMY, 0x04, 2) == 0x0007  # acrn-dm default
        await guest.write(DUMMY, 0x04, 4, 0xFFFF_FFFF)
        assert await guest.read(DUMMY, 0x04, 2) == 0x077F  # bits 0-6 and 8-10
        assert await guest.read(DUMMY, 0x06, 2) == 0x0010  # status: only Cap List
        await guest.write(DUMMY, 0x04, 1, 0x02)  # I/O off, memory on
        assert await g.pio_read(0x2000, 4) == 0xFFFF_FFFF
        await g.mmio_write(BAR1, 4, 1)
        assert await g.mmio_read(BAR1, 4) == 1
        await guest.write(DUMMY, 0x04, 1, 0x01)
        assert await g.mmio_read(BAR1, 4) == 0xFFFF_FFFF
        assert await g.pio_read(0x2000, 4) == 0


async def test_odd_accesses() -> None:
    async with sim_vm("0:0,hostbridge", "3,dummy") as (vm, sim, guest):
        g = sim.guest(0)
        pci = vm.pci
        assert pci is not None
        # unaligned and size-3 accesses read all-ones, writes are dropped
        assert await guest.read(DUMMY, 0x01, 2) == 0xFFFF
        assert await guest.read(DUMMY, 0x02, 4) == 0xFFFF_FFFF
        assert pci.cfg_read(0, 3, 0, 0x3C, 3) == 0xFFFF_FFFF
        await guest.write(DUMMY, 0x3D, 2, 0x1111)
        pci.cfg_write(0, 3, 0, 0x3C, 3, 0)
        assert await guest.read(DUMMY, 0x3C, 2) == 0x00FF
        assert await g.pio_read(0xCFC, 3) & 0xFF_FFFF == 0xFF_FFFF
        # extended space of an emulated function: 0x100..0x103 read 0, the rest all-ones
        assert await guest.read(DUMMY, 0x100, 4) == 0
        assert await guest.read(DUMMY, 0x102, 2) == 0
        assert await guest.read(DUMMY, 0x104, 4) == 0xFFFF_FFFF
        assert await guest.read(DUMMY, 0xFFC, 4) == 0xFFFF_FFFF
        await guest.write(DUMMY, 0x100, 4, 0x1234_5678)
        assert await guest.read(DUMMY, 0x100, 4) == 0
        # beyond 4 KiB (not encodable by CF8 or ECAM; the bus itself refuses it)
        assert pci.cfg_read(0, 3, 0, 0x1000, 4) == 0xFFFF_FFFF
        # absent device, function, bus
        for bdf in ((0, 5, 0), (0, 3, 1), (1, 0, 0), (255, 31, 7)):
            assert await guest.read(bdf, 0, 4) == 0xFFFF_FFFF
            await guest.write(bdf, 0x04, 2, 0x7)
        # CF8 enable bit clear: the HSM answers all-ones itself
        await g.pio_write(0xCF8, 4, 0x0000_1800)
        assert await g.pio_read(0xCFC, 4) == 0xFFFF_FFFF
        # read-only IDs
        await guest.write(DUMMY, 0x00, 4, 0)
        assert await guest.read(DUMMY, 0x00, 4) == 0x0001_10DD


async def test_ecam_equals_cf8() -> None:
    async with sim_vm("0:0,hostbridge", "3,dummy,msix=4") as (_, sim, guest):
        cf8 = guest
        ecam = type(guest)(sim.guest(0), ecam=True)
        for bdf in ((0, 0, 0), DUMMY, (0, 4, 0), (2, 3, 0)):
            for reg in list(range(0, 0x110, 4)) + [0x200, 0xFFC]:
                assert await ecam.read(bdf, reg, 4) == await cf8.read(bdf, reg, 4), (bdf, reg)
            assert await ecam.read(bdf, 0x0E, 1) == await cf8.read(bdf, 0x0E, 1)
            assert await ecam.read(bdf, 0x02, 2) == await cf8.read(bdf, 0x02, 2)
        await ecam.write(DUMMY, 0x3C, 1, 0x0B)
        assert await cf8.read(DUMMY, 0x3C, 1) == 0x0B
        g = sim.guest(0)
        # ECAM rules: odd sizes and unaligned offsets read all-ones
        assert await g.mmio_read(ECAM | 3 << 15, 8) == 0xFFFF_FFFF_FFFF_FFFF
        assert await g.mmio_read(ECAM | 3 << 15 | 1, 2) == 0xFFFF
        # the enumeration comes out the same either way
        assert await ecam.scan() == await cf8.scan()


async def test_multifunction_bit() -> None:
    async with sim_vm("0:0,hostbridge", "4,dummy", "4:2,dummy", "5,dummy") as (_, _, guest):
        funcs = await guest.scan()
        assert [(f.dev, f.func, f.header) for f in funcs] == [
            (0, 0, 0), (4, 0, 0x80), (4, 2, 0x80), (5, 0, 0)]
        assert await guest.read((0, 4, 2), 0x0C, 4) >> 16 == 0x80


async def test_allocation_follows_acrn_dm() -> None:
    """Slot order (not command-line order), 4 KiB per BAR, per-bus slop, 64-bit rule."""
    async with sim_vm("5,dummy", "3,dummy", "1:2:0,dummy") as (vm, _, guest):
        funcs = await guest.scan()
        assert [(f.dev, [hex(b.addr) for b in f.bars]) for f in funcs] == [
            (3, ["0x2000", "0x80000000", "0x80001000"]),
            (5, ["0x3000", "0x80002000", "0x80003000"]),
        ]
        bus1 = await guest.scan(1)
        # bus 0 ends at 0x4000 → +32, rounded to 32; memory +1 MiB, rounded to 1 MiB
        assert [hex(b.addr) for b in bus1[0].bars] == ["0x5000", "0x80200000", "0x80201000"]
        assert vm.pci is not None
        w = vm.pci.windows[0]
        assert w.io == (0x2000, 0x4020) and w.mem32 == (0x8000_0000, 0x8020_0000)


def _bus(ovmf: bool = False) -> tuple[PciBus, SimpleNamespace]:
    """A bus on its own buses, interrupts dropped; ``ctx`` is the devices' context (and
    holds the port and MMIO buses for the test to look at)."""
    drop = NoInterrupts()
    ctx = SimpleNamespace(ports=PortBus(), mmio=MmioBus(), msi=drop, lines=drop)
    return PciBus(ctx.ports, ctx.mmio, drop, ovmf=ovmf), ctx


class Wide(PciDevice):
    name = "wide"

    def __init__(self, ctx: object, big: int, small: int) -> None:
        super().__init__(ctx)  # type: ignore[arg-type]
        self.add_bar(0, BarKind.MEM64, small, read=lambda o, s: 0x1234_5678_9ABC_DEF0,
                     wide=True)
        self.add_bar(2, BarKind.MEM64, big)


@pytest.mark.parametrize("ovmf", [False, True])
def test_mem64_placement(ovmf: bool) -> None:
    pci, ctx = _bus(ovmf)
    dev = Wide(ctx, 64 << 20, 32 << 20)
    pci.add(SlotConfig(0, 3, 0, "wide"), dev)
    pci.finish()
    small, big = dev.bars
    # the 64 MiB BAR always goes above 256 GiB, prefetchable
    assert pci.cfg_read(0, 3, 0, 0x18, 4) == big.addr & 0xFFFF_FFFF | 0xC
    assert pci.cfg_read(0, 3, 0, 0x1C, 4) == 0x40
    if ovmf:  # declaration order is allocation order
        assert (small.addr, big.addr) == (0x40_0000_0000, 0x40_0400_0000)
        assert pci.cfg_read(0, 3, 0, 0x10, 4) == 0xC
    else:  # ≤ 32 MiB without OVMF: in the 32-bit hole, 64-bit type, not prefetchable
        assert (small.addr, big.addr) == (0x8000_0000, 0x40_0000_0000)
        assert pci.cfg_read(0, 3, 0, 0x10, 4) == 0x8000_0004
    # a wide BAR gets the 8-byte access whole
    assert ctx.mmio.read(small.addr, 8) == 0x1234_5678_9ABC_DEF0
    # 64-bit sizing: both halves
    pci.cfg_write(0, 3, 0, 0x04, 2, 0)
    pci.cfg_write(0, 3, 0, 0x18, 4, 0xFFFF_FFFF)
    pci.cfg_write(0, 3, 0, 0x1C, 4, 0xFFFF_FFFF)
    lo, hi = pci.cfg_read(0, 3, 0, 0x18, 4), pci.cfg_read(0, 3, 0, 0x1C, 4)
    assert ((hi << 32) | (lo & ~0xF)) == (~(64 << 20) + 1) & 0xFFFF_FFFF_FFFF_FFFF


class IntxOnly(PciDevice):
    name = "intx-only"

    def __init__(self, ctx: object) -> None:
        super().__init__(ctx)  # type: ignore[arg-type]
        self.request_intx()


def test_gsi_and_io_exhaustion_are_config_errors() -> None:
    pci, ctx = _bus()
    for i in range(32):
        pci.add(SlotConfig(0, i, 0, "x"), IntxOnly(ctx))
    pci.finish()
    assert sorted(d.intx.gsi for _, d in pci.functions()) == list(range(16, 48))
    # functions of one slot share its four pins (and their GSIs)
    pci, ctx = _bus()
    for i in range(8):
        pci.add(SlotConfig(0, 3, i, "x"), IntxOnly(ctx))
    pci.finish()
    assert [(d.intx.pin, d.intx.gsi) for _, d in pci.functions()] == [
        (1, 16), (2, 17), (3, 18), (4, 19), (1, 16), (2, 17), (3, 18), (4, 19)]
    pci, ctx = _bus()
    for i in range(33):
        pci.add(SlotConfig(i // 32, i % 32, 0, "x"), IntxOnly(ctx))
    with pytest.raises(ConfigError, match="vIOAPIC"):
        pci.finish()
    # every I/O BAR takes 4 KiB of [0x2000, 0x10000): 14 of them fit
    pci, ctx = _bus()
    for i in range(15):
        pci.add(SlotConfig(0, i, 0, "dummy"), Dummy(ctx))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="I/O space exhausted"):
        pci.finish()


def test_slot_conflicts() -> None:
    pci, ctx = _bus()
    pci.add(SlotConfig(0, 3, 0, "dummy"), Dummy(ctx))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        pci.add(SlotConfig(0, 3, 0, "dummy"), Dummy(ctx))  # type: ignore[arg-type]
    assert parse_args(["-s", "3,dummy,bogus", "vm"]).slots[0].options == "bogus"
    with pytest.raises(ConfigError, match="unknown option"):
        parse_options("bogus")
    with pytest.raises(ConfigError):
        parse_options("msix=4096")


# --- hypothesis: random guest config writes never raise and never break the bus ---------
_REGS = st.one_of(
    st.sampled_from([0x04, 0x06, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30, 0x3C, 0x42, 0x44,
                     0x48, 0x4C, 0x50, 0x54, 0x5A, 0x5C, 0x60]),
    st.integers(0, 0x1FF),
    st.integers(0, 0x1FFF),
)
_VALUES = st.one_of(st.just(0xFFFF_FFFF), st.just(0), st.integers(0, 0xFFFF_FFFF),
                    st.sampled_from([0x8000_0000, 0x8000_1000, 0x8000_2000, 0x2000, 0x3000,
                                     0xE000_0000, 0xFEE0_0000, 0x7, 0x3, 0x0400, 0xC000]))
_OPS = st.lists(st.tuples(st.sampled_from([3, 4, 5]), _REGS, st.sampled_from([1, 2, 3, 4, 8]),
                          _VALUES), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_OPS)
def test_random_config_writes_keep_the_bus_sane(ops: list[tuple[int, int, int, int]]) -> None:
    pci, ctx = _bus()
    devs = {3: Dummy(ctx, msix=4, intx=True), 4: Dummy(ctx)}  # type: ignore[arg-type]
    for slot, dev in devs.items():
        pci.add(SlotConfig(0, slot, 0, "dummy"), dev)
    pci.finish()
    home = {slot: [b.addr for b in dev.bars] for slot, dev in devs.items()}
    for slot, reg, size, value in ops:
        pci.cfg_write(0, slot, 0, reg, size, value & 0xFFFF_FFFF)
        pci.cfg_read(0, slot, 0, reg, size)
        assert pci.cfg_read(0, slot, 0, 0, 4) == (0x0001_10DD if slot in devs else 0xFFFF_FFFF)
        for dev in devs.values():
            for bar in dev.bars:
                if bar.mapped_at is not None:
                    bus = ctx.ports if bar.is_io else ctx.mmio
                    assert bus.find(bar.mapped_at).handler is bar
                    assert bar.mapped_at == bar.addr or any(bar.sizing)
        ctx.mmio.read(0x8000_0000, 4)
    # the guest puts everything back: every BAR answers at home again
    for slot, dev in devs.items():
        pci.cfg_write(0, slot, 0, 0x04, 2, 0)
        for bar, addr in zip(dev.bars, home[slot], strict=True):
            pci.cfg_write(0, slot, 0, 0x10 + 4 * bar.idx, 4, addr)
    for slot in devs:
        pci.cfg_write(0, slot, 0, 0x04, 2, 0x7)
    for slot, dev in devs.items():
        for bar, addr in zip(dev.bars, home[slot], strict=True):
            bus = ctx.ports if bar.is_io else ctx.mmio
            assert bus.find(addr) is not None and bus.find(addr).handler is bar, (slot, bar.idx)
        ctx.ports.write(home[slot][0], 4, 0x1234)
        assert ctx.ports.read(home[slot][0], 4) == 0x1234


class Legacy:
    """A function that keeps its own config bytes (the older minimal device shape)."""

    name = "legacy"

    def __init__(self) -> None:
        self.cfg = bytearray(256)
        self.cfg[0:4] = (0x7000_8086).to_bytes(4, "little")

    def cfg_read(self, reg: int, size: int) -> int:
        return int.from_bytes(self.cfg[reg : reg + size], "little") if reg < 256 else 0

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        pass

    def reset(self) -> None:
        pass


def test_functions_with_their_own_config_bytes_share_the_bus() -> None:
    pci, ctx = _bus()
    pci.add(SlotConfig(0, 1, 0, "legacy"), Legacy())  # type: ignore[arg-type]
    pci.add(SlotConfig(0, 1, 1, "dummy"), Dummy(ctx))  # type: ignore[arg-type]
    pci.finish()
    assert pci.cfg_read(0, 1, 0, 0, 4) == 0x7000_8086
    assert pci.cfg_read(0, 1, 0, 0x0C, 4) >> 16 == 0x80  # multi-function fixed up on read
    assert pci.cfg_read(0, 1, 1, 0x0E, 1) == 0x80
    assert pci.cfg_read(0, 1, 1, 0x10, 4) == 0x2001
    pci.reset()
