"""The interrupt services over a hypervisor backend (what assembly hands the devices).

The one place that turns line levels into the HSM's SET_IRQLINE operations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..hsm import abi

if TYPE_CHECKING:
    from ..hsm.base import Hypervisor


class BackendInterrupts:
    """MSI injection, interrupt lines and (when offered) eventfds of one backend."""

    def __init__(self, hv: Hypervisor) -> None:
        self._hv = hv
        self.msi_count = 0

    def inject_msi(self, address: int, data: int) -> None:
        self.msi_count += 1
        self._hv.inject_msi(address, data)

    def set_line(self, gsi: int, high: bool) -> None:
        self._hv.set_irqline(gsi, abi.GSI_SET_HIGH if high else abi.GSI_SET_LOW)

    def pulse_line(self, gsi: int) -> None:
        self._hv.set_irqline(gsi, abi.GSI_RAISING_PULSE)

    @property
    def supports_eventfds(self) -> bool:
        return self._hv.supports_eventfds

    def ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        self._hv.ioeventfd(fd, address, length, pio=pio, datamatch=datamatch, deassign=deassign)

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None:
        self._hv.irqfd(fd, address, data, deassign=deassign)


__all__ = ["BackendInterrupts"]
