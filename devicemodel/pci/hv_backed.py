"""A PCI function the hypervisor emulates: the device model reserves its slot and BAR
addresses, then asks the hypervisor for it with CREATE_VDEV (and DESTROY_VDEV when the
VM goes), as acrn-dm's uart.c (``uart,vuart_idx:K``) and ivshmem.c (``ivshmem,hv:/...``)
do.

From then on the hypervisor answers the guest's config cycles and BAR accesses for the
slot; the device model sees none of them (its BARs are never registered). Outside a VM
(``acrn-pydm lspci``) this object answers config reads with what the hypervisor will show
(hsm/hv_vdevs.py), so the dump is the guest's view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..hsm.base import HypervisorError, VdevSpec
from ..hsm.hv_vdevs import HvVdevView, view_for
from . import config as pc
from .device import BarKind, PciDevice

if TYPE_CHECKING:
    from ..context import DeviceContext
    from ..slot import SlotConfig

log = logging.getLogger(__name__)

#: builds the CREATE_VDEV arguments from the BAR register values the bus gave
SpecBuilder = Callable[[int, list[int]], VdevSpec]


class HvBackedDevice(PciDevice):
    """The device model's side of a hypervisor-emulated function."""

    def __init__(self, ctx: DeviceContext, slot: SlotConfig, name: str,
                 bars: list[tuple[int, BarKind, int]], build_spec: SpecBuilder) -> None:
        super().__init__(ctx, slot)
        self.name = name
        if ctx.hypervisor is None:
            raise ConfigError(f"-s {slot.slot_text},{slot.emul}: the hypervisor emulates this "
                              "device; it needs a VM")
        self.hypervisor = ctx.hypervisor
        for idx, kind, size in bars:
            self.add_bar(idx, kind, size, trap=False)
        self._build_spec = build_spec
        self.spec: VdevSpec | None = None
        self.view: HvVdevView | None = None

    def power_on_snapshot(self) -> None:
        """The BARs have their guest addresses now: ask the hypervisor (once)."""
        super().power_on_snapshot()
        if self.spec is not None:
            return
        assert self.bdf is not None
        b, d, f = self.bdf
        regs = [self.cfg.get32(pc.BAR0 + 4 * i) for i in range(6)]
        spec = self._build_spec(b << 8 | d << 3 | f, regs)
        try:
            self.hypervisor.create_vdev(spec)
        except HypervisorError as e:
            raise HypervisorError(f"-s {self.slot_text},{self.name}: {e}", e.errno) from e
        self.spec = spec
        self.view = view_for(spec)

    @property
    def slot_text(self) -> str:
        return self.slot.slot_text if self.slot is not None else "?"

    # --- what the hypervisor shows (read only here: nothing reaches us in a VM) ------------
    def cfg_read(self, reg: int, size: int) -> int:
        if self.view is not None:
            return self.view.cfg_read(reg, size)
        return super().cfg_read(reg, size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        if self.view is not None:
            self.view.cfg_write(reg, size, value)
            return
        super().cfg_write(reg, size, value)

    def close(self) -> None:
        spec, self.spec = self.spec, None
        if spec is not None:
            try:
                self.hypervisor.destroy_vdev(spec)
            except HypervisorError as e:
                log.warning("%s: DESTROY_VDEV failed: %s", self.name, e)
        super().close()


__all__ = ["HvBackedDevice", "SpecBuilder"]
