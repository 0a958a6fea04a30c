"""Every device type, once: the table every front door reads.

``-s`` (the VM's PCI functions), ``acrn-pydm lspci``, ``acrn-pydm vhost-user`` and
``acrn-pydm vfio-user`` all look a device up here. An entry gives its ``-s`` names, its
PCI factory ``(context, slot, options) -> PciDevice`` and, for a virtio device, the
module whose ``create(options, slot, func)`` builds the ``VirtioDevice`` alone, with what
vhost-user says about it (the vhost-user.json back-end type, how QEMU attaches it); for
a function that belongs to a VM's own platform, why vfio-user cannot serve it alone.

Device modules are imported when a device of theirs is built, not when the table is
read, so each front door loads only what it serves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .context import DeviceContext
    from .pci.device import PciDevice
    from .slot import SlotConfig
    from .virtio.device import VirtioDevice

#: builds the PCI function of a ``-s`` option: (context, slot, options)
PciFactory = Callable[["DeviceContext", "SlotConfig", str], "PciDevice"]


@dataclass(frozen=True)
class VirtioKind:
    """A virtio device: how to build it alone, and how vhost-user presents it."""

    #: the device module; its ``create(options, slot, func)`` builds the device and its
    #: ``parse_options(options, slot, func)`` parses them without opening anything
    module: str
    #: the back-end type of vhost-user.json (for --print-capabilities)
    vhost_type: str
    #: what QEMU attaches it with
    qemu: str


@dataclass(frozen=True)
class DeviceType:
    """One device type. ``pci`` is ``"module:function"`` of its PCI factory, and that
    module's ``check_options(slot, options)`` parses its options without touching the host
    (the validator's check); a virtio device is put on the virtio-pci transport instead."""

    names: tuple[str, ...]
    pci: str | None = None
    virtio: VirtioKind | None = None
    #: why ``acrn-pydm vfio-user`` cannot serve this function outside its VM (None: it can)
    vm_only: str | None = None


TYPES: tuple[DeviceType, ...] = (
    DeviceType(("hostbridge",), pci="devicemodel.pci.hostbridge:create",
               vm_only="the host bridge belongs to the VM's own PCI root"),
    DeviceType(("amd_hostbridge",), pci="devicemodel.pci.hostbridge:create_amd",
               vm_only="the host bridge belongs to the VM's own PCI root"),
    DeviceType(("dummy",), pci="devicemodel.pci.dummy:create"),
    DeviceType(("passthru",), pci="devicemodel.passthru.device:create"),
    DeviceType(("lpc",), pci="devicemodel.platform.lpc:create",
               vm_only="the LPC bridge carries the VM's own ISA platform (UART, RTC)"),
    DeviceType(("igd-lpc",), pci="devicemodel.pci.igd_lpc:create",
               vm_only="igd-lpc comes with a passed-through Intel GPU at 31:0"),
    DeviceType(("ivshmem",), pci="devicemodel.pci.ivshmem:create"),
    DeviceType(("uart",), pci="devicemodel.pci.vuart:create",
               vm_only="the vUART is emulated by the ACRN hypervisor (CREATE_VDEV)"),
    DeviceType(("virtio-blk",), virtio=VirtioKind(
        "devicemodel.virtio.blk", "block", "-device vhost-user-blk-pci")),
    DeviceType(("virtio-net",), virtio=VirtioKind(
        "devicemodel.virtio.net", "net", "-netdev vhost-user + -device virtio-net-pci")),
    DeviceType(("virtio-console",), virtio=VirtioKind(
        "devicemodel.virtio.console", "console",
        "-device vhost-user-test-device-pci,virtio-id=3,num_vqs=<2*ports+2>,"
        "config_size=12 (QEMU 11.1; not 7.2)")),
    DeviceType(("virtio-rnd",), virtio=VirtioKind(
        "devicemodel.virtio.rnd", "rng", "-device vhost-user-rng-pci")),
)

_BY_NAME: dict[str, DeviceType] = {name: t for t in TYPES for name in t.names}
#: the virtio devices by ``-s`` name, in table order
VIRTIO_KINDS: dict[str, VirtioKind] = {
    name: t.virtio for t in TYPES if t.virtio is not None for name in t.names
}


def known() -> list[str]:
    """Every ``-s`` emulation name."""
    return sorted(_BY_NAME)


# --- -s: PCI functions -------------------------------------------------------------------
def pci_factory(name: str) -> PciFactory:
    """The factory for ``-s <slot>,<name>,...`` (ConfigError naming the known ones)."""
    dtype = _BY_NAME.get(name)
    if dtype is None:
        raise ConfigError(f"-s: unknown emulation {name!r}; known: {', '.join(known())}")
    if dtype.virtio is not None:
        kind = dtype.virtio
        return lambda ctx, slot, options: _virtio_pci(ctx, slot, options, kind)
    assert dtype.pci is not None
    module, _, func = dtype.pci.partition(":")
    factory: PciFactory = getattr(importlib.import_module(module), func)
    return factory


def check_options(slot: SlotConfig) -> object:
    """Parse one ``-s`` option's device options as its factory will, opening nothing
    (vmcheck.py's device check); ConfigError (one line) if they are wrong. Returns what
    the parser made, or None for a device that takes no options."""
    dtype = _BY_NAME.get(slot.emul)
    if dtype is None:
        raise ConfigError(f"-s: unknown emulation {slot.emul!r}; known: {', '.join(known())}")
    if dtype.virtio is not None:
        from .virtio.pci import split_transport_options

        _, rest = split_transport_options(slot.emul, slot.options)
        return _module(dtype.virtio).parse_options(rest, slot.dev, slot.func)
    assert dtype.pci is not None
    check = getattr(importlib.import_module(dtype.pci.partition(":")[0]), "check_options",
                    None)
    return check(slot, slot.options) if check is not None else None


def create_pci(ctx: DeviceContext, slot: SlotConfig) -> PciDevice:
    """The PCI function of one ``-s`` option."""
    return pci_factory(slot.emul)(ctx, slot, slot.options)


def _virtio_pci(ctx: DeviceContext, slot: SlotConfig, options: str,
                kind: VirtioKind) -> PciDevice:
    """A virtio device on the virtio-pci transport (acrn-dm's default: legacy). The
    transport's tokens may appear anywhere in the options; the rest is the device's."""
    from .virtio.pci import VirtioPci, split_transport_options

    topts, rest = split_transport_options(slot.emul, options)
    device = _module(kind).create(rest, slot.dev, slot.func)
    try:
        return VirtioPci(ctx, slot, device, topts)
    except BaseException:
        device.close()
        raise


# --- a whole PCI function outside a VM (vfio-user) ------------------------------------------
def servable() -> list[str]:
    """The emulations ``acrn-pydm vfio-user`` can serve."""
    return sorted(name for name, t in _BY_NAME.items() if t.vm_only is None)


def vfio_user_kind(spec: str) -> tuple[str, str]:
    """``<emul>[,<options>]`` of ``acrn-pydm vfio-user`` → (emul, options); ConfigError
    (one line) for a name that is unknown or whose function belongs to a VM's platform.
    The function is then built with ``create_pci`` like any ``-s`` one."""
    emul, _, options = spec.partition(",")
    if not emul:
        raise ConfigError("give a device spec, e.g. virtio-blk,/path/disk.img")
    dtype = _BY_NAME.get(emul)
    if dtype is None:
        raise ConfigError(f"vfio-user: unknown emulation {emul!r}; choose one of "
                          f"{', '.join(servable())}")
    if dtype.vm_only is not None:
        raise ConfigError(f"vfio-user: {emul} cannot be served: {dtype.vm_only}")
    return emul, options


# --- a virtio device alone (vhost-user, tests) -------------------------------------------
def _module(kind: VirtioKind) -> Any:
    return importlib.import_module(kind.module)


def create_virtio(emul: str, options: str, slot: int = 0, func: int = 0) -> VirtioDevice:
    """The device of ``-s <slot>:<func>,<emul>,<options>`` without a transport
    (ConfigError on bad options; KeyError for a name that is no virtio device)."""
    device: VirtioDevice = _module(VIRTIO_KINDS[emul]).create(options, slot, func)
    return device


def vhost_kind(spec: str) -> tuple[str, VirtioKind, str]:
    """``<emul>[,<options>]`` → (emul, its kind, options); ConfigError if vhost-user
    cannot serve it."""
    emul, _, options = spec.partition(",")
    kind = VIRTIO_KINDS.get(emul)
    if kind is None:
        raise ConfigError(f"vhost-user: cannot serve {emul!r}; choose one of "
                          f"{', '.join(VIRTIO_KINDS)}")
    return emul, kind, options


def make_vhost_device(spec: str) -> VirtioDevice:
    """Build the device a vhost-user spec names; ConfigError (one line) if it is wrong."""
    emul, kind, options = vhost_kind(spec)
    try:
        module = _module(kind)
    except ImportError:
        raise ConfigError(f"vhost-user: {emul} is not available in this build") from None
    device: VirtioDevice = module.create(options)
    return device


__all__ = [
    "DeviceType", "PciFactory", "TYPES", "VIRTIO_KINDS", "VirtioKind", "check_options",
    "create_pci",
    "create_virtio", "known", "make_vhost_device", "pci_factory", "servable",
    "vfio_user_kind", "vhost_kind",
]
