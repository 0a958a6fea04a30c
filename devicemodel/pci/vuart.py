"""``-s <slot>,uart,vuart_idx:<K>``: the hypervisor's PCI vUART K (an MCS9900, 9710:9900),
as acrn-dm's uart.c sets it up: BAR0 (MEM32, 256 bytes) and BAR1 (MEM32, 4 KiB, its
MSI-X table) get guest addresses here, then CREATE_VDEV hands the function to the
hypervisor, which connects it to the vUART K of the scenario (the console, or a
connection to another VM). pci/hv_backed.py does the asking.

acrn-dm's other form, ``uart,<backend>`` (a PCI 16550 the device model emulates), is not
implemented: it is refused by name.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..hsm.base import VdevSpec
from ..hsm.hv_vdevs import MCS9900_IDS
from .device import BarKind
from .hv_backed import HvBackedDevice

if TYPE_CHECKING:
    from ..context import DeviceContext
    from ..slot import SlotConfig

MMIO_BAR_SIZE = 256
MSIX_BAR_SIZE = 4096


def parse_uart_options(text: str) -> int:
    """``vuart_idx:<K>`` → K (acrn-dm reads it as an unsigned decimal; the hypervisor
    takes 16 bits of it)."""
    key, sep, value = text.partition(":")
    if key != "vuart_idx":
        raise ConfigError(
            f"uart,{text}: only the hypervisor's PCI vUART is supported: write "
            "uart,vuart_idx:<K> (the device-model UART with a backend is not implemented)")
    if not sep or not (value.isascii() and value.isdigit()) or int(value) > 0xFFFF:
        raise ConfigError(f"uart,{text}: vuart_idx takes the vUART's index, e.g. vuart_idx:1")
    return int(value)


def check_options(slot: SlotConfig, options: str) -> object:
    """The validator's check: what ``create`` parses, without asking the hypervisor."""
    return parse_uart_options(options)


def create(ctx: DeviceContext, slot: SlotConfig, options: str) -> HvBackedDevice:
    index = parse_uart_options(options)

    def build(bdf: int, regs: list[int]) -> VdevSpec:
        # acrn-dm: io_addr[0..1] = the BAR registers, no sizes, args = the u32 index
        return VdevSpec(MCS9900_IDS[0], MCS9900_IDS[1], bdf,
                        io_addr=(regs[0], regs[1], 0, 0, 0, 0), args=struct.pack("<I", index))

    return HvBackedDevice(ctx, slot, "uart", [(0, BarKind.MEM32, MMIO_BAR_SIZE),
                                              (1, BarKind.MEM32, MSIX_BAR_SIZE)], build)


__all__ = ["create", "parse_uart_options"]
