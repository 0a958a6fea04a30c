"""The MSI-X table and PBA: one implementation for emulated functions and vMSI-X on MSI.

``MsixTable`` holds the guest's entries, the function's enable and function-mask state and
the pending bits, and decides what happens to a raised vector: delivered now with the
entry's current message, or held pending while masked and delivered once on unmask, or
dropped while MSI-X is off. Where the message goes is the ``MsixDelivery`` plugged in
(``delivery.py``: inject, irqfd route; ``remap.py``: the physical device's own messages).

Rules kept from the PCI spec where acrn-dm is looser (acrn-facts §3.5): entries start
masked; a vector raised while masked sets its PBA bit; read-only fields stay (the message
address's low two bits, Vector Control bits 31:1). Table writes are 4 or 8 bytes,
aligned; reads 1, 2, 4 or 8 bytes, aligned; anything else reads all-ones and is dropped.

Thread safety: ``send`` may be called from any thread (data-plane threads signal through
it). One lock covers the table, the PBA, the enable/mask state and every delivery
decision, so a vector is never delivered while masked nor lost while pending. Deliveries
run with the lock held; a delivery must not block.
"""

from __future__ import annotations

import threading

ENTRY_SIZE = 16
VCTRL_MASK = 0x1
_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


def table_size_for(entries: int) -> int:
    return entries * ENTRY_SIZE


def pba_size_for(entries: int) -> int:
    """The PBA's bytes: one bit per vector, in whole qwords."""
    return _roundup(entries, 64) // 8


def bar_size_for(entries: int) -> int:
    """acrn-dm's MSI-X BAR size for ``entries`` vectors: the table, the PBA at the table
    rounded up to 4 KiB, the sum rounded up to a power of two (at least 4 KiB)."""
    table = _roundup(entries * ENTRY_SIZE, 4096)
    total = table + pba_size_for(entries)
    return max(4096, 1 << (total - 1).bit_length())


class MsixDelivery:
    """Where a table's messages go. The table calls these with its lock held.

    The default delivers nothing (a function whose interrupts nobody receives).
    """

    table: MsixTable | None = None

    def attach(self, table: MsixTable) -> None:
        self.table = table

    def deliver(self, vector: int, address: int, data: int) -> None:
        """Send the message of an unmasked, enabled vector now."""

    def entry_written(self, vector: int) -> None:
        """The guest wrote entry ``vector`` (address, data or its mask bit)."""

    def control_changed(self, enabled_changed: bool) -> None:
        """MSI-X enable or the function mask changed."""

    def pending(self, own: int) -> int:
        """The PBA the guest reads; ``own`` is the table's pending bits."""
        return own

    def reset(self) -> None:
        """The function was reset: drop routes, quiesce what delivery set up."""

    def close(self) -> None:
        """Release host resources (eventfds, routes)."""


class MsixTable:
    """``entries`` MSI-X vectors: table, PBA, masks and delivery."""

    def __init__(self, entries: int, delivery: MsixDelivery | None = None) -> None:
        if not 1 <= entries <= 2048:
            raise ValueError(f"MSI-X table of {entries} entries (1..2048)")
        self.entries = entries
        self.lock = threading.RLock()
        self._table = bytearray(entries * ENTRY_SIZE)
        self._messages: list[tuple[int, int]] = [(0, 0)] * entries
        self._masked = 0
        self._pba = 0
        self._enabled = False
        self._function_masked = False
        #: messages delivered (any delivery)
        self.sent = 0
        self.delivery = delivery if delivery is not None else MsixDelivery()
        self.delivery.attach(self)
        self.reset()

    # --- state (read under the lock when it must be consistent) -------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    @property
    def pba(self) -> int:
        """The table's own pending bits (what ``send`` held back)."""
        return self._pba

    def entry(self, vector: int) -> tuple[int, int, int]:
        """(address, data, vector control) of entry ``vector``."""
        address, data = self._messages[vector]
        return address, data, (self._masked >> vector) & 1

    def snapshot(self) -> bytes:
        """The table as the guest reads it."""
        with self.lock:
            return bytes(self._table)

    def masked(self, vector: int) -> bool:
        return bool(self._masked >> vector & 1)

    def deliverable(self, vector: int) -> bool:
        """A message raised now would go out (enabled, function and vector unmasked)."""
        return self._enabled and not self._function_masked and not self._masked >> vector & 1

    # --- the device side: any thread ---------------------------------------------------
    def send(self, vector: int) -> bool:
        """Raise ``vector``: True if delivered now; held in the PBA while masked; dropped
        while MSI-X is off or for a vector the table does not have."""
        with self.lock:
            if not 0 <= vector < self.entries or not self._enabled:
                return False
            if self._function_masked or self._masked >> vector & 1:
                self._hold(vector)
                return False
            self._deliver(vector)
            return True

    def _hold(self, vector: int) -> None:
        """Set the vector's PBA bit (lock held)."""
        self._pba |= 1 << vector

    def _deliver(self, vector: int) -> None:
        self._pba &= ~(1 << vector)
        self.sent += 1
        address, data = self._messages[vector]
        self.delivery.deliver(vector, address, data)

    def _flush(self) -> None:
        if not self._pba or not self._enabled or self._function_masked:
            return
        ready = self._pba & ~self._masked
        while ready:
            v = (ready & -ready).bit_length() - 1
            ready &= ready - 1
            self._deliver(v)

    # --- the guest side ------------------------------------------------------------------
    def set_control(self, enabled: bool, function_masked: bool) -> None:
        """The guest changed MSI-X enable or the function mask: held messages go out."""
        with self.lock:
            enabled_changed = enabled != self._enabled
            if not enabled_changed and function_masked == self._function_masked:
                return
            self._enabled = enabled
            self._function_masked = function_masked
            self.delivery.control_changed(enabled_changed)
            self._flush()

    def read_table(self, offset: int, size: int) -> int:
        """A guest read at ``offset`` inside the table."""
        if size not in _ONES or offset % size or not 0 <= offset <= len(self._table) - size:
            return _ONES.get(size, 0xFFFF_FFFF)
        return int.from_bytes(self._table[offset : offset + size], "little")

    def write_table(self, offset: int, size: int, value: int) -> bool:
        """A guest write at ``offset`` inside the table; False if it was dropped."""
        if size not in (4, 8) or offset % size or not 0 <= offset <= len(self._table) - size:
            return False
        vector = offset // ENTRY_SIZE
        data = (value & _ONES[size]).to_bytes(size, "little")
        with self.lock:
            was_masked = self._masked >> vector & 1
            t = self._table
            for i, b in enumerate(data):
                field = (offset + i) % ENTRY_SIZE
                if field == 0:
                    b &= 0xFC  # message address bits 1:0 are hard-wired to 0
                elif field == 12:
                    b &= VCTRL_MASK  # Vector Control: only the mask bit exists
                elif field > 12:
                    b = 0
                t[offset + i] = b
            self._load(vector)
            self.delivery.entry_written(vector)
            if was_masked and not self._masked >> vector & 1 and self._pba >> vector & 1 \
                    and self._enabled and not self._function_masked:
                self._deliver(vector)
        return True

    def read_pba(self, offset: int, size: int) -> int:
        """A guest read at ``offset`` inside the PBA (read-only)."""
        if size not in _ONES or offset % size or \
                not 0 <= offset <= pba_size_for(self.entries) - size:
            return _ONES.get(size, 0xFFFF_FFFF)
        with self.lock:
            bits = self.delivery.pending(self._pba)
        return (bits >> (8 * offset)) & _ONES[size]

    def _load(self, vector: int) -> None:
        b = vector * ENTRY_SIZE
        t = self._table
        self._messages[vector] = (int.from_bytes(t[b : b + 8], "little"),
                                  int.from_bytes(t[b + 8 : b + 12], "little"))
        if t[b + 12] & VCTRL_MASK:
            self._masked |= 1 << vector
        else:
            self._masked &= ~(1 << vector)

    # --- lifetime ------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on state: every entry zero and masked, nothing pending, MSI-X off."""
        with self.lock:
            self._table[:] = bytes(len(self._table))
            for v in range(self.entries):
                self._table[v * ENTRY_SIZE + 12] = VCTRL_MASK
            self._messages = [(0, 0)] * self.entries
            self._masked = (1 << self.entries) - 1
            self._pba = 0
            self._enabled = False
            self._function_masked = False
            self.sent = 0
            self.delivery.reset()

    def set_delivery(self, delivery: MsixDelivery) -> None:
        """Plug in where messages go (the bus does this once, when it wires the function)."""
        with self.lock:
            old = self.delivery
            self.delivery = delivery
            delivery.attach(self)
        old.close()

    def close(self) -> None:
        with self.lock:
            self.delivery.close()


class MsixBar:
    """Table and PBA inside one BAR (or a region of it): the BAR handler."""

    def __init__(self, table: MsixTable, table_offset: int, pba_offset: int) -> None:
        self.table = table
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self._table_end = table_offset + table.entries * ENTRY_SIZE
        self._pba_end = pba_offset + pba_size_for(table.entries)

    def contains(self, offset: int) -> bool:
        return (self.table_offset <= offset < self._table_end
                or self.pba_offset <= offset < self._pba_end)

    def read(self, offset: int, size: int) -> int:
        if size not in _ONES or offset % size:
            return _ONES.get(size, 0xFFFF_FFFF)
        if self.table_offset <= offset and offset + size <= self._table_end:
            return self.table.read_table(offset - self.table_offset, size)
        if self.pba_offset <= offset and offset + size <= self._pba_end:
            return self.table.read_pba(offset - self.pba_offset, size)
        return _ONES[size]

    def write(self, offset: int, size: int, value: int) -> bool:
        """False when the write was dropped (the PBA and gaps are read-only)."""
        if self.table_offset <= offset and offset + size <= self._table_end:
            return self.table.write_table(offset - self.table_offset, size, value)
        return False


def _roundup(n: int, align: int) -> int:
    return (n + align - 1) // align * align


__all__ = [
    "ENTRY_SIZE", "MsixBar", "MsixDelivery", "MsixTable", "VCTRL_MASK", "bar_size_for",
    "pba_size_for", "table_size_for",
]
