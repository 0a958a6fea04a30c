"""The legacy register block in BAR0 (virtio 0.9.5 / virtio 1.2 §4.1.4.8).

Device-specific config follows the registers at 20, or at 24 while MSI-X is on (the two
vector registers sit in between). Accesses of the wrong size to a register read all-ones
and are dropped; a queue's ring address is one page frame number, its size fixed at the
queue's maximum.
"""

from __future__ import annotations

from ..device import STATUS_DRIVER_OK
from .core import VirtioFunction
from .layout import (
    L_GUEST_FEATURES,
    L_HOST_FEATURES,
    L_ISR,
    L_MSIX_CONFIG,
    L_MSIX_QUEUE,
    L_QUEUE_NOTIFY,
    L_QUEUE_NUM,
    L_QUEUE_PFN,
    L_QUEUE_SEL,
    L_STATUS,
    LEGACY_CONFIG_MSIX,
    LEGACY_CONFIG_NOMSIX,
    LEGACY_PFN_SHIFT,
    LEGACY_SIZES,
    LEGACY_VRING_ALIGN,
    NO_VECTOR,
    ONES,
)


def legacy_ring_layout(base: int, size: int, align: int = 4096) -> tuple[int, int, int]:
    """Ring addresses of a legacy (virtio 0.9.5) queue at ``base`` = PFN << 12.

    The legacy layout is contiguous: descriptors, then the avail ring, then the used ring
    at the next ``align`` boundary.
    """
    desc = base
    avail = desc + 16 * size
    used = (avail + 6 + 2 * size + align - 1) & ~(align - 1)
    return desc, avail, used

class LegacyRegisters:
    """BAR0's handler: the legacy view of a function's transport state."""

    def __init__(self, fn: VirtioFunction) -> None:
        self.fn = fn

    @staticmethod
    def size_for(config_size: int) -> int:
        return LEGACY_CONFIG_MSIX + config_size

    def vcpu_safe_access(self, offset: int, size: int, write: bool) -> bool:
        """Which accesses a request thread may answer behind the loop gate: reads of the
        registers (ISR included: INTx goes through the thread-safe irq layer) and writes
        of the plain ones (features, queue select, the MSI-X vectors); the ring address,
        notify and status writes start, kick or reset the device on the loop, and device
        config is device code."""
        if offset + size > self._config_start():
            return False
        if not write:
            return True
        return offset in (L_GUEST_FEATURES, L_QUEUE_SEL, L_MSIX_CONFIG, L_MSIX_QUEUE)

    def _config_start(self) -> int:
        msix = self.fn.msix
        return LEGACY_CONFIG_MSIX if msix is not None and msix.enabled else LEGACY_CONFIG_NOMSIX

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4):
            return ONES.get(size, 0xFFFF_FFFF)
        fn = self.fn
        start = self._config_start()
        if offset >= start:
            return fn.device_config_read(offset - start, size)
        if LEGACY_SIZES.get(offset) != size:
            return ONES[size]
        q = fn.selected_queue()
        if offset == L_HOST_FEATURES:
            return fn.device.device_features & 0xFFFF_FFFF
        if offset == L_GUEST_FEATURES:
            return fn.driver_features & 0xFFFF_FFFF
        if offset == L_QUEUE_PFN:
            return fn.pfn[fn.queue_sel] if q is not None else 0
        if offset == L_QUEUE_NUM:
            return q.max_size if q is not None else 0
        if offset == L_QUEUE_SEL:
            return fn.queue_sel
        if offset == L_STATUS:
            return fn.read_status()
        if offset == L_ISR:
            return fn.read_isr()
        if offset == L_MSIX_CONFIG:
            return fn.config_vector
        if offset == L_MSIX_QUEUE:
            return fn.queue_vectors[fn.queue_sel] if q is not None else NO_VECTOR
        return 0  # queue notify reads

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            return
        fn = self.fn
        start = self._config_start()
        if offset >= start:
            fn.device_config_write(offset - start, size, value)
            return
        if LEGACY_SIZES.get(offset) != size:
            return
        if offset == L_QUEUE_NOTIFY:
            fn._kick(value)
        elif offset == L_GUEST_FEATURES:
            if not fn.status & STATUS_DRIVER_OK:
                fn.driver_features = value & fn.device.device_features & 0xFFFF_FFFF
        elif offset == L_QUEUE_PFN:
            self._set_pfn(value)
        elif offset == L_QUEUE_SEL:
            fn.queue_sel = value
        elif offset == L_STATUS:
            fn.write_status(value, modern=False)
        elif offset == L_MSIX_CONFIG:
            fn.config_vector = fn.vector_value(value)
        elif offset == L_MSIX_QUEUE and fn.queue_sel < len(fn.queues):
            fn.queue_vectors[fn.queue_sel] = fn.vector_value(value)

    def _set_pfn(self, pfn: int) -> None:
        fn = self.fn
        q = fn.selected_queue()
        if q is None or fn.active:
            return
        fn.pfn[fn.queue_sel] = pfn
        if pfn == 0:
            q.ready = False
            q.desc_addr = q.avail_addr = q.used_addr = 0
            return
        q.size = q.max_size
        q.desc_addr, q.avail_addr, q.used_addr = legacy_ring_layout(
            pfn << LEGACY_PFN_SHIFT, q.size, LEGACY_VRING_ALIGN)
        q.ready = True


__all__ = ["LegacyRegisters"]
