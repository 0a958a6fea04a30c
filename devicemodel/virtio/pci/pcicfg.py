"""VIRTIO_PCI_CAP_PCI_CFG (virtio 1.2 §4.1.4.9): BAR access through a config-space window.

The driver writes bar, offset and length into the capability, then reads or writes its
data field; we forward that to the BAR's handler. A bad BAR index, a length other than 1,
2 or 4, a misaligned or out-of-BAR offset: nothing happens.
"""

from __future__ import annotations

from ...pci.device import Bar, PciDevice
from .layout import ONES

# virtio_pci_cfg_cap field offsets inside the capability
PCICFG_BAR = 4
PCICFG_OFFSET = 8
PCICFG_LENGTH = 12
PCICFG_DATA = 16


class PciCfgWindow:
    """The window of the capability at ``cap`` of ``fn``; watches its data field."""

    def __init__(self, fn: PciDevice, cap: int) -> None:
        self.fn = fn
        self.cap = cap
        fn.watch_config(cap + PCICFG_DATA, 4, on_read=self.data_read,
                        on_write=self.data_written)

    def _target(self) -> tuple[Bar, int, int] | None:
        cfg = self.fn.cfg
        index = cfg.get8(self.cap + PCICFG_BAR)
        bar = self.fn.bar(index) if index <= 5 else None
        offset = cfg.get32(self.cap + PCICFG_OFFSET)
        length = cfg.get32(self.cap + PCICFG_LENGTH)
        if bar is None or length not in (1, 2, 4) or offset % length \
                or offset + length > bar.size:
            return None
        return bar, offset, length

    def data_read(self, reg: int, size: int) -> None:
        """Before the guest reads the data field: fill it from the BAR."""
        target = self._target()
        if target is None:
            return
        bar, offset, length = target
        self.fn.cfg.set32(self.cap + PCICFG_DATA, bar.read(offset, length))

    def data_written(self, reg: int, size: int) -> None:
        """After the guest wrote the data field: pass it to the BAR."""
        target = self._target()
        if target is None:
            return
        bar, offset, length = target
        bar.write(offset, length, self.fn.cfg.get32(self.cap + PCICFG_DATA) & ONES[length])


__all__ = ["PciCfgWindow"]
