"""What a device gets from the VM: memory, buses, interrupts, and the fast-path eventfds.

Devices depend on this facade, never on a hypervisor backend (design.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .bus import MmioBus, PortBus
from .hsm import abi

if TYPE_CHECKING:
    from .config import VmConfig
    from .hsm.base import Hypervisor
    from .memory import MemoryMap


class Interrupts:
    """Interrupt delivery and eventfd fast paths, as the hypervisor offers them."""

    def __init__(self, hv: Hypervisor) -> None:
        self._hv = hv
        self.msi_count = 0

    def inject_msi(self, address: int, data: int) -> None:
        self.msi_count += 1
        self._hv.inject_msi(address, data)

    def set_irqline(self, gsi: int, op: int) -> None:
        self._hv.set_irqline(gsi, op)

    def assert_line(self, gsi: int) -> None:
        """Drive an active-low INTx line to its asserted level."""
        self._hv.set_irqline(gsi, abi.GSI_SET_LOW)

    def deassert_line(self, gsi: int) -> None:
        self._hv.set_irqline(gsi, abi.GSI_SET_HIGH)

    @property
    def supports_eventfds(self) -> bool:
        return self._hv.supports_eventfds

    def ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        self._hv.ioeventfd(fd, address, length, pio=pio, datamatch=datamatch, deassign=deassign)

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None:
        self._hv.irqfd(fd, address, data, deassign=deassign)


@dataclass
class VmContext:
    """Everything a device may use. Built by vm.py, handed to every device factory."""

    config: VmConfig
    memory: MemoryMap
    ports: PortBus
    mmio: MmioBus
    irq: Interrupts
    hv_name: str
    #: the backend itself, for passthrough and platform code that must talk to it
    hv: Hypervisor
    extras: dict[str, object] = field(default_factory=dict)
