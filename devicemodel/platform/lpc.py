"""The ``lpc`` PCI function (an ISA bridge, 8086:7000) and the COM ports behind it.

As in acrn-dm, the ``-l comN,<backend>`` UARTs exist only when an ``lpc`` function is
configured: the bridge creates them (assembly hands it the ``-l`` entries with
``attach``), owns their port ranges and runs their backends. The bridge also shows the
eight PIRQ routing registers (0x60-0x63, 0x68-0x6B) that the DSDT's ISA device exposes
to ACPI; they live in the PCI bus's INTx router.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import ConfigError
from ..irq.intx import IntxRouter
from ..irq.services import Line
from ..pci.device import PciDevice
from ..slot import SlotConfig
from .uart8250 import COM_PORTS, UART_IO_SIZE, Uart8250
from .uart_backend import UartBackend, open_backend

if TYPE_CHECKING:
    from ..config import LpcConfig
    from ..context import DeviceContext

log = logging.getLogger(__name__)

LPC_VENDOR = 0x8086
LPC_DEVICE = 0x7000
PCIC_BRIDGE = 0x06
PCIS_BRIDGE_ISA = 0x01
PIRQ_REGS = (0x60, 0x61, 0x62, 0x63, 0x68, 0x69, 0x6A, 0x6B)
PIRQ_DISABLED = 0x80
#: ISA IRQs a PIRQ may be routed to (acrn-dm irq.c's permitted set)
PIRQ_PERMITTED = frozenset({3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15})


@dataclass
class ComPort:
    """One UART on the LPC bus: where it decodes, its ISA IRQ, and its host end."""

    name: str
    base: int
    irq: int
    uart: Uart8250
    backend: UartBackend


def _parse_int(text: str, what: str, spec: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"-l {spec}: {what} {text!r} is not a number") from None


def com_resources(cfg: LpcConfig) -> tuple[int, int]:
    """Port base and IRQ for an ``-l`` entry (com5 names its own)."""
    if cfg.device == "com5":
        spec = ",".join((cfg.device, cfg.backend, *cfg.extra))
        base = _parse_int(cfg.extra[0], "port", spec)
        irq = _parse_int(cfg.extra[1], "irq", spec)
        if not 0 < base <= 0x10000 - UART_IO_SIZE or not 0 < irq < 16:
            raise ConfigError(f"-l {spec}: port must be 1..0xFFF8 and irq 1..15")
        return base, irq
    return COM_PORTS[cfg.device]


class LpcBridge(PciDevice):
    """The ISA bridge function and the COM ports it decodes."""

    name = "lpc"

    def __init__(self, ctx: DeviceContext, slot: SlotConfig) -> None:
        if slot.bus != 0:
            raise ConfigError(f"-s {slot.slot_text},lpc: the LPC bridge must be on bus 0")
        super().__init__(ctx, slot)
        self.ctx: DeviceContext = ctx
        self.cfg.set_ids(LPC_VENDOR, LPC_DEVICE, (PCIC_BRIDGE << 16) | (PCIS_BRIDGE_ISA << 8))
        self.ports: list[ComPort] = []
        self._registered: list[int] = []
        #: the PCI bus's INTx router, which keeps the PIRQ registers
        self.router: IntxRouter | None = None
        #: what Ctrl-A x on a console does (the VM's immediate power-off)
        self.on_console_quit: Callable[[], None] | None = None

    def attach(self, router: IntxRouter, com_ports: list[LpcConfig],
               on_console_quit: Callable[[], None] | None = None) -> None:
        """Assembly's wiring: the router, the ``-l`` COM ports (before INTx is routed, so
        PCI links keep off their IRQs), the console's quit. Undone by ``close``."""
        self.router = router
        self.on_console_quit = on_console_quit
        self._add_uarts(com_ports)

    # --- COM ports ------------------------------------------------------------------------
    def _add_uarts(self, entries: list[LpcConfig]) -> None:
        ports = self.ctx.ports
        if ports is None and entries:
            raise ConfigError("-l: COM ports need the VM's port bus")
        seen: set[str] = set()
        for entry in entries:
            if entry.device in seen:
                raise ConfigError(f"-l {entry.device}: given twice")
            seen.add(entry.device)
            base, irq = com_resources(entry)
            if self.router is not None:
                self.router.reserve_irq(irq)  # keep PCI INTx links off the COM port's IRQ
            backend = open_backend(entry.backend)
            port = self._make_port(entry.device.upper(), base, irq, backend)
            self.ports.append(port)
            assert ports is not None
            ports.register(base, UART_IO_SIZE, port.uart, port.name)
            self._registered.append(base)
            log.info("%s at %#x, IRQ %d, backend %s", port.name, base, irq,
                     backend.description)

    def _make_port(self, name: str, base: int, irq: int, backend: UartBackend) -> ComPort:
        line = Line(self.ctx.lines, irq)
        uart = Uart8250(name, line.pulse, backend.send)
        uart.rx_space_changed = backend.space_changed
        backend.connect(uart.rx_space, uart.receive)
        backend.on_quit = self._quit
        return ComPort(name, base, irq, uart, backend)

    def _quit(self) -> None:
        if self.on_console_quit is not None:
            log.info("Ctrl-A x on the console: powering off")
            self.on_console_quit()

    # --- PIRQ routing registers (live in the PCI bus's INTx router) ----------------------
    def pirq(self, pin: int) -> int:
        """PIRQ pin 1..8 → its routing register (bit 7 = disabled, else an ISA IRQ)."""
        router = self.router
        return router.pirq_read(pin) if router is not None else PIRQ_DISABLED

    def cfg_read(self, reg: int, size: int) -> int:
        value = super().cfg_read(reg, size)
        for i in range(size):
            if reg + i in PIRQ_REGS:
                pin = PIRQ_REGS.index(reg + i) + 1
                value = (value & ~(0xFF << (8 * i))) | (self.pirq(pin) << (8 * i))
        return value

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        router = self.router
        if size == 1 and reg in PIRQ_REGS:  # acrn-dm takes byte writes only
            if router is not None and (value & PIRQ_DISABLED or value in PIRQ_PERMITTED):
                router.pirq_write(PIRQ_REGS.index(reg) + 1, value)
            return
        super().cfg_write(reg, size, value)

    # --- lifetime -------------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for port in self.ports:
                nursery.start_soon(self._run_backend, port)

    @staticmethod
    async def _run_backend(port: ComPort) -> None:
        try:
            await port.backend.run()
        except Exception:
            log.exception("%s backend %s failed; the UART goes on without it", port.name,
                          port.backend.description)

    def reset(self) -> None:
        super().reset()
        for port in self.ports:
            port.uart.reset()

    def flush(self) -> None:
        for port in self.ports:
            port.backend.flush()

    def close(self) -> None:
        ports = self.ctx.ports
        for base in self._registered:
            try:
                assert ports is not None
                ports.unregister(base)
            except Exception:
                log.debug("unregister %#x failed", base, exc_info=True)
        self._registered.clear()
        for port in self.ports:
            port.backend.close()
        self.ports = []
        super().close()


def create(ctx: DeviceContext, slot: SlotConfig, options: str) -> LpcBridge:
    """``-s <slot>,lpc`` (one per VM: assembly checks)."""
    return LpcBridge(ctx, slot)
