"""The LPC COM ports through the sim guest: Linux 8250 probing, FIFO, interrupts, backends.

The probe sequences follow drivers/tty/serial/8250/8250_port.c (autoconfig,
autoconfig_16550a, serial8250_do_startup's THRE test): the UART must come out as a
16550A with a 16-byte FIFO.
"""

from __future__ import annotations

import os
import socket

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.hsm import abi
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.platform.uart8250 import Uart8250
from devicemodel.platform.uart_backend import UartBackend
from devicemodel.vm import running

COM1 = 0x3F8
RBR = THR = DLL = COM1
IER = DLM = COM1 + 1
IIR = FCR = COM1 + 2
LCR, MCR, LSR, MSR, SCR = COM1 + 3, COM1 + 4, COM1 + 5, COM1 + 6, COM1 + 7


def _args(backend: str, *extra: str) -> list[str]:
    return ["-s", "0:0,hostbridge", "-s", "1:0,lpc", "-l", f"com1,{backend}", *extra, "vm"]


def _pulses(sim: SimHypervisor, gsi: int) -> int:
    return sum(1 for e in sim.irqline_events if e.gsi == gsi and e.op == abi.GSI_RAISING_PULSE)


async def test_linux_autoconfig_finds_a_16550a(tmp_path):
    sim = SimHypervisor()
    async with running(_args(f"file:{tmp_path}/out"), sim):
        g = sim.guest()

        async def rd(port):
            return await g.pio_read(port, 1)

        async def wr(port, v):
            await g.pio_write(port, 1, v)

        # IER existence test
        scratch = await rd(IER)
        await wr(IER, 0)
        scratch2 = await rd(IER) & 0x0F
        await wr(IER, 0x0F)
        scratch3 = await rd(IER) & 0x0F
        await wr(IER, scratch)
        assert (scratch2, scratch3) == (0, 0x0F)
        # loopback test: MCR = LOOP | OUT2 | RTS → MSR high nibble DCD|CTS
        save_mcr, save_lcr = await rd(MCR), await rd(LCR)
        await wr(MCR, 0x10 | 0x0A)
        assert await rd(MSR) & 0xF0 == 0x90
        await wr(MCR, save_mcr)
        # IIR top bits with the FIFO on: 3 → autoconfig_16550a
        await wr(LCR, 0xBF)
        await wr(FCR, 0)  # the EFR write lands on FCR here
        await wr(LCR, 0)
        await wr(FCR, 0x01)
        assert await rd(IIR) >> 6 == 3
        # no ST16C650V1 (EFR readable with DLAB) and no EFRv2 (EFR at LCR 0xBF)
        await wr(LCR, 0x80)
        assert await rd(IIR) != 0
        await wr(LCR, 0xBF)
        assert await rd(IIR) != 0
        await wr(LCR, 0)
        # no XScale: IER bit 6 does not stick
        ier = await rd(IER)
        await wr(IER, ier | 0x40)
        assert not await rd(IER) & 0x40
        await wr(IER, ier)
        # not a 16750: the 64-byte FIFO bit never shows in IIR, with or without DLAB
        await wr(FCR, 0x01 | 0x20)
        status1 = await rd(IIR) >> 5
        await wr(FCR, 0x01)
        await wr(LCR, 0x80)
        await wr(FCR, 0x01 | 0x20)
        status2 = await rd(IIR) >> 5
        await wr(FCR, 0x01)
        await wr(LCR, 0)
        assert (status1, status2) == (6, 6)
        await wr(LCR, save_lcr)
        # scratch register and divisor latch
        for v in (0x55, 0xAA):
            await wr(SCR, v)
            assert await rd(SCR) == v
        await wr(LCR, 0x80)
        assert (await rd(DLL), await rd(DLM)) == (12, 0)  # 9600 baud at reset
        await wr(DLL, 1)
        await wr(DLM, 0)
        await wr(LCR, 0x03)
        assert await rd(LCR) == 0x03
        assert await rd(IER) == 0  # DLAB off: offset 1 is IER again
        assert await rd(LSR) == 0x60


async def test_fifo_holds_16_bytes_then_overruns(tmp_path):
    sim = SimHypervisor()
    async with running(_args(f"file:{tmp_path}/out"), sim) as vm:
        g = sim.guest()
        await g.pio_write(FCR, 1, 0x07)  # FIFO on, both cleared
        await g.pio_write(MCR, 1, 0x10)  # loopback
        for i in range(16):
            await g.pio_write(THR, 1, 0x40 + i)
        assert await g.pio_read(LSR, 1) & 0x03 == 0x01  # data ready, no overrun
        await g.pio_write(THR, 1, 0x99)
        assert await g.pio_read(LSR, 1) & 0x02  # overrun reported once
        assert not await g.pio_read(LSR, 1) & 0x02
        got = [await g.pio_read(RBR, 1) for _ in range(16)]
        assert got == [0x40 + i for i in range(16)]
        assert not await g.pio_read(LSR, 1) & 0x01
        # FIFO off: one holding register
        await g.pio_write(FCR, 1, 0x00)
        await g.pio_write(THR, 1, 1)
        await g.pio_write(THR, 1, 2)
        assert await g.pio_read(LSR, 1) & 0x03 == 0x03
        assert await g.pio_read(RBR, 1) == 1
        # loopback output never reaches the backend
        lpc = vm.device("1:0")
        assert lpc.ports[0].backend.written == 0


async def test_rx_trigger_level_selects_rda_or_timeout(tmp_path):
    sim = SimHypervisor()
    async with running(_args(f"file:{tmp_path}/out"), sim):
        g = sim.guest()
        await g.pio_write(FCR, 1, 0x81)  # FIFO on, trigger level 8
        await g.pio_write(MCR, 1, 0x10)
        await g.pio_write(IER, 1, 0x01)
        for i in range(4):
            await g.pio_write(THR, 1, i)
        assert await g.pio_read(IIR, 1) == 0xCC  # below the trigger: character timeout
        for i in range(4):
            await g.pio_write(THR, 1, i)
        assert await g.pio_read(IIR, 1) == 0xC4  # at the trigger: data available
        assert _pulses(sim, 4) == 1  # one edge: the line stayed up in between


async def test_thre_interrupt_and_linux_startup_thre_test(tmp_path):
    sim = SimHypervisor()
    async with running(_args(f"file:{tmp_path}/out"), sim):
        g = sim.guest()
        assert await g.pio_read(IIR, 1) == 0x01
        before = _pulses(sim, 4)
        # serial8250_do_startup: THRI on → pending; off and on again → pending again
        await g.pio_write(IER, 1, 0x02)
        iir1 = await g.pio_read(IIR, 1)
        await g.pio_write(IER, 1, 0)
        await g.pio_write(IER, 1, 0x02)
        iir2 = await g.pio_read(IIR, 1)
        assert iir1 & 0x0F == 0x02 and iir2 & 0x0F == 0x02
        assert _pulses(sim, 4) == before + 2
        # the IIR read acknowledged THRE; a byte sent makes a new THRE edge
        assert await g.pio_read(IIR, 1) == 0x01
        await g.pio_write(THR, 1, ord("x"))
        assert await g.pio_read(IIR, 1) == 0x02
        assert _pulses(sim, 4) == before + 3
        assert all(e.op == abi.GSI_RAISING_PULSE for e in sim.irqline_events if e.gsi == 4)


async def test_output_reaches_the_file_backend(tmp_path):
    out = tmp_path / "com1.log"
    sim = SimHypervisor()
    async with running(_args(f"file:{out}", "--debugexit"), sim) as vm:
        g = sim.guest()
        for ch in b"PASS: hello\r\n":
            while not await g.pio_read(LSR, 1) & 0x20:
                pass
            await g.pio_write(THR, 1, ch)
        await g.pio_write(0xF4, 1, 0)  # power off: the buffered output is flushed
        await vm.wait_stopped()
    assert out.read_bytes() == b"PASS: hello\r\n"


async def test_receive_from_a_socket_with_interrupts(tmp_path):
    path = str(tmp_path / "com1.sock")
    sim = SimHypervisor()
    async with running(_args(f"socket:{path}"), sim):
        g = sim.guest()
        await g.pio_write(FCR, 1, 0x01)  # FIFO on, trigger 1
        await g.pio_write(IER, 1, 0x01)  # receive interrupt
        before = _pulses(sim, 4)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(path)
        message = bytes(range(0x20, 0x20 + 40))  # more than the FIFO holds
        await client.send(message)
        got = bytearray()
        with trio.fail_after(5):
            while len(got) < len(message):
                if not await g.pio_read(LSR, 1) & 0x01:
                    await trio.sleep(0.001)
                    continue
                assert await g.pio_read(IIR, 1) & 0x0F in (0x04, 0x0C)
                while await g.pio_read(LSR, 1) & 0x01:
                    got.append(await g.pio_read(RBR, 1))
        assert bytes(got) == message  # paced by the FIFO: nothing lost
        assert _pulses(sim, 4) > before
        # and the guest's output goes to the client
        for ch in b"ok\n":
            await g.pio_write(THR, 1, ch)
        echoed = b""
        with trio.fail_after(5):
            while len(echoed) < 3:
                echoed += await client.recv(16)
        assert echoed == b"ok\n"
        client.close()


async def test_pty_backend_round_trip():
    sim = SimHypervisor()
    async with running(_args("pty"), sim) as vm:
        g = sim.guest()
        backend = vm.device("1:0").ports[0].backend
        fd = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
        try:
            await g.pio_write(THR, 1, ord("Z"))
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(fd)
            assert os.read(fd, 10) == b"Z"
            os.write(fd, b"q")
            with trio.fail_after(5):
                while not await g.pio_read(LSR, 1) & 1:
                    await trio.sleep(0.001)
            assert await g.pio_read(RBR, 1) == ord("q")
        finally:
            os.close(fd)


async def test_com_ports_have_acrn_dm_ports_and_irqs(tmp_path):
    sim = SimHypervisor()
    args = ["-s", "1:0,lpc", "-l", "com1", "-l", "com2", "-l", "com3", "-l", "com4",
            "-l", f"com5,file:{tmp_path}/c5,0x9000,10", "vm"]
    async with running(args, sim) as vm:
        ports = {p.name: (p.base, p.irq) for p in vm.device(1).ports}
        assert ports == {"COM1": (0x3F8, 4), "COM2": (0x2F8, 3), "COM3": (0x3E8, 6),
                         "COM4": (0x2E8, 7), "COM5": (0x9000, 10)}
        g = sim.guest()
        for name, (base, irq) in ports.items():
            await g.pio_write(base + 1, 1, 0x02)
            assert _pulses(sim, irq) == 1, name


def test_output_buffer_is_bounded():
    backend = UartBackend(limit=8)
    for b in range(20):
        backend.send(b)
    assert bytes(backend._out) == bytes(range(8))
    assert backend.dropped == 12


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4]), st.booleans(),
                          st.integers(0, 0xFFFF_FFFF)), max_size=60))
def test_any_register_access_sequence_is_safe(ops):
    pulses = []
    sent = []
    uart = Uart8250("t", lambda: pulses.append(1), sent.append)
    for offset, size, write, value in ops:
        if write:
            uart.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            v = uart.read(offset, size)
            assert 0 <= v < 1 << (8 * size)
        assert len(uart._rx) <= 16
        iir = uart.read(2, 1) & 0x0F
        assert iir in (0x00, 0x01, 0x02, 0x04, 0x06, 0x0C)
    assert all(0 <= b <= 0xFF for b in sent)
