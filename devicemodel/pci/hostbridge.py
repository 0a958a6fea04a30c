"""The host bridge at 0:0, with acrn-dm's IDs: a NetApp 0x1275:0x1275 host bridge
(class 06/00) carrying a PCI Express root-port capability; ``amd_hostbridge`` reports
AMD's vendor ID and a made-up device ID, as acrn-dm does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .caps import PCIE_TYPE_ROOT_PORT
from .device import PciDevice

if TYPE_CHECKING:
    from ..context import DeviceContext
    from ..slot import SlotConfig

CLASS_HOST_BRIDGE = 0x060000


class HostBridge(PciDevice):
    name = "hostbridge"
    vendor_id = 0x1275
    device_id = 0x1275

    def __init__(self, ctx: DeviceContext | None = None, slot: SlotConfig | None = None) -> None:
        super().__init__(ctx, slot)
        self.cfg.set_ids(self.vendor_id, self.device_id, CLASS_HOST_BRIDGE)
        self.add_pcie(PCIE_TYPE_ROOT_PORT)


class AmdHostBridge(HostBridge):
    name = "amd_hostbridge"
    vendor_id = 0x1022
    device_id = 0x7432


def create(ctx: DeviceContext, slot: SlotConfig, options: str) -> HostBridge:
    """``-s 0:0,hostbridge`` (options are ignored, as acrn-dm does)."""
    return HostBridge(ctx, slot)


def create_amd(ctx: DeviceContext, slot: SlotConfig, options: str) -> AmdHostBridge:
    return AmdHostBridge(ctx, slot)
