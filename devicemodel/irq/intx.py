"""INTx: a function's level-triggered pin, routed as acrn-dm routes it (acrn-facts §3.5).

* Pin: each function that wants INTx gets the least-used of INTA..INTD in its slot.
* GSI: each (bus, slot, pin) gets a vIOAPIC pin, 16 + round robin over 32; GSIs are not
  shared, so the 33rd routed pin is a configuration error (acrn-dm asserts).
* PIRQ: each (bus, slot, pin) also gets the least-used of 8 PIRQ links, and a link its
  least-used permitted ISA IRQ; INTLINE shows that IRQ. LPC and the ACPI _PRT use these.
* The line is active low: high at routing (idle), low while asserted. An assert while
  MSI/MSI-X is on or command.INTxDIS is set stays PENDING and is raised when that
  changes. ``Intx`` may be asserted from any thread (a lock covers its state).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from .services import IrqLines, Line

LEGACY_IRQS = 16
IOAPIC_PINS = 48
PCI_GSI_PINS = IOAPIC_PINS - LEGACY_IRQS
PIRQ_PINS = 8
PIRQ_DIS = 0x80
PIRQ_IRQ = 0x0F
#: ISA IRQs a PIRQ link may use: 3-7, 9-12, 14-15
PERMITTED_IRQS = 0xDEF8
_IRQ_DISABLED = 0xFF


@dataclass(frozen=True)
class IntxRoute:
    """One routed (bus, slot, pin): what the ACPI _PRT describes."""

    bus: int
    slot: int
    pin: int  # 1..4 = INTA..INTD
    gsi: int
    pirq_pin: int  # 1..8 = LNKA..LNKH
    irq: int  # ISA IRQ of the PIRQ link (INTLINE)


class IntxRouter:
    """Per-VM pin, GSI and PIRQ allocation."""

    def __init__(self, lines: IrqLines) -> None:
        self.lines = lines
        self._pin_counts: dict[tuple[int, int], list[int]] = {}
        self._routes: dict[tuple[int, int, int], IntxRoute] = {}
        self._next_gsi = 0
        self.pirq_regs = [PIRQ_DIS] * PIRQ_PINS
        self._pirq_use = [0] * PIRQ_PINS
        self._irq_counts = [0 if PERMITTED_IRQS >> i & 1 else _IRQ_DISABLED
                            for i in range(LEGACY_IRQS)]

    def reserve_irq(self, irq: int) -> None:
        """Keep an ISA IRQ away from PIRQ links (LPC devices call this before routing)."""
        if 0 <= irq < LEGACY_IRQS:
            self._irq_counts[irq] = _IRQ_DISABLED

    def request_pin(self, bus: int, slot: int) -> int:
        counts = self._pin_counts.setdefault((bus, slot), [0, 0, 0, 0])
        best = min(range(4), key=lambda p: counts[p])
        counts[best] += 1
        return best + 1

    def route(self, bus: int, slot: int, pin: int) -> IntxRoute:
        key = (bus, slot, pin)
        r = self._routes.get(key)
        if r is not None:
            return r
        if self._next_gsi >= PCI_GSI_PINS:
            raise ConfigError(
                f"PCI {bus}:{slot} INT{'ABCD'[pin - 1]}: all {PCI_GSI_PINS} vIOAPIC pins for "
                "PCI are used and GSIs are not shared; use MSI-capable devices or fewer slots"
            )
        gsi = LEGACY_IRQS + self._next_gsi
        self._next_gsi += 1
        pirq_pin = self._alloc_pirq()
        r = IntxRoute(bus, slot, pin, gsi, pirq_pin, self.pirq_irq(pirq_pin))
        self._routes[key] = r
        Line(self.lines, gsi, active_low=True).deassert()  # idle
        return r

    def _alloc_pirq(self) -> int:
        best = min(range(PIRQ_PINS), key=lambda p: self._pirq_use[p])
        self._pirq_use[best] += 1
        if self.pirq_regs[best] == PIRQ_DIS:
            usable = [i for i in range(LEGACY_IRQS) if self._irq_counts[i] != _IRQ_DISABLED]
            if usable:
                irq = min(usable, key=lambda i: self._irq_counts[i])
                self._irq_counts[irq] += 1
                self.pirq_regs[best] = irq
        return best + 1

    def pirq_irq(self, pirq_pin: int) -> int:
        if not 1 <= pirq_pin <= PIRQ_PINS:
            return 0xFF
        return self.pirq_regs[pirq_pin - 1] & PIRQ_IRQ

    def pirq_read(self, pirq_pin: int) -> int:
        if not 1 <= pirq_pin <= PIRQ_PINS:
            return PIRQ_DIS
        return self.pirq_regs[pirq_pin - 1]

    def pirq_write(self, pirq_pin: int, value: int) -> None:
        if 1 <= pirq_pin <= PIRQ_PINS:
            self.pirq_regs[pirq_pin - 1] = value & (PIRQ_DIS | PIRQ_IRQ)

    def routes(self) -> list[IntxRoute]:
        return sorted(self._routes.values(), key=lambda r: (r.bus, r.slot, r.pin))


class IntxState(enum.Enum):
    IDLE = 0
    ASSERTED = 1
    PENDING = 2


class Intx:
    """One function's INTx pin. ``permitted`` says whether INTx may be driven now
    (MSI, MSI-X and INTxDIS all off); ``on_status`` mirrors the state into the
    status register's Interrupt Status bit."""

    def __init__(self, permitted: Callable[[], bool],
                 on_status: Callable[[bool], None] | None = None) -> None:
        self.permitted = permitted
        self.on_status = on_status
        self.line: Line | None = None
        self.pin = 0
        self.state = IntxState.IDLE
        self._lock = threading.RLock()

    @property
    def gsi(self) -> int | None:
        return self.line.gsi if self.line is not None else None

    def connect(self, lines: IrqLines, route: IntxRoute) -> None:
        """The bus routed the pin: drive its vIOAPIC pin (active low)."""
        self.use_line(Line(lines, route.gsi, active_low=True))

    def use_line(self, line: Line) -> None:
        """Drive ``line`` (a peer's INTx eventfd, for a function served outside a VM)."""
        with self._lock:
            if self.state is IntxState.ASSERTED and self.line is not None:
                self.line.set(False)
            self.line = line
            if self.state is IntxState.ASSERTED:
                line.set(True)

    def _drive(self, active: bool) -> None:
        if self.line is not None:
            self.line.set(active)

    def _status(self) -> None:
        if self.on_status is not None:
            self.on_status(self.state is not IntxState.IDLE)

    def assert_(self) -> None:
        with self._lock:
            if self.state is IntxState.IDLE:
                if self.permitted():
                    self.state = IntxState.ASSERTED
                    self._drive(True)
                else:
                    self.state = IntxState.PENDING
                self._status()

    def deassert(self) -> None:
        with self._lock:
            if self.state is IntxState.ASSERTED:
                self._drive(False)
            self.state = IntxState.IDLE
            self._status()

    def update(self) -> None:
        """Re-evaluate after MSI/MSI-X enable or INTxDIS changed."""
        with self._lock:
            if self.state is IntxState.ASSERTED and not self.permitted():
                self._drive(False)
                self.state = IntxState.PENDING
            elif self.state is IntxState.PENDING and self.permitted():
                self.state = IntxState.ASSERTED
                self._drive(True)

    def reset(self) -> None:
        with self._lock:
            if self.state is IntxState.ASSERTED:
                self._drive(False)
            self.state = IntxState.IDLE
            self._status()
