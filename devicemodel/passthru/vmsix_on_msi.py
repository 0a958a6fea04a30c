"""vMSI-X on MSI: an MSI-only passthrough device shown to the guest as an MSI-X device.

Why (acrn-facts §5.1): some devices need several vectors but implement only multi-message
MSI, which a guest without a vIOMMU cannot use. Their MSI capability is replaced, at the
same offset and with the same next pointer, by a 12-byte MSI-X capability whose table
(offset 0) and PBA (offset 0x800) live in a virtual 4 KiB MEM32 BAR at an unused BAR
index. Each guest table entry k maps to physical MSI message k through interrupt
remapping (``irq/remap.py``, the backend's remapper): the device is programmed once, in
remappable format with the base handle and SHV=1, with MME = MMC, and the hardware's
message number selects entry base + k. Physical mask bit k mirrors entry k's Vector Control.

What we do better than ACRN (§5.7): entries start masked; only Message Control bits 15:14
(enable, function mask) are writable and the rest of the capability is read-only, the
hidden MSI bytes after it read 0; function mask masks every physical vector and function
unmask restores each entry's own state; the PBA shows the physical pending bits (the
messages the device holds while masked); teardown puts the MSI capability and the INTx
disable bit back as they were found.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..hsm.base import InterruptRemapper
from ..irq.msix import MsixBar, MsixTable
from ..irq.remap import RemapDelivery, RemapRoutes
from ..pci import caps as pcaps
from ..pci import config as pc
from .host import HostBar, HostMsi, HostPciDevice, MsiState, PassthroughError

log = logging.getLogger(__name__)

BAR_SIZE = 0x1000
TABLE_OFFSET = 0x0
PBA_OFFSET = 0x800
CAP_LEN = 12
#: the only guest-writable Message Control bits: MSI-X Enable and Function Mask
CTRL_WRITABLE = pcaps.MSIX_CTRL_ENABLE | pcaps.MSIX_CTRL_FMASK

_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


def unused_bars(bars: list[HostBar]) -> list[int]:
    """BAR indexes the device does not implement (upper halves of 64-bit BARs are used)."""
    used = {i for b in bars for i in b.slots}
    return [i for i in range(6) if i not in used]


def check_eligible(host: HostPciDevice, bar: int | None = None) -> tuple[HostMsi, int]:
    """The device's MSI capability and the BAR index for the table, or a PassthroughError
    that says which condition failed and why it matters."""
    who = f"passthru {host.name}: vmsix_on_msi"
    caps = host.capabilities()
    ids = {c.cap_id for c in caps}
    if pcaps.CAP_ID_MSI not in ids:
        raise PassthroughError(
            f"{who} needs an MSI capability to stand in for, and the device has none"
        )
    if pcaps.CAP_ID_MSIX in ids:
        raise PassthroughError(
            f"{who} is for MSI-only devices; this one has MSI-X, pass it through without "
            "vmsix_on_msi"
        )
    msi = host.msi
    assert msi is not None
    if not msi.maskable:
        raise PassthroughError(
            f"{who} needs MSI per-vector masking (Message Control bit 8), because each "
            "MSI-X entry's mask bit is carried by a physical mask bit; the device has none"
        )
    if msi.count < 2:
        raise PassthroughError(
            f"{who} needs a device with more than one MSI message (MMC > 0); this one has "
            "a single message, which plain MSI already gives the guest"
        )
    free = unused_bars(host.bars())
    if bar is None:
        if not free:
            raise PassthroughError(
                f"{who} needs an unused BAR index for the MSI-X table, and all six are "
                "implemented by the device"
            )
        bar = free[0]
    elif not 0 <= bar <= 5:
        raise PassthroughError(f"{who},{bar}: the BAR index must be 0..5")
    elif bar not in free:
        hint = f"unused: {', '.join(map(str, free))}" if free else "none is unused"
        raise PassthroughError(
            f"{who},{bar}: BAR {bar} is implemented by the device; choose an unused one "
            f"({hint})"
        )
    return msi, bar


def msix_cap_bytes(next_ptr: int, entries: int, bar: int) -> bytes:
    """The 12 bytes: ID 0x11, the MSI capability's next pointer, table size N-1,
    table at offset 0 and PBA at 0x800 of BAR ``bar``."""
    return pcaps.MsixCap.build(dict(cap_id=pcaps.CAP_ID_MSIX, next=next_ptr,
                                    control=entries - 1, table=TABLE_OFFSET | bar,
                                    pba=PBA_OFFSET | bar))


class VmsixOnMsi:
    """The emulation for one device (device-model mode: sim and KVM backends).

    ``cfg`` is the guest's view of config space (the passthrough device's ConfigSpace);
    ``remapper_factory(count)`` gives the interrupt remapper once the guest first needs
    it. The table is the interrupt layer's (``irq.msix.MsixTable``) with the physical
    remap delivery (``irq.remap.RemapDelivery``); the BAR handlers are ``bar_read`` /
    ``bar_write``, the capability write hook is ``config_written``.
    """

    def __init__(self, host: HostPciDevice, msi: HostMsi, bar: int, cfg: pc.ConfigSpace,
                 remapper_factory: Callable[[int], InterruptRemapper]) -> None:
        self.host = host
        self.msi = msi
        self.bar = bar
        self.cfg = cfg
        self.offset = msi.offset
        self.entries = msi.count
        #: the device as found, to put back at teardown
        self._found: MsiState = msi.save()
        self._found_intx_disable = bool(host.config_read(pc.COMMAND, 2) & pc.CMD_INTX_DISABLE)
        self._install_capability()
        self.routes = RemapRoutes(host.name, self.entries, remapper_factory)
        msi.bind(self.routes)
        self.table = MsixTable(self.entries,
                               RemapDelivery(msi, self.routes, self._enable_changed))
        self._bar = MsixBar(self.table, TABLE_OFFSET, PBA_OFFSET)

    # --- the virtual capability ---------------------------------------------------------
    def _install_capability(self) -> None:
        off = self.offset
        next_ptr = self.cfg.get8(off + 1)
        length = self.msi.regs.length
        self.cfg.set_bytes(off, bytes(length))  # the hidden MSI registers read 0
        self.cfg.set_bytes(off, msix_cap_bytes(next_ptr, self.entries, self.bar))
        self.cfg.set_wmask(off, length, 0)
        self.cfg.set_w1c(off, length, 0)
        self.cfg.set_wmask(off + 2, 2, CTRL_WRITABLE)

    @property
    def control(self) -> int:
        return self.cfg.get16(self.offset + 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & pcaps.MSIX_CTRL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & pcaps.MSIX_CTRL_FMASK)

    @property
    def remapper(self) -> InterruptRemapper | None:
        return self.routes.remapper

    def config_written(self, reg: int, size: int) -> None:
        """After a guest write that touched the capability (the masks already applied)."""
        self.table.set_control(self.enabled, self.function_masked)

    def _enable_changed(self, enabled: bool) -> None:
        # INTx Disable goes with MSI: ours to write unless the kernel owns the MSI (VFIO)
        ours = not self.msi.kernel_owned
        if enabled:
            # every physical vector is masked while MSI-X is off, so nothing escapes here
            if ours:
                self.host.set_intx_disable(True)
            self.msi.enable(self.msi.mmc)
        else:
            self.msi.disable()
            if ours:
                self.host.set_intx_disable(bool(self.cfg.command & pc.CMD_INTX_DISABLE))

    def guest_intx_disable(self, disabled: bool) -> None:
        """The guest wrote INTx Disable; while we run MSI the physical bit stays set."""
        if not self.enabled and not self.msi.kernel_owned:
            self.host.set_intx_disable(disabled)

    # --- the table and PBA (BAR handlers; offsets inside the 4 KiB BAR) ------------------
    def bar_read(self, offset: int, size: int) -> int:
        if not 0 <= offset <= BAR_SIZE - size:
            return _ONES.get(size, 0xFFFF_FFFF)
        return self._bar.read(offset, size)

    def bar_write(self, offset: int, size: int, value: int) -> None:
        if not self._bar.write(offset, size, value) and 0 <= offset < BAR_SIZE:
            log.debug("%s: vMSI-X write of %d bytes at %#x ignored", self.host.name, size,
                      offset)  # the PBA and the gaps are read-only

    def pending(self) -> int:
        """The PBA: messages the device holds because their vector is masked."""
        return self.msi.pending & ((1 << self.entries) - 1)

    def entry(self, k: int) -> tuple[int, int, bool]:
        """Guest entry k: (address, data, masked)."""
        address, data, vctrl = self.table.entry(k)
        return address, data, bool(vctrl)

    # --- lifecycle ----------------------------------------------------------------------
    def reset(self) -> None:
        """VM reset: the guest view goes back to power-on, the device to masked/off."""
        self.msi.set_mask((1 << self.entries) - 1)
        self.msi.disable()
        self.table.reset()

    def close(self) -> None:
        """Teardown: mask and disable, drop the routes, put the device back as found."""
        try:
            self.msi.set_mask((1 << self.entries) - 1)
            self.msi.disable()
            self.msi.restore(self._found)
            if not self.msi.kernel_owned:
                self.host.set_intx_disable(self._found_intx_disable)
        finally:
            self.routes.close()


__all__ = [
    "BAR_SIZE", "CAP_LEN", "PBA_OFFSET", "TABLE_OFFSET", "VmsixOnMsi", "check_eligible",
    "msix_cap_bytes", "unused_bars",
]
