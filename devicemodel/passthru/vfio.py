"""Real passthrough devices: found with pyudev, checked and driven through sysfs and VFIO.

Every sysfs read and write goes through ``Sysfs`` (a root path, ``/sys`` by default), so
the checks can be tested against a fake tree, which pyudev cannot read; pyudev is used
where the tree is real, to enumerate PCI devices (``list_pci_devices``) and to confirm a
device exists (``udev_device``).

The checks give one line for each thing that can be wrong: absent device, wrong driver
(ACRN wants pci-stub or vfio-pci, KVM wants vfio-pci), no IOMMU, an IOMMU group that is
not viable (another device of the group bound to a host driver), a group busy in another
process. ``bind`` / ``Binding.restore`` move a device to vfio-pci with driver_override +
drivers_probe and put the original driver back at teardown.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..ratelimit import RateLimitedLog
from .host import HostBar, HostPciDevice, PassthroughError

log = logging.getLogger(__name__)

# resource flags (include/linux/ioport.h)
IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x0010_0000

#: drivers that leave a device free for VFIO in a group (vfio's own allow-list + none)
VFIO_FRIENDLY = ("vfio-pci", "pci-stub", None)

# linux/vfio.h (type ';' = 0x3B, base 100); checked against the header by the tests
VFIO_GET_API_VERSION = 0x3B64
VFIO_CHECK_EXTENSION = 0x3B65
VFIO_SET_IOMMU = 0x3B66
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_SET_CONTAINER = 0x3B68
VFIO_GROUP_GET_DEVICE_FD = 0x3B6A
VFIO_DEVICE_SET_IRQS = 0x3B6E
VFIO_IOMMU_MAP_DMA = 0x3B71
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_DMA_MAP_FLAG_READ = 1
VFIO_DMA_MAP_FLAG_WRITE = 2
GROUP_STATUS = struct.Struct("<II")
IRQ_SET_HDR = struct.Struct("<IIIII")
DMA_MAP = struct.Struct("<IIQQQ")


class Sysfs:
    """The bits of sysfs passthrough needs, under ``root``."""

    def __init__(self, root: str | os.PathLike[str] = "/sys") -> None:
        self.root = Path(root)

    def device(self, name: str) -> Path:
        return self.root / "bus" / "pci" / "devices" / name

    def exists(self, name: str) -> bool:
        return self.device(name).is_dir()

    def read(self, name: str, attr: str) -> str | None:
        try:
            return (self.device(name) / attr).read_text().strip()
        except OSError:
            return None

    def _link(self, path: Path) -> str | None:
        try:
            return os.path.basename(os.readlink(path))
        except OSError:
            return None

    def driver(self, name: str) -> str | None:
        return self._link(self.device(name) / "driver")

    def iommu_group(self, name: str) -> str | None:
        return self._link(self.device(name) / "iommu_group")

    def iommu_present(self) -> bool:
        groups = self.root / "kernel" / "iommu_groups"
        try:
            return any(groups.iterdir())
        except OSError:
            return False

    def group_devices(self, group: str) -> list[str]:
        try:
            return sorted(os.listdir(self.root / "kernel" / "iommu_groups" / group / "devices"))
        except OSError:
            return []

    def resources(self, name: str) -> list[HostBar]:
        """BARs 0-5 from the ``resource`` file (start end flags per line)."""
        text = self.read(name, "resource") or ""
        bars: list[HostBar] = []
        skip = False
        for index, line in enumerate(text.splitlines()[:6]):
            if skip:
                skip = False
                continue
            try:
                start, end, flags = (int(x, 16) for x in line.split())
            except ValueError:
                continue
            if not flags or end <= start:
                continue
            size = end - start + 1
            if flags & IORESOURCE_IO:
                bars.append(HostBar(index, "io", start, size))
            elif flags & IORESOURCE_MEM:
                wide = bool(flags & IORESOURCE_MEM_64)
                bars.append(HostBar(index, "mem64" if wide else "mem32", start, size,
                                    bool(flags & IORESOURCE_PREFETCH)))
                skip = wide and index < 5
        return bars

    def vfio_node(self, leaf: str) -> str:
        """/dev/vfio/<leaf> (next to a fake root's ``sys``, for tests)."""
        if self.root == Path("/sys"):
            return f"/dev/vfio/{leaf}"
        return str(self.root.parent / "dev" / "vfio" / leaf)

    def has_attr(self, name: str, attr: str) -> bool:
        return (self.device(name) / attr).exists()

    def write(self, path: Path, value: str) -> None:
        """The one place we write to the kernel (tests replace it to play the kernel)."""
        with open(path, "w") as f:
            f.write(value)


# --- pyudev ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PciInfo:
    name: str
    vendor: int
    device: int
    class_code: int
    driver: str | None


def list_pci_devices() -> list[PciInfo]:
    """Every PCI function udev knows, with its IDs and driver (read-only)."""
    import pyudev

    out = []
    for dev in pyudev.Context().list_devices(subsystem="pci"):
        out.append(_info(dev))
    return sorted(out, key=lambda i: i.name)


def _info(dev: object) -> PciInfo:
    attrs = dev.attributes  # type: ignore[attr-defined]

    def num(key: str) -> int:
        try:
            return int(attrs.asstring(key), 16)
        except (KeyError, ValueError, UnicodeDecodeError):
            return 0

    return PciInfo(dev.sys_name, num("vendor"), num("device"), num("class"),  # type: ignore
                   dev.driver)  # type: ignore[attr-defined]


def udev_device(name: str) -> PciInfo | None:
    """pyudev's view of one device, None when udev does not know it."""
    import pyudev

    try:
        dev = pyudev.Devices.from_name(pyudev.Context(), "pci", name)
    except pyudev.DeviceNotFoundError:
        return None
    return _info(dev)


# --- checks ------------------------------------------------------------------------------
Opener = Callable[[str, int], int]


def check_assignable(sysfs: Sysfs, name: str, drivers: tuple[str, ...] = ("vfio-pci",),
                     *, opener: Opener = os.open) -> str | None:
    """Raise a one-line PassthroughError for the first thing wrong; return the IOMMU group
    (None for a pci-stub device, whose IOMMU the ACRN hypervisor owns)."""
    who = f"passthru {name}"
    if not sysfs.exists(name):
        raise PassthroughError(
            f"{who}: no such PCI device under {sysfs.device(name).parent}; check the "
            "<bus>/<dev>/<func> (hex) with lspci -D"
        )
    driver = sysfs.driver(name)
    if driver not in drivers:
        raise PassthroughError(
            f"{who}: bound to {driver or 'no driver'}, needs {' or '.join(drivers)}; "
            f"bind it first (echo {drivers[-1]} > {sysfs.device(name)}/driver_override; "
            f"echo {name} > {sysfs.root}/bus/pci/drivers_probe)"
        )
    if driver != "vfio-pci":
        return None
    group = sysfs.iommu_group(name)
    if group is None:
        if not sysfs.iommu_present():
            raise PassthroughError(
                f"{who}: no IOMMU: the kernel has no IOMMU groups; enable VT-d in the "
                "firmware and boot with intel_iommu=on"
            )
        raise PassthroughError(f"{who}: the device has no IOMMU group")
    for other in sysfs.group_devices(group):
        if other == name:
            continue
        odrv = sysfs.driver(other)
        if odrv not in VFIO_FRIENDLY:
            raise PassthroughError(
                f"{who}: IOMMU group {group} is not viable: {other} in the same group is "
                f"bound to {odrv}; bind every device of the group to vfio-pci"
            )
    node = sysfs.vfio_node(group)
    try:
        fd = opener(node, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise PassthroughError(
                f"{who}: busy: IOMMU group {group} ({node}) is held by another process "
                "(another VM?)"
            ) from None
        raise PassthroughError(f"{who}: cannot open {node}: {e.strerror}") from None
    os.close(fd)
    return group


# --- binding -----------------------------------------------------------------------------
@dataclass
class Binding:
    """A device moved to another driver, and the driver to give it back to."""

    sysfs: Sysfs
    name: str
    driver: str
    original: str | None

    def restore(self) -> None:
        """Unbind from ``driver``, clear the override, let the original driver probe."""
        dev = self.sysfs.device(self.name)
        if self.sysfs.driver(self.name) == self.driver:
            self.sysfs.write(dev / "driver" / "unbind", self.name)
        self.sysfs.write(dev / "driver_override", "\n")
        if self.original is not None:
            self.sysfs.write(self.sysfs.root / "bus" / "pci" / "drivers_probe", self.name)
        now = self.sysfs.driver(self.name)
        if now != self.original:
            raise PassthroughError(
                f"passthru {self.name}: wanted it back on {self.original or 'no driver'}, "
                f"it is on {now or 'no driver'}"
            )


def bind(sysfs: Sysfs, name: str, driver: str = "vfio-pci") -> Binding:
    """Move ``name`` to ``driver`` (driver_override + drivers_probe)."""
    if not sysfs.exists(name):
        raise PassthroughError(f"passthru {name}: no such PCI device")
    original = sysfs.driver(name)
    binding = Binding(sysfs, name, driver, original)
    if original == driver:
        return binding
    dev = sysfs.device(name)
    sysfs.write(dev / "driver_override", driver)
    if original is not None:
        sysfs.write(dev / "driver" / "unbind", name)
    sysfs.write(sysfs.root / "bus" / "pci" / "drivers_probe", name)
    now = sysfs.driver(name)
    if now != driver:
        raise PassthroughError(
            f"passthru {name}: {driver} did not take the device (now on {now or 'no driver'});"
            f" is the {driver} module loaded?"
        )
    return binding


# --- the device ----------------------------------------------------------------------------
class SysfsHostDevice(HostPciDevice):
    """A real function: config space through sysfs ``config``, BARs through
    ``resourceN``, reset through ``reset``; VFIO (group, container, device fd) when it is
    bound to vfio-pci, for DMA mapping and per-message eventfds.

    ``read_only`` (the sim backend: nothing there can take the device's interrupts or DMA)
    never writes to the device: config writes, resets and BAR accesses are dropped, so a
    preview such as ``acrn-pydm lspci`` can show a real device's guest view safely.
    """

    def __init__(self, sysfs: Sysfs, name: str, group: str | None = None, *,
                 read_only: bool = False) -> None:
        self.sysfs = sysfs
        self.name = name
        bus, devfn = name.split(":")[1:]
        dev, func = devfn.split(".")
        self.phys_bdf = int(bus, 16) << 8 | int(dev, 16) << 3 | int(func, 16)
        self.group = group
        self.read_only = read_only
        path = sysfs.device(name) / "config"
        self._writable = False
        try:
            if not read_only:
                try:
                    self._cfg_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                    self._writable = True
                except PermissionError:
                    log.warning("passthru %s: %s is read-only to us (run as root); the "
                                "device will not be programmed", name, path)
            if not self._writable:
                self._cfg_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise PassthroughError(f"passthru {name}: cannot open {path}: {e.strerror}") from None
        self._size = os.fstat(self._cfg_fd).st_size or 256
        self._bars = sysfs.resources(name)
        self._maps: dict[int, mmap.mmap] = {}
        self._vfio: list[int] = []  # container, group, device fds
        self._msi_fds: list[int] | None = None
        self._rl = RateLimitedLog(log)

    @property
    def config_size(self) -> int:
        return min(self._size, 4096)

    @property
    def drives_hardware(self) -> bool:
        return self._writable

    def config_read(self, off: int, size: int) -> int:
        if size not in (1, 2, 4) or off < 0 or off + size > self.config_size:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0xFFFF_FFFF
        try:
            data = os.pread(self._cfg_fd, size, off)
        except OSError as e:  # the device went away: read as absent hardware does
            self._rl.warning("passthru %s: config read at %#x: %s", self.name, off, e)
            return (1 << (8 * size)) - 1
        if len(data) != size:
            return (1 << (8 * size)) - 1
        return int.from_bytes(data, "little")

    def config_write(self, off: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or off < 0 or off + size > self.config_size:
            return
        if not self._writable:
            return  # read-only: a guest write must never fail (nor reach the device)
        try:
            os.pwrite(self._cfg_fd, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"),
                      off)
        except OSError as e:
            self._rl.warning("passthru %s: config write at %#x: %s", self.name, off, e)

    def bars(self) -> list[HostBar]:
        return list(self._bars)

    def _map(self, index: int) -> mmap.mmap | None:
        m = self._maps.get(index)
        if m is None and not self.read_only:
            bar = next((b for b in self._bars if b.index == index and b.kind != "io"), None)
            if bar is None:
                return None
            path = self.sysfs.device(self.name) / f"resource{index}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
                try:
                    m = mmap.mmap(fd, bar.size)
                finally:
                    os.close(fd)
            except OSError:
                return None
            self._maps[index] = m
        return m

    def bar_read(self, index: int, offset: int, size: int) -> int:
        m = self._map(index)
        if m is None or size not in (1, 2, 4, 8) or not 0 <= offset <= len(m) - size:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4, 8) else 0xFFFF_FFFF
        return int.from_bytes(m[offset : offset + size], "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        m = self._map(index)
        if m is None or size not in (1, 2, 4, 8) or not 0 <= offset <= len(m) - size:
            return
        m[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @property
    def can_reset(self) -> bool:
        return not self.read_only and self.sysfs.has_attr(self.name, "reset")

    def reset(self) -> bool:
        if not self.can_reset:
            return False
        self.sysfs.write(self.sysfs.device(self.name) / "reset", "1")
        return True

    # --- VFIO -----------------------------------------------------------------------------
    def open_vfio(self) -> None:
        """Container + group + device fd (the device must be bound to vfio-pci)."""
        if self._vfio or self.group is None:
            return
        fds: list[int] = []
        node = self.sysfs.vfio_node("vfio")
        try:
            container = os.open(node, os.O_RDWR | os.O_CLOEXEC)
            fds.append(container)
            node = self.sysfs.vfio_node(self.group)
            group = os.open(node, os.O_RDWR | os.O_CLOEXEC)
            fds.append(group)
            status = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
            fcntl.ioctl(group, VFIO_GROUP_GET_STATUS, status)
            if not GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
                raise PassthroughError(f"passthru {self.name}: IOMMU group {self.group} is not "
                                       "viable")
            fcntl.ioctl(group, VFIO_GROUP_SET_CONTAINER, struct.pack("<i", container))
            fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
            fds.append(fcntl.ioctl(group, VFIO_GROUP_GET_DEVICE_FD,
                                   self.name.encode() + b"\0"))
        except BaseException as e:
            for fd in reversed(fds):
                os.close(fd)
            if isinstance(e, OSError):
                raise PassthroughError(f"passthru {self.name}: VFIO: {node}: "
                                       f"{e.strerror or e}") from None
            raise
        self._vfio = fds

    def map_dma(self, iova: int, backing: mmap.mmap) -> None:
        """Let the device DMA into guest RAM ``backing`` at guest address ``iova``."""
        if self.read_only or self.group is None:
            return
        self.open_vfio()
        vaddr = ctypes.addressof(ctypes.c_char.from_buffer(backing))
        arg = DMA_MAP.pack(DMA_MAP.size, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                           vaddr, iova, len(backing))
        fcntl.ioctl(self._vfio[0], VFIO_IOMMU_MAP_DMA, arg)

    def message_eventfds(self, fds: list[int] | None) -> None:
        """VFIO_DEVICE_SET_IRQS on the MSI index: the host kernel programs the device and
        signals eventfd k for message k."""
        self.open_vfio()
        if not self._vfio:
            raise PassthroughError(f"passthru {self.name}: per-message eventfds need vfio-pci")
        if fds:
            arg = IRQ_SET_HDR.pack(IRQ_SET_HDR.size + 4 * len(fds),
                                   VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                   VFIO_PCI_MSI_IRQ_INDEX, 0, len(fds))
            arg += struct.pack(f"<{len(fds)}i", *fds)
        else:
            arg = IRQ_SET_HDR.pack(IRQ_SET_HDR.size, VFIO_IRQ_SET_DATA_NONE
                                   | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 0)
        fcntl.ioctl(self._vfio[2], VFIO_DEVICE_SET_IRQS, arg)
        self._msi_fds = fds

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        for fd in reversed(self._vfio):
            os.close(fd)
        self._vfio = []
        if self._cfg_fd >= 0:
            os.close(self._cfg_fd)
            self._cfg_fd = -1


def open_sysfs_host(name: str, drivers: tuple[str, ...] | None = ("vfio-pci",), *,
                    sysfs: Sysfs | None = None) -> SysfsHostDevice:
    """Check the device and open it (the error says what is wrong and how to fix it).
    ``drivers=None`` opens it read-only, whatever its driver (a preview)."""
    sysfs = sysfs or Sysfs()
    if sysfs.root == Path("/sys") and sysfs.exists(name) and udev_device(name) is None:
        raise PassthroughError(f"passthru {name}: udev does not know this device")
    if drivers is None:
        if not sysfs.exists(name):
            check_assignable(sysfs, name)  # the "no such device" message
        return SysfsHostDevice(sysfs, name, None, read_only=True)
    group = check_assignable(sysfs, name, drivers)
    return SysfsHostDevice(sysfs, name, group)


__all__ = [
    "Binding", "PciInfo", "Sysfs", "SysfsHostDevice", "bind", "check_assignable",
    "list_pci_devices", "open_sysfs_host", "udev_device",
]
