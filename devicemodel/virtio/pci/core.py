"""What the driver programs in a virtio-pci function, whichever register interface it uses:
status, feature windows, queue selection and vectors, ISR, config generation, activation
and reset, and the interrupts the device raises (the ``VirtioInterrupt`` it gets).

The legacy registers (``legacy.py``), the modern common configuration and regions
(``modern.py``) and the PCI_CFG window (``pcicfg.py``) are views onto this state;
``transport.py`` lays them out in BARs and capabilities.

Reset is asynchronous at the device (a worker thread may still finish a read into guest
RAM), so after a status write of 0 device_status reads back non-zero until the device
is quiescent: a modern driver polls for 0 before it reuses its buffers.

Interrupts may be raised from any thread (data-plane workers): MSI-X and MSI go through
the interrupt layer, and the ISR with the INTx it drives is kept under a lock.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ...irq.delivery import IrqfdDelivery
from ...pci.device import PciDevice
from ...ratelimit import RateLimitedLog
from ..device import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from ..queue import Virtqueue
from .layout import ISR_CONFIG, ISR_QUEUE, NO_VECTOR, ONES

if TYPE_CHECKING:
    from ...context import DeviceContext
    from ...slot import SlotConfig

log = logging.getLogger(__name__)


class VirtioFunction(PciDevice):
    """A PCI function carrying ``device``: the transport state every interface shares."""

    def __init__(self, ctx: DeviceContext, slot: SlotConfig | None,
                 device: VirtioDevice) -> None:
        super().__init__(ctx, slot)
        self.device = device
        self.name = device.name
        self.rlog = RateLimitedLog(log)
        nq = device.num_queues
        self.queues = [Virtqueue(ctx.memory, i, device.queue_max_size(i)) for i in range(nq)]
        self.queue_vectors = [NO_VECTOR] * nq
        self.pfn = [0] * nq
        self.status = 0
        self.isr = 0
        self._isr_lock = threading.Lock()
        self.config_generation = 0
        self.config_vector = NO_VECTOR
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.active = False
        self._activate_pending = False
        self._drain_status: int | None = None
        self._device_started = False
        self._legacy_driver = False

    # --- status, features, activation, reset --------------------------------------------
    def read_status(self) -> int:
        if self._drain_status is not None:
            if not self.device.quiescent:
                return self._drain_status
            self._drain_status = None
        return self.status

    def write_status(self, value: int, modern: bool) -> None:
        value &= 0xFF
        if value == 0:
            self.reset_device()
            return
        self._drain_status = None
        old = self.status
        new = (value & ~STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET)
        if (modern and new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK
                and not self._features_acceptable()):
            new &= ~STATUS_FEATURES_OK
        self.status = new
        if new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            if modern and not new & STATUS_FEATURES_OK:
                self.rlog.warning("%s: DRIVER_OK without FEATURES_OK; device needs reset",
                                  self.name)
                self.needs_reset()
                return
            self._legacy_driver = not modern
            if self._device_started:
                self._activate()
            else:
                self._activate_pending = True

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        if not f & VIRTIO_F_VERSION_1:
            return False
        try:
            return bool(self.device.check_features(f))
        except Exception:
            log.exception("%s: check_features failed", self.name)
            return False

    def _negotiated(self) -> int:
        if self._legacy_driver:
            return self.driver_features & self.device.device_features & 0xFFFF_FFFF
        return self.driver_features

    def device_started(self) -> None:
        """The device's task runs: a DRIVER_OK that came before it takes effect now."""
        self._device_started = True
        if self._activate_pending:
            self._activate_pending = False
            self._activate()

    def _activate(self) -> None:
        if not self.status & STATUS_DRIVER_OK or self.active:
            return
        self.active = True
        try:
            self.device.activate(self._negotiated(), self.queues, self)
        except Exception:
            log.exception("%s: activation failed", self.name)
            self.needs_reset()
            return
        self.arm_ioevents(True)

    def reset_device(self) -> None:
        """Status 0: the device forgets everything the driver programmed."""
        old = self.status
        self.active = False
        self._activate_pending = False
        self.device.reset()
        for q in self.queues:
            q.reset()
        self.arm_ioevents(False)
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        self.pfn = [0] * len(self.queues)
        self.config_vector = NO_VECTOR
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0
        self._legacy_driver = False
        with self._isr_lock:
            if self.isr:
                self.isr = 0
                if self.intx is not None:
                    self.intx.deassert()
        self.status = 0
        if not self.device.quiescent:
            prev = self._drain_status
            self._drain_status = old or prev or STATUS_DRIVER_OK
        else:
            self._drain_status = None

    @property
    def resetting(self) -> bool:
        """A status write of 0 is still completing (a worker of the past activation runs):
        device_status reads back non-zero until it is done."""
        if self._drain_status is not None and self.device.quiescent:
            self._drain_status = None
        return self._drain_status is not None

    async def wait_reset_done(self) -> None:
        """Return once a status-0 reset has completed (device_status then reads 0). A
        server that can hold its peer's next access until then (vfio-user) does, because
        a legacy driver does not poll: it reads status once after writing 0 and ORs its
        ACKNOWLEDGE into whatever it got."""
        while self.resetting:
            await self.device.wait_quiescent()

    def reset(self) -> None:
        """VM reset: the virtio device reset, power-on config space and BARs."""
        self.reset_device()
        self._drain_status = None
        super().reset()

    # --- interrupts (the VirtioInterrupt the device gets at activate; any thread) ---------
    def notify_queue(self, index: int) -> None:
        msix = self.msix
        if msix is not None and msix.enabled:
            v = self.queue_vectors[index]
            if v != NO_VECTOR:
                msix.send(v)
            return
        self._raise_isr(ISR_QUEUE)

    def notify_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF
        msix = self.msix
        if msix is not None and msix.enabled:
            with self._isr_lock:
                self.isr |= ISR_CONFIG
            if self.config_vector != NO_VECTOR:
                msix.send(self.config_vector)
            return
        self._raise_isr(ISR_CONFIG)

    def needs_reset(self) -> None:
        self.status |= STATUS_DEVICE_NEEDS_RESET
        self.notify_config()

    def _raise_isr(self, bits: int) -> None:
        with self._isr_lock:
            self.isr |= bits
            msi = self.msi
            if msi is not None and msi.enabled:
                msi.send(0)
            elif self.intx is not None:
                self.intx.assert_()

    def read_isr(self) -> int:
        """Reading the ISR clears it and lowers INTx."""
        with self._isr_lock:
            value = self.isr
            self.isr = 0
            if value and self.intx is not None:
                self.intx.deassert()
        return value

    @property
    def irqfd_sent(self) -> int:
        """MSI-X messages that went out through an irqfd."""
        delivery = self.msix.delivery if self.msix is not None else None
        return delivery.sent if isinstance(delivery, IrqfdDelivery) else 0

    # --- queries for a server whose guest memory can change under it ---------------------
    def ring_ranges(self) -> list[tuple[int, int]]:
        """(guest address, bytes) of the descriptor table, available ring and used ring
        of every started queue: the guest memory the device reads and writes on its own.
        A vfio-user server asks before its client unmaps memory (the rings may be in it)
        and, if any, stops the device as the driver's status 0 would (``reset_device``)."""
        out = []
        for q in self.queues:
            if q.started:
                n = q.size
                out += [(q.desc_addr, 16 * n), (q.avail_addr, 6 + 2 * n),
                        (q.used_addr, 6 + 8 * n)]
        return out

    # --- helpers the register interfaces share ------------------------------------------
    def selected_queue(self) -> Virtqueue | None:
        sel = self.queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def vector_value(self, value: int) -> int:
        """A vector the driver wrote: one the MSI-X table has, else NO_VECTOR."""
        msix = self.msix
        if msix is None or value >= msix.entries:
            return NO_VECTOR
        return value

    def _kick(self, index: int) -> None:
        """A trapped queue notify (the ioeventfd path reaches the device directly)."""
        if 0 <= index < len(self.queues):
            self.device.queue_notify(index)

    def device_config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.device.config_size:
            return ONES[size]
        return int.from_bytes(self.device.read_config(offset, size), "little")

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.device.config_size:
            return
        self.device.write_config(offset, value.to_bytes(size, "little"))


__all__ = ["VirtioFunction"]
