"""The MSI capability of an emulated function: its registers in config space, delivery in
``irq.msi.MsiVectors``.

The registers live in the function's ConfigSpace (built by ``caps.msi_cap``); after each
guest write into the capability the values go to the delivery state, and the pending
bits it keeps are mirrored into the Pending register the guest reads.
"""

from __future__ import annotations

from collections.abc import Callable

from ..irq.msi import MsiVectors
from ..irq.services import MsiSink
from . import caps
from .config import ConfigSpace
from .msix import VectorSignal


class Msi:
    """The MSI capability at ``offset`` of ``cfg``."""

    def __init__(self, cfg: ConfigSpace, offset: int, sink: MsiSink,
                 on_change: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.offset = offset
        self.on_change = on_change
        control = cfg.get16(offset + 2)
        self.capable = 1 << ((control >> caps.MSI_CTRL_MMC_SHIFT) & 7)
        self.is64 = bool(control & caps.MSI_CTRL_64BIT)
        self.maskable = bool(control & caps.MSI_CTRL_PVM)
        self.regs = caps.msi_offsets(control)
        self.length = self.regs.length
        self.delivery = MsiVectors(sink, on_pending=self._show_pending)
        self._send: Callable[[int], bool] = self.delivery.send

    # --- the registers as the guest wrote them -----------------------------------------
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

    @property
    def sent(self) -> int:
        return self.delivery.sent

    def _show_pending(self, bits: int) -> None:
        if self.regs.pending:
            self.cfg.set32(self.offset + self.regs.pending, bits)

    # --- delivery ---------------------------------------------------------------------
    def send(self, vector: int) -> bool:
        """Raise message ``vector`` (any thread). True if it was delivered now; a masked
        vector sets its pending bit instead; with MSI off or a vector beyond the
        allocation the message is dropped."""
        return self._send(vector)

    def signal_through(self, vectors: VectorSignal) -> None:
        """The peer emulates the capability (vfio-user): messages go to its eventfds."""
        self._send = vectors.send

    def refresh(self) -> None:
        """Hand the registers to delivery; what was held and is now unmasked goes out."""
        self.delivery.update(enabled=self.enabled, allocated=self.vectors,
                             address=self.address, data=self.data, mask=self.mask)

    def config_written(self, reg: int, size: int) -> None:
        """Called after every guest write into the capability."""
        if self.on_change is not None and reg < self.offset + 4 and reg + size > self.offset + 2:
            self.on_change()
        self.refresh()

    def reset(self) -> None:
        self.delivery.reset()
        self.refresh()


__all__ = ["Msi"]
