"""The ``-s`` emulations of the virtio devices: each device on the virtio-pci transport.

Option strings keep acrn-dm's syntax (acrn-facts §4.2); the transport's own tokens
(``legacy``/``modern``/``transitional``, ``pio_notify``, ``no_ioeventfd``, ``no_irqfd``)
may appear anywhere and are taken out before the device parses the rest. The default
interface is acrn-dm's: legacy (BAR0 I/O + MSI-X BAR1) for all four.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..pci.registry import register
from .blk import VirtioBlk, parse_blk_options
from .console import VirtioConsole, parse_console_options
from .device import VirtioDevice
from .net import VirtioNet, parse_net_options
from .pci import Mode, VirtioPci, split_transport_options
from .rnd import VirtioRnd, parse_rnd_options

if TYPE_CHECKING:
    from ..context import VmContext
    from ..slot import SlotConfig


def _make(ctx: VmContext, slot: SlotConfig, build: Callable[[str], VirtioDevice],
          default: Mode = Mode.LEGACY) -> VirtioPci:
    topts, rest = split_transport_options(slot.emul, slot.options, default)
    device = build(rest)
    try:
        return VirtioPci(ctx, slot, device, topts)
    except BaseException:
        device.close()
        raise


@register("virtio-blk")
def _blk(ctx: VmContext, slot: SlotConfig) -> VirtioPci:
    return _make(ctx, slot, lambda text: VirtioBlk(parse_blk_options(text)))


@register("virtio-net")
def _net(ctx: VmContext, slot: SlotConfig) -> VirtioPci:
    return _make(ctx, slot,
                 lambda text: VirtioNet(parse_net_options(text, slot.dev, slot.func)))


@register("virtio-console")
def _console(ctx: VmContext, slot: SlotConfig) -> VirtioPci:
    return _make(ctx, slot, lambda text: VirtioConsole(parse_console_options(text)))


@register("virtio-rnd")
def _rnd(ctx: VmContext, slot: SlotConfig) -> VirtioPci:
    return _make(ctx, slot, lambda text: VirtioRnd(parse_rnd_options(text)))
