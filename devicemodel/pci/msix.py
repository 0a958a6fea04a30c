"""The MSI-X capability of an emulated function: its registers in config space, its table
and PBA (``irq.msix.MsixTable``) in a BAR.

acrn-dm's layout (acrn-facts §3.5): table at offset 0 of the BAR, PBA at the table size
rounded up to 4 KiB, BAR size the sum rounded up to a power of two (at least 4 KiB).
MSI-X counts as enabled while its Enable bit is set and MSI is off (acrn-dm: MSI wins
when a guest turns both on). The BAR handler receives 8-byte guest accesses as two 4-byte
calls (acrn-dm's split), so both halves arrive in order.

Where messages go is the table's delivery: injected by default; the bus plugs in irqfd
routes for a function that declared ``irqfd=True`` when the backend has eventfds; a
vfio-user server hands the vectors to the client's eventfds (``signal_through``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..irq.msix import MsixBar, MsixDelivery, MsixTable, bar_size_for, pba_size_for
from . import caps
from .config import ConfigSpace


class VectorSignal(Protocol):
    def send(self, vector: int) -> bool: ...


class Msix:
    """The MSI-X capability at ``offset`` of ``cfg`` and the table it describes."""

    def __init__(self, cfg: ConfigSpace, offset: int, delivery: MsixDelivery | None = None,
                 *, msi_enabled: Callable[[], bool] = lambda: False,
                 on_change: Callable[[], None] | None = None, irqfd: bool = False) -> None:
        self.cfg = cfg
        self.offset = offset
        self.msi_enabled = msi_enabled
        self.on_change = on_change
        #: the function asks for irqfd-backed vectors (the bus wires them if it can)
        self.wants_irqfd = irqfd
        control = cfg.get16(offset + 2)
        table = cfg.get32(offset + 4)
        pba = cfg.get32(offset + 8)
        self.entries = (control & caps.MSIX_CTRL_SIZE_MASK) + 1
        self.table_bar = table & caps.MSIX_BIR_MASK
        self.table_offset = table & ~caps.MSIX_BIR_MASK
        self.pba_bar = pba & caps.MSIX_BIR_MASK
        self.pba_offset = pba & ~caps.MSIX_BIR_MASK
        self.pba_size = pba_size_for(self.entries)
        self.table = MsixTable(self.entries, delivery)
        self.bar_handler = MsixBar(self.table, self.table_offset, self.pba_offset)
        self._send: Callable[[int], bool] = self.table.send

    # --- state ------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.cfg.get16(self.offset + 2)

    @property
    def enabled(self) -> bool:
        return self.table.enabled

    @property
    def function_masked(self) -> bool:
        return self.table.function_masked

    @property
    def pba(self) -> int:
        return self.table.pba

    @property
    def delivery(self) -> MsixDelivery:
        return self.table.delivery

    def entry(self, i: int) -> tuple[int, int, int]:
        """(address, data, vector control) of entry ``i``."""
        return self.table.entry(i)

    def masked(self, i: int) -> bool:
        return self.table.masked(i)

    # --- delivery ---------------------------------------------------------------------
    def send(self, vector: int) -> bool:
        """Raise ``vector`` (any thread): delivered now (True), held in the PBA while
        masked, or dropped while MSI-X is off."""
        return self._send(vector)

    def signal_through(self, vectors: VectorSignal) -> None:
        """The peer emulates the table (vfio-user): vectors go to its eventfds instead."""
        self._send = vectors.send

    def refresh(self) -> None:
        """Take the capability's Enable and Function Mask bits (after a guest write, a
        change of MSI enable, or a reset of config space)."""
        control = self.control
        self.table.set_control(bool(control & caps.MSIX_CTRL_ENABLE) and not self.msi_enabled(),
                               bool(control & caps.MSIX_CTRL_FMASK))

    def config_written(self, reg: int, size: int) -> None:
        """After a guest write into the capability (enable / function mask may change)."""
        if self.on_change is not None:
            self.on_change()
        self.refresh()

    def reset(self) -> None:
        self.table.reset()
        self.refresh()

    def close(self) -> None:
        self.table.close()

    # --- BAR accesses (offsets relative to the BAR) -----------------------------------
    def contains(self, offset: int) -> bool:
        return self.bar_handler.contains(offset)

    def read(self, offset: int, size: int) -> int:
        return self.bar_handler.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.bar_handler.write(offset, size, value)


__all__ = ["Msix", "bar_size_for", "pba_size_for"]
