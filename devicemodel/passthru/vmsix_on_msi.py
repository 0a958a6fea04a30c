"""vMSI-X on MSI: an MSI-only passthrough device shown to the guest as an MSI-X device.

Why (acrn-facts §5.1): some devices need several vectors but implement only multi-message
MSI, which a guest without a vIOMMU cannot use. Their MSI capability is replaced, at the
same offset and with the same next pointer, by a 12-byte MSI-X capability whose table
(offset 0) and PBA (offset 0x800) live in a virtual 4 KiB MEM32 BAR at an unused BAR
index. Each guest table entry k maps to physical MSI message k through interrupt
remapping (remap.py): the device is programmed once, in remappable format with the base
handle and SHV=1, with MME = MMC, and the hardware's message number selects entry
base + k. Physical mask bit k mirrors entry k's Vector Control.

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

from ..pci import caps as pcaps
from ..pci import config as pc
from ..ratelimit import RateLimitedLog
from .host import HostBar, HostMsi, HostPciDevice, MsiState, PassthroughError
from .remap import InterruptRemapper

log = logging.getLogger(__name__)

BAR_SIZE = 0x1000
TABLE_OFFSET = 0x0
PBA_OFFSET = 0x800
CAP_LEN = 12
ENTRY_SIZE = 16
VCTRL_MASK = 0x1
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
    it. The table BAR handlers are ``bar_read`` / ``bar_write``; the capability write
    hook is ``config_written``.
    """

    def __init__(self, host: HostPciDevice, msi: HostMsi, bar: int, cfg: pc.ConfigSpace,
                 remapper_factory: Callable[[int], InterruptRemapper]) -> None:
        self.host = host
        self.msi = msi
        self.bar = bar
        self.cfg = cfg
        self.offset = msi.offset
        self.entries = msi.count
        self._remapper_factory = remapper_factory
        self.remapper: InterruptRemapper | None = None
        self.table = bytearray(self.entries * ENTRY_SIZE)
        self._routed = [False] * self.entries
        self._programmed = False
        self._rl = RateLimitedLog(log)
        #: the device as found, to put back at teardown
        self._found: MsiState = msi.save()
        self._found_intx_disable = bool(host.config_read(pc.COMMAND, 2) & pc.CMD_INTX_DISABLE)
        self._install_capability()
        #: Message Control as last seen, to tell which bits a guest write changed
        self._control = self.control
        self._reset_table()
        self._sync_masks()

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

    def config_written(self, reg: int, size: int) -> None:
        """After a guest write that touched the capability (the masks already applied)."""
        new = self.control
        changed = new ^ self._control
        self._control = new
        if changed & pcaps.MSIX_CTRL_ENABLE:
            if new & pcaps.MSIX_CTRL_ENABLE:
                self._physical_enable()
            else:
                self._physical_disable()
        if changed:
            self._sync_masks()

    def _physical_enable(self) -> None:
        # every physical vector is masked while MSI-X is off, so nothing escapes here
        self.host.set_intx_disable(True)
        self.msi.enable(self.msi.mmc)

    def _physical_disable(self) -> None:
        self.msi.disable()
        self.host.set_intx_disable(bool(self.cfg.command & pc.CMD_INTX_DISABLE))

    def guest_intx_disable(self, disabled: bool) -> None:
        """The guest wrote INTx Disable; while we run MSI the physical bit stays set."""
        if not self.enabled:
            self.host.set_intx_disable(disabled)

    # --- the table and PBA (BAR handlers; offsets inside the 4 KiB BAR) ------------------
    def bar_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset % size or not 0 <= offset <= BAR_SIZE - size:
            return _ONES.get(size, 0xFFFF_FFFF)
        end = offset + size
        if end <= len(self.table):
            return int.from_bytes(self.table[offset:end], "little")
        pba_len = (self.entries + 63) // 64 * 8
        if offset >= PBA_OFFSET and end <= PBA_OFFSET + pba_len:
            return (self.pending() >> (8 * (offset - PBA_OFFSET))) & _ONES[size]
        return _ONES[size]

    def pending(self) -> int:
        """The PBA: messages the device holds because their vector is masked."""
        return self.msi.pending & ((1 << self.entries) - 1)

    def bar_write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size or offset + size > len(self.table):
            if not 0 <= offset < BAR_SIZE:
                return
            log.debug("%s: vMSI-X write of %d bytes at %#x ignored", self.host.name,
                           size, offset)
            return  # the PBA and the gaps are read-only
        data = (value & _ONES[size]).to_bytes(size, "little")
        for i, b in enumerate(data):
            field = (offset + i) % ENTRY_SIZE
            if field == 0:
                b &= 0xFC  # message address bits 1:0 are hard-wired to 0
            elif field == 12:
                b &= VCTRL_MASK  # Vector Control: only the mask bit exists
            elif field > 12:
                b = 0
            self.table[offset + i] = b
        self._update_entry(offset // ENTRY_SIZE)

    def entry(self, k: int) -> tuple[int, int, bool]:
        """Guest entry k: (address, data, masked)."""
        b = k * ENTRY_SIZE
        t = self.table
        return (int.from_bytes(t[b : b + 8], "little"), int.from_bytes(t[b + 8 : b + 12],
                                                                          "little"),
                bool(t[b + 12] & VCTRL_MASK))

    def _update_entry(self, k: int) -> None:
        """acrn-facts §5.5 remap_one_vmsix_entry_on_msi: mask physical k, route entry k if
        the guest unmasked it, program the physical message once, then let the physical
        mask follow the guest's."""
        self.msi.set_mask(self.msi.mask | 1 << k)
        address, data, masked = self.entry(k)
        if not masked:
            remapper = self._get_remapper()
            ok = remapper is not None and remapper.route(k, address, data)
            self._routed[k] = ok
            if ok and not self._programmed:
                assert remapper is not None
                phys = remapper.physical_message()
                if phys is not None:
                    self.msi.program(*phys)
                self._programmed = True
        self._sync_masks()

    def _get_remapper(self) -> InterruptRemapper | None:
        if self.remapper is None:
            try:
                self.remapper = self._remapper_factory(self.entries)
            except Exception as e:  # a guest write must not fail: the vectors stay masked
                self._rl.warning("passthru %s: no interrupt remapping: %s", self.host.name, e)
                return None
        return self.remapper

    def _sync_masks(self) -> None:
        """Physical mask = every vector the guest may not receive right now."""
        allow = 0
        if self.enabled and not self.function_masked and self._programmed:
            for k in range(self.entries):
                if self._routed[k] and not self.table[k * ENTRY_SIZE + 12] & VCTRL_MASK:
                    allow |= 1 << k
        want = ((1 << self.entries) - 1) & ~allow
        if self.msi.mask != want:
            self.msi.set_mask(want)

    # --- lifecycle ----------------------------------------------------------------------
    def _reset_table(self) -> None:
        self.table[:] = bytes(len(self.table))
        for k in range(self.entries):
            self.table[k * ENTRY_SIZE + 12] = VCTRL_MASK  # PCI reset value: masked
        self._routed = [False] * self.entries

    def reset(self) -> None:
        """VM reset: the guest view goes back to power-on, the device to masked/off."""
        self.msi.set_mask((1 << self.entries) - 1)
        self.msi.disable()
        if self.remapper is not None:
            for k in range(self.entries):
                self.remapper.unroute(k)
        self._programmed = False
        self._control = self.control
        self._reset_table()
        self._sync_masks()

    def close(self) -> None:
        """Teardown: mask and disable, drop the routes, put the device back as found."""
        try:
            self.msi.set_mask((1 << self.entries) - 1)
            self.msi.disable()
            self.msi.restore(self._found)
            self.host.set_intx_disable(self._found_intx_disable)
        finally:
            if self.remapper is not None:
                self.remapper.close()
                self.remapper = None
            self._programmed = False


__all__ = [
    "BAR_SIZE", "CAP_LEN", "PBA_OFFSET", "TABLE_OFFSET", "VmsixOnMsi", "check_eligible",
    "msix_cap_bytes", "unused_bars",
]
