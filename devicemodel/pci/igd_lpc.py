"""``igd-lpc``: the ISA bridge at 00:1f.0 a passed-through Intel GPU needs (its GOP driver
and the guest's graphics driver look there for the platform's LPC IDs).

As acrn-dm's igd-lpc: vendor, device, revision and subsystem IDs copied from the host's
LPC bridge at 00:1f.0, class ISA bridge, nothing else. Passthrough of an Intel GPU adds it
at 31:0 by itself (passthru/igd.py); ``-s 31,igd-lpc`` adds it explicitly.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..errors import ConfigError
from . import config as pc
from .device import PciDevice

if TYPE_CHECKING:
    from ..context import DeviceContext
    from ..slot import SlotConfig

HOST_LPC_CONFIG = "/sys/bus/pci/devices/0000:00:1f.0/config"
ISA_BRIDGE_CLASS = 0x060100


class IgdLpc(PciDevice):
    name = "igd-lpc"

    def __init__(self, ctx: DeviceContext | None, slot: SlotConfig, host_config: bytes) -> None:
        super().__init__(ctx, slot)
        if len(host_config) < 0x30:
            raise ConfigError(f"-s {slot.slot_text},igd-lpc: the host LPC bridge's config "
                              "space is too short")
        vendor, device = struct.unpack_from("<HH", host_config, 0)
        subvendor, subdev = struct.unpack_from("<HH", host_config, 0x2C)
        self.cfg.set_ids(vendor, device, ISA_BRIDGE_CLASS, subsys_vendor=subvendor,
                         subsys_id=subdev)
        self.cfg.set8(pc.REVISION, host_config[pc.REVISION])


def read_host_lpc(path: str = HOST_LPC_CONFIG) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(256)
    except OSError as e:
        raise ConfigError(f"igd-lpc: cannot read the host LPC bridge's config space ({path}: "
                          f"{e.strerror}); it copies its IDs from 00:1f.0") from None


def create(ctx: DeviceContext, slot: SlotConfig, options: str) -> IgdLpc:
    """``-s 31,igd-lpc`` (acrn-dm ignores options here too)."""
    return IgdLpc(ctx, slot, read_host_lpc())


__all__ = ["HOST_LPC_CONFIG", "IgdLpc", "create", "read_host_lpc"]
