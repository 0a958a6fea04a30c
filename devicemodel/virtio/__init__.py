"""Virtio: the split virtqueue, the transport-independent device interface, the devices.

``device.py`` documents the contract a transport (virtio-pci, vhost-user) drives.
``DEVICE_MODULES`` maps each ``-s`` emulation name to the module whose
``create(options, slot, func)`` builds the device; the transport registers the names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .device import VirtioDevice

DEVICE_MODULES = {
    "virtio-blk": "devicemodel.virtio.blk",
    "virtio-net": "devicemodel.virtio.net",
    "virtio-console": "devicemodel.virtio.console",
    "virtio-rnd": "devicemodel.virtio.rnd",
}


def create_device(emul: str, options: str, slot: int = 0, func: int = 0) -> VirtioDevice:
    """Build the device for ``-s <slot>:<func>,<emul>,<options>`` (ConfigError on bad options)."""
    module = importlib.import_module(DEVICE_MODULES[emul])
    return module.create(options, slot, func)
