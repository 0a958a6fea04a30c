"""Imports every device module so that each registers its ``-s`` emulation name."""

from __future__ import annotations

import importlib

DEVICE_MODULES = (
    "devicemodel.pci.hostbridge",
    "devicemodel.pci.dummy",
    "devicemodel.passthru.device",
    "devicemodel.platform.lpc",
    "devicemodel.virtio.pci_devices",
)


def load_all() -> None:
    for name in DEVICE_MODULES:
        importlib.import_module(name)
