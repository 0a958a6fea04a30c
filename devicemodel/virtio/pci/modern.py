"""The modern interface: the common configuration, ISR, device config and notify regions
of BAR4, and the optional PIO notify BAR2 (virtio 1.2 §4.1.4).

BAR4 layout: common cfg 0x0000, ISR 0x1000, device cfg 0x2000, notify 0x3000 (queue i
at 4 * i). Writes of the wrong size to a common-config field are dropped, reads of it
give all-ones; a queue's registers are frozen once it is enabled (§4.1.4.3.2).
"""

from __future__ import annotations

from ..device import STATUS_DRIVER_OK, STATUS_FEATURES_OK
from .core import VirtioFunction
from .layout import (
    C_CFGGEN,
    C_DF,
    C_DFSELECT,
    C_GF,
    C_GFSELECT,
    C_MSIX,
    C_NUMQ,
    C_Q_ENABLE,
    C_Q_MSIX,
    C_Q_NOFF,
    C_Q_SELECT,
    C_Q_SIZE,
    C_STATUS,
    COMMON_CFG_SIZE,
    COMMON_SIZES,
    DEVICE_OFF,
    ISR_OFF,
    NO_VECTOR,
    NOTIFY_MULTIPLIER,
    NOTIFY_OFF,
    ONES,
    RING_FIELDS,
)


class ModernRegisters:
    """BAR4's handler (and BAR2's, ``pio_notify_*``): the modern view of the transport."""

    def __init__(self, fn: VirtioFunction) -> None:
        self.fn = fn

    # --- BAR4 -----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4):
            return ONES.get(size, 0xFFFF_FFFF)
        if offset < ISR_OFF:
            return self._common_read(offset, size)
        if offset < DEVICE_OFF:
            return self.fn.read_isr() if offset == ISR_OFF else 0
        if offset < NOTIFY_OFF:
            return self.fn.device_config_read(offset - DEVICE_OFF, size)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            return
        if offset >= NOTIFY_OFF:
            rel = offset - NOTIFY_OFF
            if rel % NOTIFY_MULTIPLIER == 0:
                self.fn._kick(rel // NOTIFY_MULTIPLIER)
        elif offset >= DEVICE_OFF:
            self.fn.device_config_write(offset - DEVICE_OFF, size, value)
        elif offset < ISR_OFF:
            self._common_write(offset, size, value)

    @staticmethod
    def vcpu_safe_access(offset: int, size: int, write: bool) -> bool:
        """Which BAR4 accesses a request thread may answer behind the loop gate: the
        common configuration (plain state; a Linux probe is mostly these) except the
        status register, whose writes start and reset the device on the loop, and ISR
        reads (INTx goes through the thread-safe irq layer). Device config and notify
        stay on the loop (device code; kicks wake workers)."""
        if offset < ISR_OFF:
            return not (write and offset <= C_STATUS < offset + size)
        return offset == ISR_OFF and not write

    # --- BAR2: the queue index is the data ------------------------------------------------
    def pio_notify_read(self, offset: int, size: int) -> int:
        return 0

    def pio_notify_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size in (1, 2, 4):
            self.fn._kick(value)

    # --- the common configuration structure ----------------------------------------------
    def _common_read(self, offset: int, size: int) -> int:
        if COMMON_SIZES.get(offset) != size:
            return ONES[size] if offset < COMMON_CFG_SIZE else 0
        fn = self.fn
        q = fn.selected_queue()
        if offset == C_DFSELECT:
            return fn.device_feature_select
        if offset == C_DF:
            sel = fn.device_feature_select
            return (fn.device.device_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        if offset == C_GFSELECT:
            return fn.driver_feature_select
        if offset == C_GF:
            sel = fn.driver_feature_select
            return (fn.driver_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        if offset == C_MSIX:
            return fn.config_vector
        if offset == C_NUMQ:
            return len(fn.queues)
        if offset == C_STATUS:
            return fn.read_status()
        if offset == C_CFGGEN:
            return fn.config_generation
        if offset == C_Q_SELECT:
            return fn.queue_sel
        if q is None:
            return NO_VECTOR if offset == C_Q_MSIX else 0
        if offset == C_Q_SIZE:
            return q.size
        if offset == C_Q_MSIX:
            return fn.queue_vectors[q.index]
        if offset == C_Q_ENABLE:
            return 1 if q.ready else 0
        if offset == C_Q_NOFF:
            return q.index
        name, shift = RING_FIELDS[offset]
        return (getattr(q, name) >> shift) & 0xFFFF_FFFF

    def _common_write(self, offset: int, size: int, value: int) -> None:
        if COMMON_SIZES.get(offset) != size:
            return
        fn = self.fn
        if offset == C_DFSELECT:
            fn.device_feature_select = value
        elif offset == C_GFSELECT:
            fn.driver_feature_select = value
        elif offset == C_GF:
            sel = fn.driver_feature_select
            if sel < 2 and not fn.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK):
                shift = 32 * sel
                mask = 0xFFFF_FFFF << shift
                fn.driver_features = (fn.driver_features & ~mask) | (value << shift)
        elif offset == C_MSIX:
            fn.config_vector = fn.vector_value(value)
        elif offset == C_STATUS:
            fn.write_status(value, modern=True)
        elif offset == C_Q_SELECT:
            fn.queue_sel = value
        else:
            self._queue_write(offset, value)

    def _queue_write(self, offset: int, value: int) -> None:
        fn = self.fn
        q = fn.selected_queue()
        if q is None:
            return
        if offset == C_Q_MSIX:
            fn.queue_vectors[q.index] = fn.vector_value(value)
            return
        if q.ready or fn.active:
            return  # §4.1.4.3.2: no queue changes once the queue is enabled
        if offset == C_Q_SIZE:
            q.size = value
        elif offset == C_Q_ENABLE:
            if value == 1:
                q.ready = True
        elif offset in RING_FIELDS:
            name, shift = RING_FIELDS[offset]
            mask = 0xFFFF_FFFF << shift
            setattr(q, name, (getattr(q, name) & ~mask) | (value << shift))


__all__ = ["ModernRegisters"]
