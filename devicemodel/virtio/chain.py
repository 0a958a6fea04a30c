"""A descriptor chain the split-ring walker (queue.py) has checked: its buffers' guest
addresses and lengths, readable ones first, mapped as memoryviews only when asked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class _Queue(Protocol):
    """What a chain maps its buffers with (``Virtqueue``, which imports this module)."""

    _lo_end: int
    _lo_view: memoryview | None

    def map_buffer(self, addr: int, length: int) -> memoryview: ...


class DescriptorChain:
    """One request: its head index and its buffers, every one checked to be guest RAM.

    ``addrs`` and ``lens`` are the chain's buffers (guest-physical address, length) in
    chain order, the first ``nreadable`` device-readable (driver → device), the rest
    device-writable; ``low`` says every one lies in the RAM at GPA 0 (``Virtqueue.low_ram``).
    A hot path may use the addresses directly; ``readable`` and ``writable`` map them as
    memoryviews of guest RAM on first use (views stay valid while the RAM mapping exists).
    """

    __slots__ = ("head", "addrs", "lens", "nreadable", "readable_len", "writable_len", "low",
                 "_queue", "_views")

    def __init__(self, head: int, addrs: Sequence[int], lens: Sequence[int], nreadable: int,
                 readable_len: int, writable_len: int, low: bool, queue: _Queue) -> None:
        self.head = head
        self.addrs = addrs
        self.lens = lens
        self.nreadable = nreadable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.low = low
        self._queue = queue
        self._views: list[memoryview] | None = None

    def views(self) -> list[memoryview]:
        """Every buffer as a memoryview, readable ones first."""
        v = self._views
        if v is None:
            q = self._queue
            lo_end, lo = q._lo_end, q._lo_view
            v = self._views = [
                lo[a : a + n] if a + n <= lo_end else q.map_buffer(a, n)  # type: ignore[index]
                for a, n in zip(self.addrs, self.lens, strict=True)
            ]
        return v

    @property
    def readable(self) -> list[memoryview]:
        return self.views()[: self.nreadable]

    @property
    def writable(self) -> list[memoryview]:
        return self.views()[self.nreadable :]
