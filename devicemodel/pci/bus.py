"""The PCI bus: 256 buses × 32 slots × 8 functions, answering PCICFG requests.

Minimal version: the PCI issue adds ECAM, BAR allocation and registration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import ConfigError, SlotConfig
from .device import PciDevice

if TYPE_CHECKING:
    from ..context import VmContext

_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


class PciBus:
    def __init__(self, ctx: VmContext) -> None:
        self.ctx = ctx
        self._functions: dict[tuple[int, int, int], PciDevice] = {}

    def add(self, slot: SlotConfig, device: PciDevice) -> None:
        key = (slot.bus, slot.dev, slot.func)
        if key in self._functions:
            raise ConfigError(f"-s {slot.slot_text}: slot already in use")
        self._functions[key] = device

    def get(self, bus: int, dev: int, func: int) -> PciDevice | None:
        return self._functions.get((bus, dev, func))

    def functions(self) -> list[tuple[tuple[int, int, int], PciDevice]]:
        return sorted(self._functions.items())

    def cfg_read(self, bus: int, dev: int, func: int, reg: int, size: int) -> int:
        fn = self._functions.get((bus, dev, func))
        if fn is None or size not in _MASK or reg & (size - 1):
            return 0xFFFF_FFFF
        return fn.cfg_read(reg, size)

    def cfg_write(self, bus: int, dev: int, func: int, reg: int, size: int, value: int) -> None:
        fn = self._functions.get((bus, dev, func))
        if fn is None or size not in _MASK or reg & (size - 1):
            return
        fn.cfg_write(reg, size, value)
