"""ACPI fixed-hardware PM for a non-RT post-launched VM (acrn-dm arch/x86/pm.c).

PM1a event block at 0x400 (status, enable), PM1a control at 0x404, the SMI command port
0xB2 (ACPI enable/disable), and the reset control register 0xCF9.  The SCI is GSI 9,
level-triggered and active high (the MADT says so), driven from PM1 status & enable.
S5 (SLP_TYP 5 with SLP_EN) powers the VM off; 0xCF9 bit 2 (or bit 3, acrn-dm's "full
reset") resets it.  Both go through the lifecycle callbacks the VM hands us.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..irq.services import Line
from .acpi import ACPI_DISABLE, ACPI_ENABLE, PM1A_CNT_ADDR, PM1A_EVT_ADDR

log = logging.getLogger(__name__)

SMI_CMD_PORT = 0xB2
RESET_CONTROL_PORT = 0xCF9

PM1_TMR_STS = 0x0001
PM1_BM_STS = 0x0010
PM1_GBL_STS = 0x0020
PM1_PWRBTN_STS = 0x0100
PM1_SLPBTN_STS = 0x0200
PM1_RTC_STS = 0x0400
PM1_WAK_STS = 0x8000
PM1_TMR_EN = 0x0001
PM1_GBL_EN = 0x0020
PM1_PWRBTN_EN = 0x0100
PM1_SLPBTN_EN = 0x0200
PM1_RTC_EN = 0x0400

PM1_SCI_EN = 0x0001
PM1_SLP_TYP = 0x1C00
PM1_SLP_EN = 0x2000
PM1_ALWAYS_ZERO = 0xC003

RESET_SYSTEM = 0x04
RESET_FULL = 0x08

_W1C = PM1_WAK_STS | PM1_RTC_STS | PM1_SLPBTN_STS | PM1_PWRBTN_STS | PM1_BM_STS
_ENABLE_BITS = PM1_RTC_EN | PM1_PWRBTN_EN | PM1_GBL_EN
_SCI_PAIRS = (
    (PM1_TMR_EN, PM1_TMR_STS),
    (PM1_GBL_EN, PM1_GBL_STS),
    (PM1_PWRBTN_EN, PM1_PWRBTN_STS),
    (PM1_SLPBTN_EN, PM1_SLPBTN_STS),
    (PM1_RTC_EN, PM1_RTC_STS),
)


class _Port:
    """Adapts one register to the bus's read/write(offset, size) shape."""

    def __init__(self, read: Callable[[int], int | None],
                 write: Callable[[int, int], None]) -> None:
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        value = self._read(size)
        return (1 << (8 * size)) - 1 if value is None else value

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(size, value)


class PowerManagement:
    """PM1a registers, the SCI, the SMI command port and the 0xCF9 reset register."""

    def __init__(self, sci: Line, poweroff: Callable[[], None],
                 reset: Callable[[], None]) -> None:
        """``sci``: the SCI pin (GSI 9, level, active high)."""
        self._sci_line = sci
        self._poweroff = poweroff
        self._reset = reset
        self.status = 0
        self.enable = 0
        self.control = 0
        self.reset_control = 0
        self.sci_active = False
        self.status_port = _Port(self._status_read, self._status_write)
        self.enable_port = _Port(self._enable_read, self._enable_write)
        self.control_port = _Port(self._control_read, self._control_write)
        self.smi_port = _Port(lambda size: None, self._smi_write)
        self.reset_port = _Port(self._reset_read, self._reset_write)

    def register(self, ports) -> list[int]:  # noqa: ANN001 - a PortBus
        """Claim the ports; returns their bases (for unregistering)."""
        ports.register(PM1A_EVT_ADDR, 2, self.status_port, "pm1a-status")
        ports.register(PM1A_EVT_ADDR + 2, 2, self.enable_port, "pm1a-enable")
        ports.register(PM1A_CNT_ADDR, 2, self.control_port, "pm1a-control")
        ports.register(SMI_CMD_PORT, 1, self.smi_port, "smi-cmd")
        ports.register(RESET_CONTROL_PORT, 1, self.reset_port, "reset-control")
        return [PM1A_EVT_ADDR, PM1A_EVT_ADDR + 2, PM1A_CNT_ADDR, SMI_CMD_PORT,
                RESET_CONTROL_PORT]

    def reset(self) -> None:
        self._sci(False)
        self.status = self.enable = self.control = 0
        self.reset_control = 0

    # --- SCI ------------------------------------------------------------------------------
    def _sci(self, active: bool) -> None:
        if active != self.sci_active:
            self.sci_active = active
            self._sci_line.set(active)

    def _update_sci(self) -> None:
        if not self.control & PM1_SCI_EN:
            return  # SCI_EN clear would mean SMI; there is no SMM here
        self._sci(any(self.enable & en and self.status & st for en, st in _SCI_PAIRS))

    @property
    def guest_listens(self) -> bool:
        """Whether the guest can act on the power button: it enabled ACPI (SCI_EN, through
        the SMI command port). Before that the press would only latch PWRBTN_STS."""
        return bool(self.control & PM1_SCI_EN)

    def press_power_button(self) -> None:
        """What the host's "please shut down" becomes: PWRBTN_STS and an SCI."""
        if not self.status & PM1_PWRBTN_STS:
            self.status |= PM1_PWRBTN_STS
            self._update_sci()

    # --- registers ------------------------------------------------------------------------
    def _status_read(self, size: int) -> int | None:
        return self.status if size == 2 else None

    def _status_write(self, size: int, value: int) -> None:
        if size == 2:
            self.status &= ~(value & _W1C)
            self._update_sci()

    def _enable_read(self, size: int) -> int | None:
        return self.enable if size == 2 else None

    def _enable_write(self, size: int, value: int) -> None:
        if size == 2:
            self.enable = value & _ENABLE_BITS
            self._update_sci()

    def _control_read(self, size: int) -> int | None:
        return self.control if size == 2 else None

    def _control_write(self, size: int, value: int) -> None:
        if size != 2:
            return
        # SLP_EN is write-only and SCI_EN belongs to the firmware (the SMI command port)
        self.control = (self.control & PM1_SCI_EN) | (value & ~(PM1_SLP_EN | PM1_ALWAYS_ZERO))
        if value & PM1_SLP_EN:
            slp_typ = (value & PM1_SLP_TYP) >> 10
            if slp_typ == 5:
                log.info("guest entered S5: powering off")
                self._poweroff()
            else:
                log.warning("guest asked for sleep type %d, which is not offered", slp_typ)

    def _smi_write(self, size: int, value: int) -> None:
        if size != 1:
            return
        if value & 0xFF == ACPI_ENABLE:
            self.control |= PM1_SCI_EN
            self._update_sci()
        elif value & 0xFF == ACPI_DISABLE:
            self.control &= ~PM1_SCI_EN
            self._sci(False)

    def _reset_read(self, size: int) -> int | None:
        return self.reset_control if size == 1 else None

    def _reset_write(self, size: int, value: int) -> None:
        if size != 1:
            return
        self.reset_control = value & 0xFF
        if value & (RESET_FULL | RESET_SYSTEM):
            log.info("guest wrote %#x to 0xCF9: %s reset", value & 0xFF,
                     "full" if value & RESET_FULL else "system")
            self.reset_control = 0
            self._reset()
