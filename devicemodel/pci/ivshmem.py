"""``-s <slot>,ivshmem,{hv|dm}:/<name>,<size MiB>[,<region id>]``: inter-VM shared memory
(1AF4:1110), as acrn-dm's ivshmem.c.

* ``hv:/<name>``: the hypervisor emulates the device and owns the memory region of that
  name (from its scenario configuration); we reserve the slot and BARs and hand them over
  with CREATE_VDEV (pci/hv_backed.py). The name goes to the hypervisor with its ``hv:/``
  prefix, as acrn-dm sends it.
* ``dm:/<name>``: we emulate it. BAR0 holds the 256-byte register block (interrupt mask
  and status read 0, IVPosition reads 0: no interrupts, doorbell writes are ignored with
  a warning, exactly acrn-dm's level of support), BAR1 is the 4 KiB MSI-X BAR acrn-dm
  reserves without an MSI-X capability, BAR2 (64-bit, prefetchable) is the shared memory:
  ``/dev/shm/<name>``, created at the given size or opened when a peer made it (its size
  must match), mapped into the guest with SET_MEMSEG so guest accesses never exit. Like
  acrn-dm it stays mapped where it was placed if the guest moves BAR2, and the file is
  left in /dev/shm when the VM stops (a peer may still use it).

The size is in MiB, a power of two from 2 to 512; the region id (default 0) is the
subsystem ID, which guest drivers use to tell regions apart.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..hsm import abi
from ..hsm.base import VdevSpec
from ..hsm.hv_vdevs import IVSHMEM_IDS
from . import config as pc
from .device import BarKind, PciDevice
from .hv_backed import HvBackedDevice

if TYPE_CHECKING:
    from ..context import DeviceContext
    from ..slot import SlotConfig

log = logging.getLogger(__name__)

MiB = 1 << 20
REG_SIZE = 0x100
MSIX_BAR_SIZE = 0x1000
INTEL_SUBVENDOR = 0x8086
SHM_DIR = "/dev/shm"
#: ivshmem's register block: interrupt mask, interrupt status, IVPosition, doorbell
IRQ_MASK, IRQ_STATUS, IV_POSITION, DOORBELL = 0x0, 0x4, 0x8, 0xC


@dataclass(frozen=True)
class IvshmemOptions:
    hv_land: bool
    #: hv: the whole ``hv:/name`` (what the hypervisor matches); dm: the shm object's name
    name: str
    size: int
    region_id: int
    warnings: tuple[str, ...] = ()


def parse_ivshmem_options(text: str) -> IvshmemOptions:
    """acrn-dm's ``<hv:/|dm:/><name>,<size>[,<region id>]`` (one-line errors)."""
    name, _, rest = text.partition(",")
    size_text, _, region_text = rest.partition(",")
    usage = "write ivshmem,hv:/<name>,<size MiB>[,<region id>] (or dm:/<name>)"
    if name.startswith("hv:/"):
        hv_land, shm = True, name
    elif name.startswith("dm:/"):
        hv_land, shm = False, name[4:]
        if not shm or "/" in shm.lstrip("/") or shm in (".", "..") or "\0" in shm or \
                len(shm.lstrip("/").encode()) > 255:
            raise ConfigError(f"ivshmem: {name!r} is not a shared memory name; {usage}")
    else:
        raise ConfigError(f"ivshmem: {name!r}: the name must start with hv:/ or dm:/; {usage}")
    if hv_land and len(shm.encode()) > 32:
        raise ConfigError(f"ivshmem: {name!r}: the hypervisor takes names of up to 32 bytes")
    if not (size_text.isascii() and size_text.isdigit()):
        raise ConfigError(f"ivshmem: size {size_text!r} is not a number of MiB; {usage}")
    size = int(size_text) * MiB
    if not 2 * MiB <= size < 1024 * MiB or size & (size - 1):
        raise ConfigError(f"ivshmem: size {size_text}: give a power of two from 2 to 512 (MiB)")
    region_id, warnings = 0, ()
    if region_text:
        if region_text.isascii() and region_text.isdigit() and int(region_text) <= 0xFFFF:
            region_id = int(region_text)
        else:  # acrn-dm: "shared memory region ID is incorrect, 0 will used"
            warnings = (f"ivshmem: region id {region_text!r} is not a number; 0 is used",)
    return IvshmemOptions(hv_land, shm, size, region_id, warnings)


def _ids(dev: PciDevice, region_id: int) -> None:
    dev.cfg.set_ids(IVSHMEM_IDS[0], IVSHMEM_IDS[1], 0x050000, subsys_vendor=INTEL_SUBVENDOR,
                    subsys_id=region_id)
    dev.cfg.set8(pc.REVISION, 1)


class IvshmemDm(PciDevice):
    """The device-model-land ivshmem."""

    name = "ivshmem"

    def __init__(self, ctx: DeviceContext, slot: SlotConfig, opts: IvshmemOptions) -> None:
        super().__init__(ctx, slot)
        self.opts = opts
        self.hypervisor = ctx.hypervisor
        _ids(self, opts.region_id)
        self.add_bar(0, BarKind.MEM32, REG_SIZE, read=self._reg_read, write=self._reg_write)
        self.add_bar(1, BarKind.MEM32, MSIX_BAR_SIZE)  # reads all ones, writes dropped
        self.add_bar(2, BarKind.MEM64, opts.size, trap=False)
        self.fd = -1
        self.memory: mmap.mmap | None = None
        self.mapped_at: int | None = None
        self._warned_doorbell = False
        if ctx.backend == "none":  # outside a VM (lspci): shows itself, touches no memory
            return
        self.fd, self.created = _open_shm(opts.name, opts.size)
        try:
            self.memory = mmap.mmap(self.fd, opts.size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise

    def power_on_snapshot(self) -> None:
        """BAR2 has its guest address: map the shared memory there (once)."""
        super().power_on_snapshot()
        bar = self.bar(2)
        if self.mapped_at is None and bar is not None and self.hypervisor is not None and \
                self.memory is not None:
            self.hypervisor.set_memseg(bar.addr, self.memory,
                                       abi.MEM_ACCESS_READ | abi.MEM_ACCESS_WRITE)
            self.mapped_at = bar.addr

    def _reg_read(self, offset: int, size: int) -> int:
        if offset in (IRQ_MASK, IRQ_STATUS, IV_POSITION):
            return 0
        return (1 << 8 * size) - 1

    def _reg_write(self, offset: int, size: int, value: int) -> None:
        if offset == DOORBELL and not self._warned_doorbell:
            self._warned_doorbell = True
            log.warning("ivshmem %s: doorbells are not supported (vector %d to peer %d "
                        "ignored), as in acrn-dm", self.opts.name, value & 0xFF,
                        (value >> 16) & 0xFF)

    def close(self) -> None:
        if self.memory is not None:
            try:
                self.memory.close()
            except BufferError:  # a simulated guest's memory map still holds it
                pass
            self.memory = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


def _open_shm(name: str, size: int) -> tuple[int, bool]:
    """shm_open(O_CREAT|O_EXCL) then, if a peer made it, open it and check its size."""
    path = os.path.join(SHM_DIR, name.lstrip("/"))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        have = os.fstat(fd).st_size
        if have != size:
            os.close(fd)
            raise ConfigError(f"ivshmem,dm:/{name}: {path} exists with {have} bytes, not the "
                              f"{size} given; use the peer's size") from None
        return fd, False
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise OSError(e.errno or errno.EIO, f"ivshmem: cannot size {path}: {e.strerror}") from e
    return fd, True


def hv_spec(opts: IvshmemOptions):
    """CREATE_VDEV's arguments from the reserved BARs, as acrn-dm's create_ivshmem_from_hv."""

    def build(bdf: int, regs: list[int]) -> VdevSpec:
        io_addr = (regs[0], regs[1], regs[2] | 0x0C, regs[3], 0, 0)
        return VdevSpec(IVSHMEM_IDS[0], IVSHMEM_IDS[1], bdf, io_addr=io_addr,
                        io_size=(0, 0, opts.size, 0, 0, 0), args=opts.name.encode()[:32])

    return build


def check_options(slot: SlotConfig, options: str) -> object:
    """The validator's check: what ``create`` parses, without opening the memory."""
    return parse_ivshmem_options(options)


def create(ctx: DeviceContext, slot: SlotConfig, options: str) -> PciDevice:
    opts = parse_ivshmem_options(options)
    for msg in opts.warnings:
        log.warning("-s %s,ivshmem: %s", slot.slot_text, msg)
    if opts.hv_land:
        dev = HvBackedDevice(ctx, slot, "ivshmem", [(0, BarKind.MEM32, REG_SIZE),
                                                    (1, BarKind.MEM32, MSIX_BAR_SIZE),
                                                    (2, BarKind.MEM64, opts.size)],
                             hv_spec(opts))
        _ids(dev, opts.region_id)
        return dev
    return IvshmemDm(ctx, slot, opts)


__all__ = ["IvshmemDm", "IvshmemOptions", "create", "parse_ivshmem_options"]
