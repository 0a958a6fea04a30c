"""MSI-X for emulated functions: table and PBA in a BAR, masking and pending done right.

acrn-dm's layout (acrn-facts §3.5): table at offset 0 of the BAR, PBA at the table size
rounded up to 4 KiB, BAR size the sum rounded up to a power of two (at least 4 KiB).
Entries start masked. Where acrn-dm drops a message raised while its vector or the whole
function is masked, we set the PBA bit and deliver it when the mask goes away, as the
PCI spec asks. Read-only fields are enforced: Vector Control has only bit 0, the message
address its low two bits hard-wired to 0.

Table accesses: writes of 4 or 8 bytes, aligned; reads of 1, 2, 4 or 8 bytes, aligned.
Anything else reads all-ones and is dropped. The BAR handler receives 8-byte guest
accesses as two 4-byte calls (acrn-dm's split), so both halves arrive in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from . import caps
from .config import ConfigSpace

ENTRY_SIZE = 16
VCTRL_MASK = 0x1
_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class MsiSink(Protocol):
    def inject_msi(self, address: int, data: int) -> None: ...


def bar_size_for(entries: int) -> int:
    """acrn-dm's MSI-X BAR size for ``entries`` vectors (table + PBA, power of two)."""
    table = _roundup(entries * ENTRY_SIZE, 4096)
    total = table + pba_size_for(entries)
    return max(4096, 1 << (total - 1).bit_length())


def pba_size_for(entries: int) -> int:
    return _roundup(entries, 64) // 8


class Msix:
    """The MSI-X capability at ``offset`` of ``cfg`` and its table/PBA storage."""

    def __init__(self, cfg: ConfigSpace, offset: int, sink: MsiSink, *,
                 msi_enabled: Callable[[], bool] = lambda: False,
                 on_change: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.offset = offset
        self.sink = sink
        self.msi_enabled = msi_enabled
        self.on_change = on_change
        control = cfg.get16(offset + 2)
        table = cfg.get32(offset + 4)
        pba = cfg.get32(offset + 8)
        self.entries = (control & caps.MSIX_CTRL_SIZE_MASK) + 1
        self.table_bar = table & caps.MSIX_BIR_MASK
        self.table_offset = table & ~caps.MSIX_BIR_MASK
        self.pba_bar = pba & caps.MSIX_BIR_MASK
        self.pba_offset = pba & ~caps.MSIX_BIR_MASK
        self.pba_size = pba_size_for(self.entries)
        self.table = bytearray(self.entries * ENTRY_SIZE)
        self.pba = 0
        self.sent = 0
        self.reset()

    # --- state ------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.cfg.get16(self.offset + 2)

    @property
    def enabled(self) -> bool:
        """Enabled, and MSI off (acrn-dm: MSI wins when a guest turns both on)."""
        return bool(self.control & caps.MSIX_CTRL_ENABLE) and not self.msi_enabled()

    @property
    def function_masked(self) -> bool:
        return bool(self.control & caps.MSIX_CTRL_FMASK)

    def entry(self, i: int) -> tuple[int, int, int]:
        """(address, data, vector control) of entry ``i``."""
        b = i * ENTRY_SIZE
        t = self.table
        return (int.from_bytes(t[b : b + 8], "little"), int.from_bytes(t[b + 8 : b + 12], "little"),
                int.from_bytes(t[b + 12 : b + 16], "little"))

    def masked(self, i: int) -> bool:
        return bool(self.table[i * ENTRY_SIZE + 12] & VCTRL_MASK)

    def reset(self) -> None:
        self.table[:] = bytes(len(self.table))
        for i in range(self.entries):
            self.table[i * ENTRY_SIZE + 12] = VCTRL_MASK
        self.pba = 0
        self.sent = 0

    # --- delivery ---------------------------------------------------------------------
    def send(self, vector: int) -> bool:
        """Raise ``vector``: delivered now (True), held in the PBA while masked, or
        dropped while MSI-X is off."""
        if not 0 <= vector < self.entries or not self.enabled:
            return False
        if self.function_masked or self.masked(vector):
            self.pba |= 1 << vector
            return False
        self._deliver(vector)
        return True

    def _deliver(self, vector: int) -> None:
        addr, data, _ = self.entry(vector)
        self.pba &= ~(1 << vector)
        self.sent += 1
        self.sink.inject_msi(addr, data)

    def _flush(self) -> None:
        if not self.pba or not self.enabled or self.function_masked:
            return
        pending = self.pba
        while pending:
            v = (pending & -pending).bit_length() - 1
            pending &= pending - 1
            if not self.masked(v):
                self._deliver(v)

    def config_written(self, reg: int, size: int) -> None:
        """After a guest write into the capability (enable / function mask may change)."""
        if self.on_change is not None:
            self.on_change()
        self._flush()

    # --- BAR accesses (offsets relative to the BAR) -----------------------------------
    def contains(self, offset: int) -> bool:
        return self._in_table(offset) or self._in_pba(offset)

    def _in_table(self, offset: int) -> bool:
        return self.table_offset <= offset < self.table_offset + len(self.table)

    def _in_pba(self, offset: int) -> bool:
        return self.pba_offset <= offset < self.pba_offset + self.pba_size

    def read(self, offset: int, size: int) -> int:
        if size not in _ONES or offset % size:
            return _ONES.get(size, 0xFFFF_FFFF)
        if self._in_table(offset) and self._in_table(offset + size - 1):
            o = offset - self.table_offset
            return int.from_bytes(self.table[o : o + size], "little")
        if self._in_pba(offset) and self._in_pba(offset + size - 1):
            shift = (offset - self.pba_offset) * 8
            return (self.pba >> shift) & _ONES[size]
        return _ONES[size]

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size or not self._in_table(offset):
            return  # PBA and gaps are read-only
        if not self._in_table(offset + size - 1):
            return
        o = offset - self.table_offset
        entry = o // ENTRY_SIZE
        was_masked = self.masked(entry)
        data = (value & _ONES[size]).to_bytes(size, "little")
        for i, b in enumerate(data):
            field = (o + i) % ENTRY_SIZE
            if field == 0:
                b &= 0xFC  # address bits 1:0
            elif field == 12:
                b &= VCTRL_MASK
            elif field > 12:
                b = 0
            self.table[o + i] = b
        unmasked = was_masked and not self.masked(entry)
        if unmasked and self.pba & (1 << entry) and self.enabled and not self.function_masked:
            self._deliver(entry)


def _roundup(n: int, align: int) -> int:
    return (n + align - 1) // align * align
