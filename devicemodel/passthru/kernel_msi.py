"""A passthrough device's MSI when the host kernel owns it (KVM backend, VFIO).

VFIO_DEVICE_SET_IRQS hands the device's MSI to the host kernel: it enables the
capability, sets Multiple Message Enable, writes address and data, and keeps its own copy
of the per-vector mask word, which it writes back whole whenever it masks or unmasks one
of its interrupts. A second writer through sysfs ``config`` (what the device model did:
enable, MME and mask bits, like a driver) is undone behind its back, and a guest's masked
vector can come unmasked again. So on this backend the device model never writes the
capability: ``KernelOwnedMsi`` has the interface of ``host.HostMsi`` that vMSI-X on MSI
and plain MSI use, reads the layout from the device, and turns every write into state of
its own: enable and the mask word become which vectors the interrupt remapper holds back
(``irq.remap.IrqfdRemapper.hold``), and the pending bits are the held vectors whose
eventfd has a message waiting. docs/vmsix-on-msi.md ("Who writes the MSI capability")
says who owns it on each backend.
"""

from __future__ import annotations

from ..irq.remap import IrqfdRemapper, RemapRoutes
from ..pci import caps as pcaps
from .host import HostMsi, HostPciDevice, MsiState


class KernelOwnedMsi(HostMsi):
    """The device's MSI as seen through VFIO: layout read from the device, state ours."""

    kernel_owned = True

    def __init__(self, host: HostPciDevice, offset: int) -> None:
        super().__init__(host, offset)
        self._routes: RemapRoutes | None = None
        self._enabled = False
        self._mme = 0
        self._mask = (1 << self.count) - 1

    def bind(self, routes: RemapRoutes) -> None:
        """The routes whose remapper carries the vectors (made on first use)."""
        self._routes = routes

    def _remapper(self) -> IrqfdRemapper | None:
        remapper = self._routes.remapper if self._routes is not None else None
        return remapper if isinstance(remapper, IrqfdRemapper) else None

    def _apply(self) -> None:
        remapper = self._remapper()
        if remapper is not None:
            allocated = (1 << (1 << self._mme)) - 1 if self._enabled else 0
            remapper.hold(self._mask | ~allocated)

    # --- what the emulations call ---------------------------------------------------------
    @property
    def control(self) -> int:
        ctrl = super().control & ~(pcaps.MSI_CTRL_MME_MASK | pcaps.MSI_CTRL_ENABLE)
        ctrl |= self._mme << pcaps.MSI_CTRL_MME_SHIFT
        return ctrl | (pcaps.MSI_CTRL_ENABLE if self._enabled else 0)

    def write_control(self, value: int) -> None:
        self._enabled = bool(value & pcaps.MSI_CTRL_ENABLE)
        self._mme = (value & pcaps.MSI_CTRL_MME_MASK) >> pcaps.MSI_CTRL_MME_SHIFT
        self._apply()

    def enable(self, mme: int) -> None:
        self._mme, self._enabled = mme & 7, True
        self._apply()

    def disable(self) -> None:
        """Off: every vector held, and what waited is dropped (a disabled function sends
        no MSI, so nothing from before may reach the guest once it enables again)."""
        self._enabled = False
        self._apply()
        remapper = self._remapper()
        if remapper is not None:
            remapper.discard_pending()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def program(self, address: int, data: int) -> None:
        """The kernel programs the message; nothing to write."""

    def message(self) -> tuple[int, int]:
        return 0, 0

    @property
    def mask(self) -> int:
        return self._mask

    def set_mask(self, value: int) -> None:
        self._mask = value & ((1 << self.count) - 1)
        self._apply()

    @property
    def pending(self) -> int:
        remapper = self._remapper()
        return remapper.pending() if remapper is not None else 0

    def save(self) -> MsiState:
        return MsiState(self.control, 0, 0, self._mask)

    def restore(self, state: MsiState) -> None:
        """Nothing of ours is on the device; VFIO puts its MSI away when the eventfds go."""


__all__ = ["KernelOwnedMsi"]
