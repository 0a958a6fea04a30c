"""MSI for emulated functions: multiple messages, per-vector mask and pending bits.

The registers live in the function's ConfigSpace (built by ``caps.msi_cap``); this class
interprets them. Unlike acrn-dm we read address and data when a message is sent, not
only when MSI is enabled, because Linux rewrites them while MSI stays enabled (affinity
changes) and real hardware uses the current values. The message data of vector i has the
low log2(n) bits replaced by i (PCI spec); for the aligned blocks Linux allocates this is
acrn-dm's ``data + i``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from . import caps
from .config import ConfigSpace


class MsiSink(Protocol):
    def inject_msi(self, address: int, data: int) -> None: ...


class Msi:
    """The MSI capability at ``offset`` of ``cfg``."""

    def __init__(self, cfg: ConfigSpace, offset: int, sink: MsiSink,
                 on_change: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.offset = offset
        self.sink = sink
        self.on_change = on_change
        control = cfg.get16(offset + 2)
        self.capable = 1 << ((control >> caps.MSI_CTRL_MMC_SHIFT) & 7)
        self.is64 = bool(control & caps.MSI_CTRL_64BIT)
        self.maskable = bool(control & caps.MSI_CTRL_PVM)
        self.regs = caps.msi_offsets(control)
        self.length = self.regs.length
        self.sent = 0

    # --- state ------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.cfg.get16(self.offset + 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & caps.MSI_CTRL_ENABLE)

    @property
    def vectors(self) -> int:
        """Messages the guest allocated (Multiple Message Enable, capped at capable)."""
        mme = (self.control & caps.MSI_CTRL_MME_MASK) >> caps.MSI_CTRL_MME_SHIFT
        return min(1 << mme, self.capable)

    @property
    def address(self) -> int:
        lo = self.cfg.get32(self.offset + 4)
        hi = self.cfg.get32(self.offset + self.regs.addr_hi) if self.regs.addr_hi else 0
        return (hi << 32) | lo

    @property
    def data(self) -> int:
        return self.cfg.get16(self.offset + self.regs.data)

    @property
    def mask(self) -> int:
        return self.cfg.get32(self.offset + self.regs.mask) if self.regs.mask else 0

    @property
    def pending(self) -> int:
        return self.cfg.get32(self.offset + self.regs.pending) if self.regs.pending else 0

    def _set_pending(self, bits: int) -> None:
        if self.regs.pending:
            self.cfg.set32(self.offset + self.regs.pending, bits)

    # --- delivery ---------------------------------------------------------------------
    def send(self, vector: int) -> bool:
        """Raise message ``vector``. Returns True if it was delivered now; a masked vector
        sets its pending bit instead; with MSI off or a vector beyond the allocation the
        message is dropped."""
        n = self.vectors
        if not self.enabled or not 0 <= vector < n:
            return False
        bit = 1 << vector
        if self.mask & bit:
            self._set_pending(self.pending | bit)
            return False
        self._deliver(vector, n)
        return True

    def _deliver(self, vector: int, n: int) -> None:
        data = (self.data & ~(n - 1)) | vector
        self.sink.inject_msi(self.address, data)
        self.sent += 1
        if self.pending & (1 << vector):
            self._set_pending(self.pending & ~(1 << vector))

    def config_written(self, reg: int, size: int) -> None:
        """Called after every guest write into the capability: deliver what was held."""
        if self.on_change is not None and reg < self.offset + 4 and reg + size > self.offset + 2:
            self.on_change()
        if not self.enabled:
            return
        ready = self.pending & ~self.mask
        n = self.vectors
        for v in range(n):
            if ready & (1 << v):
                self._deliver(v, n)

    def reset(self) -> None:
        self.sent = 0
