"""What interrupt delivery needs from below: an MSI sink, interrupt lines, eventfds.

These are the services a backend (or a peer, for a device served outside a VM) offers.
Everything in ``irq/`` and above talks to them, never to a hypervisor object, so a device
cannot tell the backends apart and can run where there is no backend at all.
"""

from __future__ import annotations

from typing import Protocol


class MsiSink(Protocol):
    """Injects one MSI: a memory write of ``data`` to ``address``."""

    def inject_msi(self, address: int, data: int) -> None: ...


class IrqLines(Protocol):
    """Drives interrupt controller pins by level or with a rising edge."""

    def set_line(self, gsi: int, high: bool) -> None: ...

    def pulse_line(self, gsi: int) -> None: ...


class Eventfds(Protocol):
    """The backend's eventfd fast paths (ioeventfd: a guest write signals ``fd``; irqfd:
    signalling ``fd`` injects an MSI). Calls raise on failure; callers fall back to the
    trapped path."""

    def ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                  datamatch: int | None = None, deassign: bool = False) -> None: ...

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None: ...


class Line:
    """One pin with its polarity: devices assert and deassert, the polarity picks the level.

    PCI INTx pins are active low (idle high), ISA IRQs and the SCI active high.
    """

    __slots__ = ("lines", "gsi", "active_low")

    def __init__(self, lines: IrqLines, gsi: int, *, active_low: bool = False) -> None:
        self.lines = lines
        self.gsi = gsi
        self.active_low = active_low

    def assert_(self) -> None:
        self.lines.set_line(self.gsi, not self.active_low)

    def deassert(self) -> None:
        self.lines.set_line(self.gsi, self.active_low)

    def set(self, active: bool) -> None:
        self.lines.set_line(self.gsi, active != self.active_low)

    def pulse(self) -> None:
        """An edge (the UART's interrupt): the line rises and falls again."""
        self.lines.pulse_line(self.gsi)


class NoInterrupts:
    """Drops everything: the services of a device built where nothing receives its
    interrupts (``acrn-pydm lspci``)."""

    def inject_msi(self, address: int, data: int) -> None:
        pass

    def set_line(self, gsi: int, high: bool) -> None:
        pass

    def pulse_line(self, gsi: int) -> None:
        pass


__all__ = ["Eventfds", "IrqLines", "Line", "MsiSink", "NoInterrupts"]
