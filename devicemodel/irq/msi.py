"""MSI message delivery: multiple messages, per-vector mask and pending bits.

The registers live wherever the function keeps them (an emulated function's config
space: ``pci/msi.py``); ``MsiVectors`` holds what delivery decides on, as the guest last
wrote it, under a lock so a data-plane thread may ``send`` while the guest reprograms.
Address and data are used as they are when a message is sent, not only when MSI was
enabled: Linux rewrites them while MSI stays on (affinity changes), as hardware allows.
The data of message i has its low log2(n) bits replaced by i (PCI spec); for the aligned
blocks Linux allocates this is acrn-dm's ``data + i``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .services import MsiSink


def message_data(data: int, allocated: int, vector: int) -> int:
    """The data of message ``vector`` when ``allocated`` (a power of two) are enabled."""
    return (data & ~(allocated - 1)) | vector


class MsiVectors:
    """One MSI capability's delivery state: enable, allocation, message, mask, pending."""

    def __init__(self, sink: MsiSink, *,
                 on_pending: Callable[[int], None] | None = None) -> None:
        self.sink = sink
        self.on_pending = on_pending
        self._lock = threading.Lock()
        self._enabled = False
        self._allocated = 1
        self._address = 0
        self._data = 0
        self._mask = 0
        self._pending = 0
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def pending(self) -> int:
        return self._pending

    def update(self, *, enabled: bool, allocated: int, address: int, data: int,
               mask: int) -> None:
        """The guest wrote the capability: take its values, deliver what is now unmasked."""
        with self._lock:
            self._enabled = enabled
            self._allocated = allocated
            self._address = address
            self._data = data
            self._mask = mask
            if not enabled:
                return
            ready = self._pending & ~mask & ((1 << allocated) - 1)
            while ready:
                v = (ready & -ready).bit_length() - 1
                ready &= ready - 1
                self._deliver(v)

    def send(self, vector: int) -> bool:
        """Raise message ``vector``: True if delivered now; a masked vector sets its pending
        bit; with MSI off or beyond the allocation the message is dropped."""
        with self._lock:
            if not self._enabled or not 0 <= vector < self._allocated:
                return False
            bit = 1 << vector
            if self._mask & bit:
                if not self._pending & bit:
                    self._set_pending(self._pending | bit)
                return False
            self._deliver(vector)
            return True

    def _deliver(self, vector: int) -> None:
        self.sink.inject_msi(self._address,
                             message_data(self._data, self._allocated, vector))
        self.sent += 1
        if self._pending >> vector & 1:
            self._set_pending(self._pending & ~(1 << vector))

    def _set_pending(self, bits: int) -> None:
        self._pending = bits
        if self.on_pending is not None:
            self.on_pending(bits)

    def reset(self) -> None:
        with self._lock:
            self._enabled = False
            self._allocated = 1
            self._address = self._data = self._mask = 0
            self._pending = 0
            self.sent = 0


__all__ = ["MsiVectors", "message_data"]
