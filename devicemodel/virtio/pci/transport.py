"""The virtio-pci transport (virtio 1.2 §4.1) with acrn-dm's BAR plan (acrn-facts §3.6).

One ``VirtioPci`` wraps any ``VirtioDevice`` (the contract is in ``device.py``); the
state the driver programs is ``core.VirtioFunction``'s. BARs, at acrn-dm's fixed indices::

    BAR0  I/O    legacy registers (legacy.py); device config at 20, or 24 while MSI-X is on
    BAR1  MEM32  MSI-X table + PBA, nvq + 1 vectors (one per queue, one for config)
    BAR2  I/O    optional modern notify (4 bytes, the queue index is the data)
    BAR4  MEM64  16 KiB: common cfg 0x0000, ISR 0x1000, device cfg 0x2000, notify 0x3000
                 (modern.py)

``legacy`` = BAR0 + BAR1 (acrn-dm's choice for blk/net/console/rnd), ``modern`` = BAR1 +
BAR4 (+ BAR2), ``transitional`` = all of them. MSI-X with ``--virtio_msi`` gives way to
one MSI message; INTx is always there as the last resort.

Fast paths (design.md §2), declared here and wired by the bus: each queue's notify
addresses are ioeventfds (``doorbells.py``) while the driver has the device running; the
MSI-X vectors are irqfd-backed (``irq/delivery.py``: the route follows the entry, used
only while the vector is deliverable, so the PBA keeps working). Both can be turned off
per device (``no_ioeventfd``, ``no_irqfd``); the trapped registers always work too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ...errors import ConfigError
from ...pci import caps
from ...pci.device import BarKind
from ..device import VIRTIO_F_VERSION_1, VirtioDevice
from .core import VirtioFunction
from .doorbells import Doorbells
from .layout import (
    COMMON_OFF,
    DEVICE_OFF,
    ISR_OFF,
    LEGACY_BAR,
    MODERN_BAR,
    MODERN_BAR_SIZE,
    MSIX_BAR,
    NOTIFY_MULTIPLIER,
    NOTIFY_OFF,
    PIO_NOTIFY_BAR,
    PIO_NOTIFY_SIZE,
    REGION_SIZE,
)
from .legacy import LegacyRegisters
from .modern import ModernRegisters
from .options import Mode, TransportOptions
from .pcicfg import PciCfgWindow

if TYPE_CHECKING:
    from ...context import DeviceContext
    from ...slot import SlotConfig


class VirtioPci(VirtioFunction):
    """A virtio device on PCI. See the module docstring for the register map."""

    def __init__(self, ctx: DeviceContext, slot: SlotConfig | None, device: VirtioDevice,
                 opts: TransportOptions | None = None, *, msix: bool | None = None,
                 poll_ns: int | None = None) -> None:
        super().__init__(ctx, slot, device)
        opts = opts or TransportOptions()
        self.opts = opts
        self.mode = opts.mode
        choices = ctx.choices
        if msix is None:
            msix = not choices.virtio_msi
        self.poll_ns = poll_ns if poll_ns is not None else choices.virtio_poll_ns
        if self.mode.has_modern and not device.device_features & VIRTIO_F_VERSION_1:
            raise ConfigError(f"{device.name}: the modern interface needs VIRTIO_F_VERSION_1")
        if self.mode.has_modern and device.config_size > REGION_SIZE:
            raise ConfigError(f"{device.name}: device config larger than {REGION_SIZE} bytes")
        ids = device.pci_ids
        modern_only = self.mode is Mode.MODERN
        self.cfg.set_ids(ids.vendor_id,
                         ids.modern_device_id if modern_only else ids.legacy_device_id,
                         ids.class_code, revision=1 if modern_only else 0,
                         subsys_vendor=ids.subsystem_vendor(choices.windows),
                         subsys_id=ids.subsystem_id)

        # --- interrupts: MSI-X (BAR1), one MSI message, INTx (acrn-dm's virtio_intr_init)
        if msix:
            self.add_msix(device.num_queues + 1, bar=MSIX_BAR, irqfd=opts.irqfd)
        self.add_msi(1)
        self.request_intx()

        # --- register BARs and capabilities (acrn-dm's order) --------------------------
        self.legacy = LegacyRegisters(self) if self.mode.has_legacy else None
        if self.legacy is not None:
            self.add_bar(LEGACY_BAR, BarKind.IO, LegacyRegisters.size_for(device.config_size),
                         read=self.legacy.read, write=self.legacy.write,
                         vcpu_safe_access=self.legacy.vcpu_safe_access)
        self.modern = ModernRegisters(self) if self.mode.has_modern else None
        self.pcicfg: PciCfgWindow | None = None
        if self.modern is not None:
            self._add_modern(self.modern, opts.pio_notify)

        # --- fast paths: the doorbells, declared for the bus to wire --------------------
        self.doorbells: Doorbells | None = None
        if ctx.eventfds is not None and opts.ioeventfd:
            self.doorbells = Doorbells(device.num_queues, legacy=self.mode.has_legacy,
                                       pio_notify=opts.pio_notify,
                                       modern=self.mode.has_modern)
            for event in self.doorbells.events:
                self.declare_ioevent(event)

    def _add_modern(self, regs: ModernRegisters, pio_notify: bool) -> None:
        if pio_notify:
            self.add_capability(caps.virtio_cap(
                caps.VIRTIO_PCI_CAP_NOTIFY_CFG, PIO_NOTIFY_BAR, 0, PIO_NOTIFY_SIZE,
                notify_off_multiplier=0))
            self.add_bar(PIO_NOTIFY_BAR, BarKind.IO, PIO_NOTIFY_SIZE,
                         read=regs.pio_notify_read, write=regs.pio_notify_write)
        for cfg_type, off in ((caps.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF),
                              (caps.VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF),
                              (caps.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFF)):
            self.add_capability(caps.virtio_cap(cfg_type, MODERN_BAR, off, REGION_SIZE))
        self.add_capability(caps.virtio_cap(
            caps.VIRTIO_PCI_CAP_NOTIFY_CFG, MODERN_BAR, NOTIFY_OFF, REGION_SIZE,
            notify_off_multiplier=NOTIFY_MULTIPLIER))
        window = self.add_capability(caps.virtio_cap(caps.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0))
        self.pcicfg = PciCfgWindow(self, window)
        self.add_bar(MODERN_BAR, BarKind.MEM64, MODERN_BAR_SIZE, read=regs.read,
                     write=regs.write, vcpu_safe_access=regs.vcpu_safe_access)

    # --- lifetime -------------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.device.run)
            self.device_started()
            if self.doorbells is not None:
                self.doorbells.start(nursery, self.device)
            if self.poll_ns:
                nursery.start_soon(self._poll_loop, self.poll_ns / 1e9)

    async def _poll_loop(self, interval: float) -> None:
        """``--virtio_poll``: kick every queue periodically, the driver need not notify."""
        dev = self.device
        while True:
            await trio.sleep(interval)
            if self.active:
                for i in range(len(self.queues)):
                    dev.queue_notify(i)

    # --- a data-plane thread's kicks (the VirtioInterrupt's optional part) -----------------
    def take_kick_fd(self, index: int) -> int | None:
        """Queue ``index``'s doorbell eventfd for the device's data-plane thread (a
        duplicate it closes; the loop stops watching it): the kick wakes that thread
        directly and its interrupts go out through the irq layer, safe from any thread.
        None (served on the loop): the backend has no ioeventfds."""
        return self.doorbells.take(index) if self.doorbells is not None else None

    def reset_device(self) -> None:
        super().reset_device()  # the device's reset stopped its data-plane threads
        if self.doorbells is not None:
            self.doorbells.give_back()

    @property
    def rescan(self) -> Callable[..., Any]:
        """The device's image swap (the monitor's ``blkrescan``); absent if it has none."""
        fn = getattr(self.device, "rescan", None)
        if fn is None:
            raise AttributeError(f"{self.name} cannot swap its backend")
        return fn

    def close(self) -> None:
        super().close()  # ioeventfds and irqfd routes go before their eventfds
        if self.doorbells is not None:
            self.doorbells.close()
        self.device.close()


__all__ = ["VirtioPci"]
