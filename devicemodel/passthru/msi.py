"""Plain MSI of a passthrough device, virtualized (sim and KVM backends).

The guest programs the MSI capability with guest interrupt addresses, which mean nothing
to the host. So the guest's capability is a copy the guest writes freely (within the
spec's writable bits), and the device is programmed with what the interrupt remapper
gives (the backend's, through ``irq.remap.RemapRoutes``, as vMSI-X on MSI uses it): with
MME messages enabled, physical message k is routed to the guest's address and the guest's
data with k in its low MME bits (``irq.msi.message_data``), exactly what the device itself
would have sent had the guest's values reached it. Mask bits go through; the pending bits
the guest reads are the device's.

Unlike ACRN's vMSI, Multiple Message Capable is not hidden: remapping makes every message
independent, so a guest that can use several messages gets them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..hsm.base import InterruptRemapper
from ..irq.msi import message_data
from ..irq.remap import RemapRoutes
from ..pci import caps as pcaps
from ..pci import config as pc
from .host import HostMsi, HostPciDevice, MsiState

log = logging.getLogger(__name__)


class PtMsi:
    """The guest's MSI capability of a passthrough device, backed by the physical one."""

    def __init__(self, host: HostPciDevice, msi: HostMsi, cfg: pc.ConfigSpace,
                 remapper_factory: Callable[[int], InterruptRemapper]) -> None:
        self.host = host
        self.msi = msi
        self.cfg = cfg
        self.offset = msi.offset
        self.routes = RemapRoutes(host.name, msi.count, remapper_factory)
        msi.bind(self.routes)
        self._found: MsiState = msi.save()
        self._found_intx_disable = bool(host.config_read(pc.COMMAND, 2) & pc.CMD_INTX_DISABLE)
        self._install()

    @property
    def remapper(self) -> InterruptRemapper | None:
        return self.routes.remapper

    def _install(self) -> None:
        off, regs = self.offset, self.msi.regs
        ctrl = self.cfg.get16(off + 2) & ~(pcaps.MSI_CTRL_MME_MASK | pcaps.MSI_CTRL_ENABLE)
        self.cfg.set16(off + 2, ctrl)
        self.cfg.set_bytes(off + 4, bytes(regs.length - 4))
        self.cfg.set_wmask(off, regs.length, 0)
        self.cfg.set_wmask(off + 2, 2, pcaps.MSI_CTRL_MME_MASK | pcaps.MSI_CTRL_ENABLE)
        self.cfg.set_wmask(off + 4, 4, 0xFFFF_FFFC)
        if regs.addr_hi is not None:
            self.cfg.set_wmask(off + regs.addr_hi, 4, 0xFFFF_FFFF)
        self.cfg.set_wmask(off + regs.data, 2, 0xFFFF)
        if regs.mask is not None:
            self.cfg.set_wmask(off + regs.mask, 4, (1 << self.msi.count) - 1)

    # --- the guest's registers ------------------------------------------------------------
    def _guest(self) -> tuple[bool, int, int, int, int]:
        off, regs = self.offset, self.msi.regs
        ctrl = self.cfg.get16(off + 2)
        mme = min((ctrl & pcaps.MSI_CTRL_MME_MASK) >> pcaps.MSI_CTRL_MME_SHIFT, self.msi.mmc)
        address = self.cfg.get32(off + 4)
        if regs.addr_hi is not None:
            address |= self.cfg.get32(off + regs.addr_hi) << 32
        data = self.cfg.get16(off + regs.data)
        mask = self.cfg.get32(off + regs.mask) if regs.mask is not None else 0
        return bool(ctrl & pcaps.MSI_CTRL_ENABLE), mme, address, data, mask

    def config_read(self, reg: int, size: int) -> None:
        """Before a guest read: the pending bits are the device's."""
        regs = self.msi.regs
        if regs.pending is not None:
            self.cfg.set32(self.offset + regs.pending, self.msi.pending)

    def config_written(self, reg: int, size: int) -> None:
        enabled, mme, address, data, mask = self._guest()
        ours = not self.msi.kernel_owned  # INTx Disable is the kernel's under VFIO
        if not enabled:
            if self.msi.enabled:
                self.msi.set_mask((1 << self.msi.count) - 1)
                self.msi.disable()
                if ours:
                    self.host.set_intx_disable(bool(self.cfg.command & pc.CMD_INTX_DISABLE))
            self.routes.unroute_all()
            return
        n = 1 << mme
        if self.routes.get_remapper() is None:
            return  # a guest write must not fail: MSI stays off (logged)
        for k in range(self.msi.count):
            if k < n:
                self.routes.route(k, address, message_data(data, n, k))
            else:
                self.routes.unroute(k)
        self.routes.program_once(self.msi.program)
        self.msi.set_mask(mask)
        ctrl = self.msi.control
        cur_mme = (ctrl & pcaps.MSI_CTRL_MME_MASK) >> pcaps.MSI_CTRL_MME_SHIFT
        if not ctrl & pcaps.MSI_CTRL_ENABLE or cur_mme != mme:
            if ours:
                self.host.set_intx_disable(True)
            self.msi.enable(mme)

    def guest_intx_disable(self, disabled: bool) -> None:
        if not self.msi.enabled and not self.msi.kernel_owned:
            self.host.set_intx_disable(disabled)

    # --- lifecycle ------------------------------------------------------------------------
    def reset(self) -> None:
        self.msi.set_mask((1 << self.msi.count) - 1)
        self.msi.disable()
        self.routes.reset()

    def close(self) -> None:
        try:
            self.msi.set_mask((1 << self.msi.count) - 1)
            self.msi.disable()
            self.msi.restore(self._found)
            if not self.msi.kernel_owned:
                self.host.set_intx_disable(self._found_intx_disable)
        finally:
            self.routes.unroute_all()
            self.routes.close()


__all__ = ["PtMsi"]
