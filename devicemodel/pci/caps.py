"""PCI capabilities: construct layouts, builders for emulated devices, and a chain walker.

The same layouts serve both directions: emulated devices build their capability bytes
from them (with the writable masks next to the bytes), and the walker parses any config
space, a physical device's included (passthrough reads sysfs config files). The walker is
guest- and hardware-facing input, so every malformation (pointer loop, pointer into the
header, capability running past the end, short buffer) ends in one exception type,
``CapabilityError``, and nothing else.

Construct costs tens of microseconds per parse (design.md §6): parse once at setup and
keep offsets; the request path uses ConfigSpace bytes directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import construct as cs
from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

from . import config as pc

# capability IDs
CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_PCIE = 0x10
CAP_ID_MSIX = 0x11

# MSI message control
MSI_CTRL_ENABLE = 0x0001
MSI_CTRL_MMC_SHIFT = 1
MSI_CTRL_MME_SHIFT = 4
MSI_CTRL_MME_MASK = 0x0070
MSI_CTRL_64BIT = 0x0080
MSI_CTRL_PVM = 0x0100

# MSI-X message control
MSIX_CTRL_SIZE_MASK = 0x07FF
MSIX_CTRL_FMASK = 0x4000
MSIX_CTRL_ENABLE = 0x8000
MSIX_BIR_MASK = 0x7
MSIX_MAX_ENTRIES = 2048

# PCI Express device/port types (capabilities register bits 7:4)
PCIE_TYPE_ENDPOINT = 0x0
PCIE_TYPE_LEGACY_ENDPOINT = 0x1
PCIE_TYPE_ROOT_PORT = 0x4
PCIE_TYPE_RC_INTEGRATED = 0x9

# virtio vendor capability cfg_type values (virtio 1.x §4.1.4)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
VIRTIO_VENDOR_ID = 0x1AF4


class CapabilityError(ValueError):
    """A capability list that cannot be parsed (or a capability that does not fit)."""


# --- layouts -----------------------------------------------------------------------------
_HDR = ("cap_id" / Int8ul, "next" / Int8ul)

MsiCap32 = Struct(*_HDR, "control" / Int16ul, "addr_lo" / Int32ul, "data" / Int16ul)
MsiCap64 = Struct(
    *_HDR, "control" / Int16ul, "addr_lo" / Int32ul, "addr_hi" / Int32ul, "data" / Int16ul
)
MsiCap32Mask = Struct(
    *_HDR, "control" / Int16ul, "addr_lo" / Int32ul, "data" / Int16ul, "reserved" / Int16ul,
    "mask" / Int32ul, "pending" / Int32ul,
)
MsiCap64Mask = Struct(
    *_HDR, "control" / Int16ul, "addr_lo" / Int32ul, "addr_hi" / Int32ul, "data" / Int16ul,
    "reserved" / Int16ul, "mask" / Int32ul, "pending" / Int32ul,
)
MsixCap = Struct(*_HDR, "control" / Int16ul, "table" / Int32ul, "pba" / Int32ul)
PmCap = Struct(*_HDR, "pmc" / Int16ul, "pmcsr" / Int16ul, "bridge_ext" / Int8ul,
               "data" / Int8ul)
#: the registers every PCI Express function has (capability version 1 subset)
PcieCapV1 = Struct(
    *_HDR, "pcie_caps" / Int16ul, "dev_caps" / Int32ul, "dev_control" / Int16ul,
    "dev_status" / Int16ul, "link_caps" / Int32ul, "link_control" / Int16ul,
    "link_status" / Int16ul,
)
#: the full version-2 structure (60 bytes, as acrn-dm's struct pciecap)
PcieCap = Struct(
    *_HDR, "pcie_caps" / Int16ul, "dev_caps" / Int32ul, "dev_control" / Int16ul,
    "dev_status" / Int16ul, "link_caps" / Int32ul, "link_control" / Int16ul,
    "link_status" / Int16ul, "slot_caps" / Int32ul, "slot_control" / Int16ul,
    "slot_status" / Int16ul, "root_control" / Int16ul, "root_caps" / Int16ul,
    "root_status" / Int32ul, "dev_caps2" / Int32ul, "dev_control2" / Int16ul,
    "dev_status2" / Int16ul, "link_caps2" / Int32ul, "link_control2" / Int16ul,
    "link_status2" / Int16ul, "slot_caps2" / Int32ul, "slot_control2" / Int16ul,
    "slot_status2" / Int16ul,
)
VendorCap = Struct(
    *_HDR, "length" / Int8ul, "payload" / Bytes(lambda ctx: max(ctx.length - 3, 0))
)
_VIRTIO_BASE = (
    *_HDR, "length" / Int8ul, "cfg_type" / Int8ul, "bar" / Int8ul, "id" / Int8ul,
    "padding" / Bytes(2), "offset" / Int32ul, "size" / Int32ul,
)
VirtioPciCap = Struct(*_VIRTIO_BASE)
VirtioNotifyCap = Struct(*_VIRTIO_BASE, "notify_off_multiplier" / Int32ul)
VirtioPciCfgCap = Struct(*_VIRTIO_BASE, "pci_cfg_data" / Int32ul)
VirtioPciCap64 = Struct(*_VIRTIO_BASE, "offset_hi" / Int32ul, "size_hi" / Int32ul)

# extended capability header: id 15:0, version 19:16, next 31:20
ExtCapHeader = cs.ByteSwapped(
    cs.BitStruct("next" / cs.BitsInteger(12), "version" / cs.BitsInteger(4),
                 "cap_id" / cs.BitsInteger(16))
)

assert MsiCap64Mask.sizeof() == 24 and MsixCap.sizeof() == 12 and PcieCap.sizeof() == 60
assert VirtioPciCap.sizeof() == 16 and PmCap.sizeof() == 8


def msi_layout(control: int) -> Struct:
    """The MSI structure variant that ``control`` (message control) announces."""
    wide = bool(control & MSI_CTRL_64BIT)
    mask = bool(control & MSI_CTRL_PVM)
    if mask:
        return MsiCap64Mask if wide else MsiCap32Mask
    return MsiCap64 if wide else MsiCap32


@dataclass(frozen=True)
class MsiOffsets:
    """Register offsets inside an MSI capability (they move with the 64-bit bit)."""

    addr_hi: int | None
    data: int
    mask: int | None
    pending: int | None
    length: int


def msi_offsets(control: int) -> MsiOffsets:
    wide = bool(control & MSI_CTRL_64BIT)
    data = 12 if wide else 8
    if control & MSI_CTRL_PVM:
        return MsiOffsets(8 if wide else None, data, data + 4, data + 8, data + 12)
    return MsiOffsets(8 if wide else None, data, None, None, data + 2)


# --- builders ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CapBytes:
    """A capability ready to be added: its bytes and the guest-writable / W1C masks."""

    data: bytes
    wmask: bytes
    w1c: bytes = b""


def _mask(layout: Struct, **fields: int) -> bytes:
    values: dict[str, Any] = {}
    for sub in layout.subcons:
        if isinstance(sub.subcon, cs.Bytes):
            values[sub.name] = bytes(sub.subcon.length)
        else:
            values[sub.name] = fields.get(sub.name, 0)
    return layout.build(values)


def msi_cap(vectors: int, *, bit64: bool = True, maskable: bool = True) -> CapBytes:
    """MSI with ``vectors`` (power of two, 1..32) messages; acrn-dm's is 64-bit, maskable."""
    if vectors < 1 or vectors > 32 or vectors & (vectors - 1):
        raise CapabilityError(f"MSI message count {vectors} is not a power of two in 1..32")
    mmc = vectors.bit_length() - 1
    control = (mmc << MSI_CTRL_MMC_SHIFT) | (MSI_CTRL_64BIT if bit64 else 0)
    control |= MSI_CTRL_PVM if maskable else 0
    layout = msi_layout(control)
    fields: dict[str, Any] = {"cap_id": CAP_ID_MSI, "next": 0, "control": control,
                              "addr_lo": 0, "data": 0}
    wm: dict[str, int] = {"control": MSI_CTRL_MME_MASK | MSI_CTRL_ENABLE,
                          "addr_lo": 0xFFFF_FFFC, "data": 0xFFFF}
    if bit64:
        fields["addr_hi"] = 0
        wm["addr_hi"] = 0xFFFF_FFFF
    if maskable:
        fields.update(reserved=0, mask=0, pending=0)
        wm["mask"] = (1 << vectors) - 1
    return CapBytes(layout.build(fields), _mask(layout, **wm))


def msix_cap(entries: int, bir: int, table_offset: int = 0,
             pba_offset: int | None = None, pba_bir: int | None = None) -> CapBytes:
    """MSI-X with the table at ``table_offset`` and the PBA (default: acrn-dm's place,
    the table size rounded up to 4 KiB) in BAR ``bir``."""
    if not 1 <= entries <= MSIX_MAX_ENTRIES:
        raise CapabilityError(f"MSI-X table size {entries} outside 1..{MSIX_MAX_ENTRIES}")
    if pba_offset is None:
        pba_offset = table_offset + _roundup(entries * 16, 4096)
    if table_offset & 7 or pba_offset & 7 or not 0 <= bir <= 5:
        raise CapabilityError("MSI-X table/PBA offsets must be 8-byte aligned, BIR 0..5")
    pb = bir if pba_bir is None else pba_bir
    data = MsixCap.build(dict(cap_id=CAP_ID_MSIX, next=0, control=entries - 1,
                              table=table_offset | bir, pba=pba_offset | pb))
    return CapBytes(data, _mask(MsixCap, control=MSIX_CTRL_ENABLE | MSIX_CTRL_FMASK))


def pcie_cap(port_type: int = PCIE_TYPE_ENDPOINT, *, link_caps: int = 0x411,
             link_status: int = 0x11, dev_caps: int = 0) -> CapBytes:
    """A version-2 PCI Express capability; default link gen1 x1 as acrn-dm reports."""
    fields = {s.name: 0 for s in PcieCap.subcons}
    fields.update(cap_id=CAP_ID_PCIE, pcie_caps=0x2 | (port_type << 4), dev_caps=dev_caps,
                  link_caps=link_caps, link_status=link_status)
    wmask = _mask(PcieCap, dev_control=0x79FF, link_control=0x00C3, dev_control2=0x001F)
    w1c = _mask(PcieCap, dev_status=0x000F)
    return CapBytes(PcieCap.build(fields), wmask, w1c)


def pm_cap(*, pmc: int = 0x0003, no_soft_reset: bool = True) -> CapBytes:
    """Power management, version 1.2 (D0 and D3hot); PowerState is writable."""
    pmcsr = 0x0008 if no_soft_reset else 0
    data = PmCap.build(dict(cap_id=CAP_ID_PM, next=0, pmc=pmc, pmcsr=pmcsr, bridge_ext=0,
                            data=0))
    pme = bool(pmc & 0xF800)
    wm = _mask(PmCap, pmcsr=0x0003 | (0x0100 if pme else 0))
    w1c = _mask(PmCap, pmcsr=0x8000 if pme else 0)
    return CapBytes(data, wm, w1c)


def vendor_cap(payload: bytes, wmask_payload: bytes | None = None) -> CapBytes:
    """A raw vendor-specific capability; byte 2 is its length."""
    if len(payload) + 3 > 0xFF:
        raise CapabilityError("vendor capability longer than 255 bytes")
    data = bytes([CAP_ID_VENDOR, 0, len(payload) + 3]) + payload
    wm = bytes(3) + (wmask_payload if wmask_payload is not None else bytes(len(payload)))
    return CapBytes(data, wm)


def virtio_cap(cfg_type: int, bar: int, offset: int, size: int, *,
               notify_off_multiplier: int | None = None, cap_id: int = 0) -> CapBytes:
    """A ``virtio_pci_cap``; the notify variant carries the multiplier and the PCI_CFG
    variant a writable window (bar, offset, length and data are guest-writable there)."""
    base = dict(cap_id=CAP_ID_VENDOR, next=0, cfg_type=cfg_type, bar=bar, id=cap_id,
                padding=b"\0\0", offset=offset, size=size)
    if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
        if notify_off_multiplier is None:
            raise CapabilityError("a virtio notify capability needs notify_off_multiplier")
        data = VirtioNotifyCap.build(dict(base, length=VirtioNotifyCap.sizeof(),
                                          notify_off_multiplier=notify_off_multiplier))
        return CapBytes(data, bytes(len(data)))
    if cfg_type == VIRTIO_PCI_CAP_PCI_CFG:
        data = VirtioPciCfgCap.build(dict(base, length=VirtioPciCfgCap.sizeof(),
                                          pci_cfg_data=0))
        wm = _mask(VirtioPciCfgCap, bar=0xFF, offset=0xFFFF_FFFF, size=0xFFFF_FFFF,
                   pci_cfg_data=0xFFFF_FFFF)
        return CapBytes(data, wm)
    if size > 0xFFFF_FFFF or offset > 0xFFFF_FFFF:
        data = VirtioPciCap64.build(dict(base, length=VirtioPciCap64.sizeof(),
                                         offset=offset & 0xFFFF_FFFF,
                                         size=size & 0xFFFF_FFFF, offset_hi=offset >> 32,
                                         size_hi=size >> 32))
        return CapBytes(data, bytes(len(data)))
    data = VirtioPciCap.build(dict(base, length=VirtioPciCap.sizeof()))
    return CapBytes(data, bytes(len(data)))


def add_capability(space: pc.ConfigSpace, cap: CapBytes) -> int:
    """Append ``cap`` to the chain of ``space`` (starting at 0x40, dword aligned, as
    acrn-dm); ID and next pointer stay read-only. Returns the capability's offset."""
    reallen = _roundup(len(cap.data), 4)
    off = pc.CAP_START if space.cap_last == 0 else space.cap_end
    if off + reallen > pc.STD_SIZE:
        raise CapabilityError(f"no room for a {len(cap.data)}-byte capability at {off:#x}")
    if space.cap_last == 0:
        space.set8(pc.CAP_PTR, off)
        space.set_status_bits(pc.STATUS_CAP_LIST, True)
    else:
        space.set8(space.cap_last + 1, off)
    space.set_bytes(off, cap.data)
    space.set8(off + 1, 0)
    space.wmask[off : off + len(cap.wmask)] = cap.wmask
    if cap.w1c:
        space.w1cmask[off : off + len(cap.w1c)] = cap.w1c
    space.wmask[off] = space.wmask[off + 1] = 0
    space.w1cmask[off] = space.w1cmask[off + 1] = 0
    space.cap_last = off
    space.cap_end = off + reallen
    return off


# --- walker ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capability:
    """One entry of a standard capability chain."""

    offset: int
    cap_id: int
    next: int
    #: bytes the structure occupies when the ID is known, else None
    length: int | None
    #: the parsed structure (a construct Container) when the ID is known, else None
    fields: Any = None


@dataclass(frozen=True)
class ExtCapability:
    """One entry of the PCI Express extended capability chain (offset >= 0x100)."""

    offset: int
    cap_id: int
    version: int
    next: int


def _cap_layout(cfg: bytes, off: int, cap_id: int) -> Struct | None:
    if cap_id == CAP_ID_PM:
        return PmCap
    if cap_id == CAP_ID_MSI:
        return msi_layout(int.from_bytes(cfg[off + 2 : off + 4], "little"))
    if cap_id == CAP_ID_MSIX:
        return MsixCap
    if cap_id == CAP_ID_PCIE:
        return PcieCap if cfg[off + 2] & 0xF >= 2 else PcieCapV1
    if cap_id == CAP_ID_VENDOR:
        length = cfg[off + 2]
        if length < 3:
            raise CapabilityError(f"vendor capability at {off:#x} has length {length} < 3")
        vendor = int.from_bytes(cfg[0:2], "little")
        if vendor == VIRTIO_VENDOR_ID and length >= VirtioPciCap.sizeof():
            cfg_type = cfg[off + 3]
            if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG and length >= 20:
                return VirtioNotifyCap
            if cfg_type == VIRTIO_PCI_CAP_PCI_CFG and length >= 20:
                return VirtioPciCfgCap
            if cfg_type == VIRTIO_PCI_CAP_SHARED_MEMORY_CFG and length >= 24:
                return VirtioPciCap64
            return VirtioPciCap
        return VendorCap
    return None


def walk(config: bytes | bytearray | memoryview) -> list[Capability]:
    """Parse the standard capability chain of any config space (64, 256 or 4096 bytes)."""
    cfg = bytes(config)
    if len(cfg) < 64:
        raise CapabilityError(f"config space of {len(cfg)} bytes is shorter than a header")
    status = int.from_bytes(cfg[pc.STATUS : pc.STATUS + 2], "little")
    if not status & pc.STATUS_CAP_LIST:
        return []
    limit = min(len(cfg), pc.STD_SIZE)
    ptr_off = 0x14 if cfg[pc.HEADER_TYPE] & 0x7F == 2 else pc.CAP_PTR
    ptr = cfg[ptr_off] & 0xFC
    seen: set[int] = set()
    caps: list[Capability] = []
    while ptr:
        if ptr < pc.CAP_START or ptr + 2 > limit:
            raise CapabilityError(f"capability pointer {ptr:#x} outside 0x40..{limit - 2:#x}")
        if ptr in seen:
            raise CapabilityError(f"capability chain loops back to {ptr:#x}")
        seen.add(ptr)
        cap_id, nxt = cfg[ptr], cfg[ptr + 1] & 0xFC
        layout = _cap_layout(cfg, ptr, cap_id) if ptr + 4 <= limit else None
        fields = None
        length = None
        if layout is not None:
            length = cfg[ptr + 2] if cap_id == CAP_ID_VENDOR else layout.sizeof()
            if ptr + length > limit:
                raise CapabilityError(
                    f"capability {cap_id:#04x} at {ptr:#x} ({length} bytes) runs past {limit:#x}"
                )
            try:
                fields = layout.parse(cfg[ptr : ptr + length])
            except cs.ConstructError as e:
                raise CapabilityError(f"capability {cap_id:#04x} at {ptr:#x}: {e}") from None
        caps.append(Capability(ptr, cap_id, nxt, length, fields))
        ptr = nxt
    return caps


def walk_extended(config: bytes | bytearray | memoryview) -> list[ExtCapability]:
    """Parse the extended chain at 0x100; empty when the buffer has no extended space or
    the header reads 0 / all-ones (what acrn-dm answers for emulated functions)."""
    cfg = bytes(config)
    if len(cfg) < pc.STD_SIZE + 4:
        return []
    ptr = pc.STD_SIZE
    seen: set[int] = set()
    caps: list[ExtCapability] = []
    while True:
        header = int.from_bytes(cfg[ptr : ptr + 4], "little")
        if header in (0, 0xFFFF_FFFF) and ptr == pc.STD_SIZE:
            return caps
        if ptr in seen:
            raise CapabilityError(f"extended capability chain loops back to {ptr:#x}")
        seen.add(ptr)
        hdr = ExtCapHeader.parse(cfg[ptr : ptr + 4])
        nxt = hdr.next & 0xFFC
        caps.append(ExtCapability(ptr, hdr.cap_id, hdr.version, nxt))
        if nxt == 0:
            return caps
        if nxt < pc.STD_SIZE or nxt + 4 > len(cfg):
            raise CapabilityError(f"extended capability pointer {nxt:#x} out of bounds")
        ptr = nxt


def find(config: bytes | bytearray | memoryview, cap_id: int) -> Capability | None:
    """The first capability with ``cap_id``, or None."""
    for cap in walk(config):
        if cap.cap_id == cap_id:
            return cap
    return None


def _roundup(n: int, align: int) -> int:
    return (n + align - 1) // align * align


__all__ = [
    "CapabilityError", "Capability", "ExtCapability", "CapBytes", "walk", "walk_extended",
    "find", "add_capability", "msi_cap", "msix_cap", "pcie_cap", "pm_cap", "vendor_cap",
    "virtio_cap", "msi_offsets", "msi_layout",
]
