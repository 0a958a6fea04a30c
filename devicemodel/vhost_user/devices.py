"""Device specs (the ``-s`` emulation syntax without the slot) → our ``VirtioDevice``s.

``virtio-blk,/path/disk.img`` builds the very ``VirtioBlk`` the ioreq path uses, from the
same option parser, so a device behaves the same whichever transport serves it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import ConfigError
from ..virtio.device import VirtioDevice


@dataclass(frozen=True)
class Kind:
    #: the device module; its ``create(options)`` builds the device (as for ``-s``)
    module: str
    #: the back-end type of vhost-user.json (for --print-capabilities)
    vhost_type: str
    #: what QEMU attaches it with
    qemu: str


KINDS: dict[str, Kind] = {
    "virtio-blk": Kind("devicemodel.virtio.blk", "block", "-device vhost-user-blk-pci"),
    "virtio-net": Kind("devicemodel.virtio.net", "net",
                       "-netdev vhost-user + -device virtio-net-pci"),
    "virtio-console": Kind("devicemodel.virtio.console", "console",
                           "-device vhost-user-test-device-pci,virtio-id=3,"
                           "num_vqs=<2*ports+2>,config_size=12 (QEMU 11.1; not 7.2)"),
    "virtio-rnd": Kind("devicemodel.virtio.rnd", "rng", "-device vhost-user-rng-pci"),
}


def kind_of(spec: str) -> tuple[str, Kind, str]:
    emul, _, options = spec.partition(",")
    kind = KINDS.get(emul)
    if kind is None:
        raise ConfigError(f"vhost-user: cannot serve {emul!r}; choose one of "
                          f"{', '.join(KINDS)}")
    return emul, kind, options


def make_device(spec: str) -> VirtioDevice:
    """Build the device a spec names; ConfigError (one line) if it is wrong."""
    emul, kind, options = kind_of(spec)
    try:
        module = importlib.import_module(kind.module)
    except ImportError:
        raise ConfigError(f"vhost-user: {emul} is not available in this build") from None
    device: VirtioDevice = module.create(options)
    return device
