"""From a served function's interrupt signalling to the client's IRQ indexes.

The device is built on a standalone ``DeviceContext`` whose services are these:

* ``ClientLines``: the INTx line (an ``IrqLines``; the function's pin is handed a
  ``Line(lines, 0)``, active high) whose level the client's INTx index follows, with
  ``ClientIrqs``' automask (irqs.py); and the context's MSI sink, which nothing should
  reach: the function's MSI-X and MSI vectors are handed to the client's eventfds
  (``PciDevice.hand_interrupts_to`` with ``irq.delivery.EventfdVectors``).
* ``ClientRemapper``: the interrupt remapping a passthrough device (``passthru,sim:N``)
  asks its backend for. Physical message k, once the device routed it, raises client
  vector k: the guest's own messages live in the client's emulated capabilities.
* ``ClientPassthrough``: the passthrough service, which assigns nothing (the synthetic
  device needs no hypervisor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..hsm.base import HypervisorError, MessageSource, PciDevAssignment, PtdevIntx

if TYPE_CHECKING:
    from ..pci.msix import VectorSignal
    from .irqs import ClientIrqs

#: the message the synthetic device is programmed with: message k carries data k
CLIENT_MSI_ADDR = 0xFEE0_0000


class ClientLines:
    """The function's INTx level, followed by the client's INTx index, and a sink for
    messages that have no client vector (counted, never delivered)."""

    def __init__(self) -> None:
        #: the connected client's IRQ indexes (None between clients)
        self.irqs: ClientIrqs | None = None
        self.level = False
        #: messages that reached the MSI sink instead of a client vector
        self.dropped = 0

    def set_line(self, gsi: int, high: bool) -> None:
        self._set_level(high)

    def pulse_line(self, gsi: int) -> None:
        self._set_level(True)
        self._set_level(False)

    def inject_msi(self, address: int, data: int) -> None:
        self.dropped += 1

    def _set_level(self, level: bool) -> None:
        changed = level != self.level
        self.level = level
        irqs = self.irqs
        if changed and irqs is not None:
            irqs.intx_changed(level)


class ClientRemapper:
    """Remapping for one passthrough device served over vfio-user: the device is given
    one message (``CLIENT_MSI_ADDR``, data 0), so its message k arrives with data k and
    raises vector k of ``target()`` (the client's MSI-X vectors for vMSI-X on MSI, else
    its MSI vectors), if the device routed k; anything else is counted as dropped."""

    def __init__(self, source: MessageSource, count: int,
                 target: Callable[[], VectorSignal | None]) -> None:
        self.count = count
        self.source = source
        self._target = target
        self._routed = 0
        self.dropped = 0
        source.connect_interrupts(self._message)

    def physical_message(self) -> tuple[int, int] | None:
        return CLIENT_MSI_ADDR, 0

    def route(self, k: int, address: int, data: int) -> bool:
        if not 0 <= k < self.count:
            return False
        self._routed |= 1 << k
        return True

    def unroute(self, k: int) -> None:
        if 0 <= k < self.count:
            self._routed &= ~(1 << k)

    def close(self) -> None:
        self._routed = 0
        self.source.connect_interrupts(None)

    def _message(self, address: int, data: int) -> None:
        """A message write of the device (the IOMMU's view)."""
        target = self._target()
        if (address != CLIENT_MSI_ADDR or not 0 <= data < self.count
                or not self._routed >> data & 1 or target is None or not target.send(data)):
            self.dropped += 1


class ClientPassthrough:
    """The passthrough service of a served function: the device model owns the guest
    view (the client forwards config space to it), no host device is reached, nothing
    is assigned to a hypervisor."""

    emulates_passthrough_config = False
    reaches_host_devices = False

    def assign_pcidev(self, dev: PciDevAssignment) -> None:
        raise HypervisorError("vfio-user: no hypervisor to assign a device to")

    deassign_pcidev = assign_pcidev

    def set_ptdev_intr(self, intx: PtdevIntx) -> None:
        raise HypervisorError("vfio-user: no hypervisor to route INTx")

    reset_ptdev_intr = set_ptdev_intr


__all__ = ["CLIENT_MSI_ADDR", "ClientLines", "ClientPassthrough", "ClientRemapper"]
