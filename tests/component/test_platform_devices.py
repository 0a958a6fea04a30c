"""RTC/CMOS, ACPI PM and power-off, 0xCF9 reset, debug exit and the LPC function, through
the sim guest."""

from __future__ import annotations

import calendar
import struct
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.hsm import abi
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.irq.services import Line
from devicemodel.memory import MiB
from devicemodel.platform.pm import PowerManagement
from devicemodel.platform.rtc import Rtc
from devicemodel.vm import running
from tests.support.images import make_elf32, multiboot_header


def _bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


async def _cmos(g, index: int) -> int:
    await g.pio_write(0x70, 1, index)
    return await g.pio_read(0x71, 1)


async def _cmos_write(g, index: int, value: int) -> None:
    await g.pio_write(0x70, 1, index)
    await g.pio_write(0x71, 1, value)


async def _read_time(g) -> float:
    """As Linux's mc146818_get_time: wait for UIP clear, then read the BCD fields."""
    while await _cmos(g, 0x0A) & 0x80:
        pass
    sec, mn, hr = await _cmos(g, 0), await _cmos(g, 2), await _cmos(g, 4)
    day, mon, yr, cent = await _cmos(g, 7), await _cmos(g, 8), await _cmos(g, 9), await _cmos(
        g, 0x32)
    year = _bcd(cent) * 100 + _bcd(yr)
    return calendar.timegm((year, _bcd(mon), _bcd(day), _bcd(hr), _bcd(mn), _bcd(sec), 0, 0, 0))


# --- RTC ----------------------------------------------------------------------------------
async def test_rtc_time_follows_the_host_in_bcd():
    sim = SimHypervisor()
    async with running(["vm"], sim):
        g = sim.guest()
        assert abs(await _read_time(g) - time.time()) <= 2
        assert await _cmos(g, 0x0D) == 0x80  # valid RAM and time
        assert await _cmos(g, 0x0B) & 0x06 == 0x02  # BCD, 24 hour
        assert await g.pio_read(0x70, 1) == 0xFF


async def test_rtc_binary_12h_and_guest_set_time():
    sim = SimHypervisor()
    async with running(["vm"], sim):
        g = sim.guest()
        # binary, 12-hour mode: the fields re-encode
        await _cmos_write(g, 0x0B, 0x04)
        hour = await _cmos(g, 4)
        t = time.gmtime()
        h12 = t.tm_hour % 12 or 12
        assert hour & 0x7F == h12 and bool(hour & 0x80) == (t.tm_hour >= 12)
        assert await _cmos(g, 8) == t.tm_mon
        # the guest sets 2001-02-03 04:05:06 with SET held, in BCD 24h
        await _cmos_write(g, 0x0B, 0x82)
        for reg, val in ((0, 0x06), (2, 0x05), (4, 0x04), (7, 0x03), (8, 0x02), (9, 0x01),
                         (0x32, 0x20)):
            await _cmos_write(g, reg, val)
        await _cmos_write(g, 0x0B, 0x02)
        got = await _read_time(g)
        want = calendar.timegm((2001, 2, 3, 4, 5, 6, 0, 0, 0))
        assert 0 <= got - want <= 2
        await trio.sleep(1.1)  # and it keeps running from there
        assert 1 <= await _read_time(g) - want <= 4


@pytest.mark.parametrize("memsize, low, high", [
    ("256M", (256 - 16) * 16, 0),
    ("3G", (2048 - 16) * 16, 1024 * 16),
])
async def test_cmos_memory_size_bytes(memsize, low, high):
    sim = SimHypervisor()
    async with running(["-m", memsize, "vm"], sim):
        g = sim.guest()
        assert await _cmos(g, 0x34) | await _cmos(g, 0x35) << 8 == low
        got_high = (await _cmos(g, 0x5B) | await _cmos(g, 0x5C) << 8
                    | await _cmos(g, 0x5D) << 16)
        assert got_high == high


async def test_rtc_update_and_periodic_interrupts_on_irq8():
    sim = SimHypervisor()
    async with running(["vm"], sim):
        g = sim.guest()
        assert await _cmos(g, 0x0C) == 0
        await _cmos_write(g, 0x0B, 0x02 | 0x10)  # update-ended interrupt on
        with trio.fail_after(3):
            while sim.irqlines.get(8) != 1:
                await trio.sleep(0.01)
        assert await _cmos(g, 0x0C) & 0x90 == 0x90  # IRQF | UF; the read clears them
        assert sim.irqlines[8] == 0
        assert await _cmos(g, 0x0C) & 0x80 == 0
        # periodic at 16 Hz (rate 12) instead
        await _cmos_write(g, 0x0B, 0x02 | 0x40)
        await _cmos_write(g, 0x0A, 0x20 | 12)
        await _cmos(g, 0x0C)
        start = trio.current_time()
        ticks = 0
        with trio.fail_after(3):
            while ticks < 8:
                if sim.irqlines.get(8) == 1:
                    assert await _cmos(g, 0x0C) & 0xC0 == 0xC0
                    ticks += 1
                await trio.sleep(0.005)
        assert 0.3 < trio.current_time() - start < 1.5


async def test_rtc_alarm_interrupt():
    sim = SimHypervisor()
    async with running(["vm"], sim):
        g = sim.guest()
        await _cmos_write(g, 0x0B, 0x06)  # binary, 24 h
        t = time.gmtime(time.time() + 2)
        for reg, val in ((0x01, t.tm_sec), (0x03, 0xC0), (0x05, 0xFF)):  # sec; any min/hour
            await _cmos_write(g, reg, val)
        await _cmos_write(g, 0x0B, 0x06 | 0x20)
        with trio.fail_after(5):
            while sim.irqlines.get(8) != 1:
                await trio.sleep(0.01)
        assert await _cmos(g, 0x0C) & 0xA0 == 0xA0
        assert abs(await _cmos(g, 0x00) - t.tm_sec) <= 1


def test_rtc_nvram_and_read_only_registers():
    rtc = Rtc(256 * MiB, 0, clock=lambda: 0.0, monotonic=lambda: 5.0)
    rtc.write(0, 1, 0x40)
    rtc.write(1, 1, 0xA5)
    rtc.write(0, 1, 0x40)
    assert rtc.read(1, 1) == 0xA5
    rtc.write(0, 1, 0x0D)
    rtc.write(1, 1, 0)
    assert rtc.read(1, 1) == 0x80
    rtc.write(0, 1, 0x80 | 0x09)  # NMI mask bit ignored
    assert rtc.read(1, 1) == 0x70  # 1970
    assert rtc.read(1, 2) == 0xFFFF


# --- PM / SCI / power-off ------------------------------------------------------------------
async def test_s5_sleep_powers_the_vm_off():
    sim = SimHypervisor()
    async with running(["vm"], sim) as vm:
        g = sim.guest()
        assert await g.pio_read(0x404, 2) == 0
        await g.pio_write(0xB2, 1, 0xA0)  # ACPI enable: SCI_EN
        assert await g.pio_read(0x404, 2) & 1
        await g.pio_write(0x404, 2, (5 << 10) | 0x2000 | 1)
        with trio.fail_after(5):
            await vm.wait_stopped()
        assert vm.state == "stopped"
        assert "destroy_vm" in sim.calls


async def test_sci_follows_pm1_status_and_enable():
    sim = SimHypervisor()
    async with running(["vm"], sim) as vm:
        g = sim.guest()
        await g.pio_write(0xB2, 1, 0xA0)
        await g.pio_write(0x402, 2, 0x0100)  # PWRBTN_EN
        assert await g.pio_read(0x402, 2) == 0x0100
        vm.power_button()
        assert await g.pio_read(0x400, 2) & 0x0100
        assert sim.irqlines.get(9) == 1  # level, active high
        await g.pio_write(0x400, 2, 0x0100)  # write 1 to clear
        assert not await g.pio_read(0x400, 2) & 0x0100
        assert sim.irqlines.get(9) == 0
        assert await g.pio_read(0x400, 4) == 0xFFFF_FFFF  # acrn-dm: 2-byte accesses only
        # S3 is not offered: the VM stays up
        await g.pio_write(0x404, 2, (3 << 10) | 0x2000)
        assert vm.state == "running"


async def test_cf9_reset_runs_the_acrn_sequence(tmp_path):
    img = make_elf32(b"\xf4", load=0x200000, multiboot=multiboot_header())
    (tmp_path / "t.elf").write_bytes(img)
    sim = SimHypervisor()
    args = ["-s", "0:0,hostbridge", "-s", "1:0,lpc", "-l", "com1", "-E",
            str(tmp_path / "t.elf"), "vm"]
    async with running(args, sim) as vm:
        g = sim.guest()
        await g.pio_write(0x3F8 + 7, 1, 0x5A)  # device state that reset must clear
        sim.memory.write(0x200000, b"\xcc")  # the guest scribbles over its image
        sim.memory.write(0xF2400, b"XXXX")  # and over the RSDP
        mark = len(sim.calls)
        pio_before = vm.server.stats["pio"]
        with trio.fail_after(5):
            await g.pio_write(0xCF9, 1, 0x06)  # the triggering request completes via CLEAR
            while vm.platform.power.resets == 0:
                await trio.sleep(0.001)
        assert sim.calls[mark:] == ["pause_vm", "clear_vm_ioreq", "reset_vm", "set_vcpu_regs",
                                    "start_vm"]
        assert vm.server.stats["pio"] == pio_before + 1  # the held write was served once
        assert sim.vcpu_regs[0].rip == 0x200000 + 12
        assert sim.memory.read(0x200000 + 12, 1) == b"\xf4"  # reloaded
        assert sim.memory.read(0xF2400, 8) == b"RSD PTR "  # tables rebuilt
        assert await g.pio_read(0x3F8 + 7, 1) == 0  # UART back to power-on state
        assert await g.pio_read(0xCF9, 1) == 0
        assert vm.server.held == [] and not vm.server.hold_completion
        # the guest runs again and can reset again
        await g.pio_write(0xCF9, 1, 0x0E)  # acrn-dm's full reset value (FADT)
        with trio.fail_after(5):
            while vm.platform.power.resets < 2:
                await trio.sleep(0.001)
        assert vm.state == "running"


async def test_cf9_without_reset_bits_is_a_plain_register():
    sim = SimHypervisor()
    async with running(["vm"], sim) as vm:
        g = sim.guest()
        await g.pio_write(0xCF9, 1, 0x02)
        assert await g.pio_read(0xCF9, 1) == 0x02
        assert "pause_vm" not in sim.calls and vm.state == "running"


# --- debug exit -----------------------------------------------------------------------------
@pytest.mark.parametrize("size, code", [(1, 0x31), (2, 0x1234), (4, 0xDEAD0001)])
async def test_debugexit_powers_off_with_the_code(size, code):
    sim = SimHypervisor()
    async with running(["--debugexit", "vm"], sim) as vm:
        g = sim.guest()
        assert await g.pio_read(0xF4, 1) == 0xFF
        assert await g.pio_read(0xF4, 2) == 0xFFFF
        await g.pio_write(0xF4, size, code)
        with trio.fail_after(5):
            await vm.wait_stopped()
        assert vm.platform.exit_code == code


async def test_no_debugexit_without_the_option():
    sim = SimHypervisor()
    async with running(["vm"], sim) as vm:
        g = sim.guest()
        await g.pio_write(0xF4, 1, 1)
        assert vm.state == "running"
        assert vm.server.stats["unhandled_pio"] >= 1


# --- LPC ----------------------------------------------------------------------------------
async def test_lpc_function_ids_and_pirq_registers():
    sim = SimHypervisor()
    async with running(["-s", "0:0,hostbridge", "-s", "31:0,lpc", "-s", "3,dummy,intx",
                        "vm"], sim) as vm:
        g = sim.guest()
        assert await g.pci_cfg_read(0, 31, 0, 0, 4) == 0x7000_8086
        assert await g.pci_cfg_read(0, 31, 0, 0x08, 4) >> 8 == 0x060100  # ISA bridge
        route = vm.pci.intx.routes()[0]
        reg = (0x60, 0x61, 0x62, 0x63, 0x68, 0x69, 0x6A, 0x6B)[route.pirq_pin - 1]
        assert await g.pci_cfg_read(0, 31, 0, reg, 1) == route.irq
        await g.pci_cfg_write(0, 31, 0, reg, 1, 0x0B)
        assert await g.pci_cfg_read(0, 31, 0, reg, 1) == 0x0B
        await g.pci_cfg_write(0, 31, 0, reg, 1, 0x02)  # IRQ 2 is not permitted: ignored
        assert await g.pci_cfg_read(0, 31, 0, reg, 1) == 0x0B
        await g.pci_cfg_write(0, 31, 0, reg, 1, 0x80)
        assert await g.pci_cfg_read(0, 31, 0, reg, 1) == 0x80
        base = 0x60 if reg < 0x68 else 0x68
        word = await g.pci_cfg_read(0, 31, 0, base, 4)
        assert struct.pack("<I", word)[reg - base] == 0x80


async def test_lpc_refusals():
    from devicemodel.config import ConfigError

    with pytest.raises(ConfigError, match="only one LPC"):
        async with running(["-s", "1,lpc", "-s", "2,lpc", "vm"], SimHypervisor()):
            pass
    with pytest.raises(ConfigError, match="bus 0"):
        async with running(["-s", "1:1:0,lpc", "vm"], SimHypervisor()):
            pass
    with pytest.raises(ConfigError, match="backend"):
        async with running(["-s", "1,lpc", "-l", "com1,nonsense", "vm"], SimHypervisor()):
            pass


async def test_com_irqs_are_kept_off_pci_links(tmp_path):
    sim = SimHypervisor()
    args = ["-s", "1,lpc", "-l", "com1", "-l", "com2"]
    for slot in range(3, 9):
        args += ["-s", f"{slot},dummy,intx"]
    async with running([*args, "vm"], sim) as vm:
        irqs = {r.irq for r in vm.pci.intx.routes()}
        assert not irqs & {3, 4}
        assert all(e.op != abi.GSI_RAISING_PULSE for e in sim.irqline_events)


class RecordedLines:
    """Interrupt lines that record (gsi, high) (or (tag, gsi, high)) into ``out``."""

    def __init__(self, out: list, tag: str | None = None) -> None:
        self.out, self.tag = out, tag

    def set_line(self, gsi: int, high: bool) -> None:
        self.out.append((gsi, high) if self.tag is None else (self.tag, gsi, high))

    def pulse_line(self, gsi: int) -> None:
        self.out.append((gsi, "pulse") if self.tag is None else (self.tag, gsi, "pulse"))


_accesses = st.lists(st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4]), st.booleans(),
                               st.integers(0, 0xFFFF_FFFF)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(_accesses)
def test_any_rtc_access_sequence_is_safe(ops):
    lines = []
    rtc = Rtc(256 * MiB, 0, irq=Line(RecordedLines(lines), 8))
    for port, size, write, value in ops:
        value &= (1 << (8 * size)) - 1
        if write:
            rtc.write(port & 1, size, value)
        else:
            assert 0 <= rtc.read(port & 1, size) < 1 << (8 * size)
        rtc.second_passed()
        rtc.periodic_tick()
        irqf = bool(rtc.cmos[0x0C] & 0x80)  # IRQ 8 is up exactly while IRQF is set
        assert (lines[-1][1] if lines else False) == irqf
    assert all(gsi == 8 for gsi, _ in lines)


@settings(max_examples=200, deadline=None)
@given(_accesses)
def test_any_pm_access_sequence_is_safe(ops):
    events = []
    sci = Line(RecordedLines(events, "sci"), 9)
    pm = PowerManagement(sci, lambda: events.append(("off",)), lambda: events.append(("reset",)))
    ports = [pm.status_port, pm.enable_port, pm.control_port, pm.smi_port, pm.reset_port]
    for which, size, write, value in ops:
        port = ports[which % len(ports)]
        value &= (1 << (8 * size)) - 1
        if write:
            port.write(0, size, value)
        else:
            assert 0 <= port.read(0, size) < 1 << (8 * size)
    assert all(e[0] in ("sci", "off", "reset") for e in events)
