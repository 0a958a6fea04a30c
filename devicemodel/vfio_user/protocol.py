"""vfio-user wire format (QEMU docs/interop/vfio-user.rst): numbers, header, payloads.

Every message layout is a construct ``Struct`` here: the description of the protocol,
used to parse and build the control messages (VERSION, DMA_MAP, SET_IRQS, ...). The
three layouts that every BAR access goes through (the header, REGION_READ/WRITE and
REGION_WRITE_MULTI's entries) also have a precompiled ``struct.Struct`` twin, because a
construct parse costs about 7 µs even compiled and a guest's register access must not
pay that three times (design.md §6); tests/unit/test_vfio_user_protocol.py checks each
twin against its construct definition.

Everything here is pure: bytes in, typed values out, :class:`Refused` (with the errno
the error reply carries) for anything malformed. A client is a separate process we do
not trust: sizes, counts and ranges are checked before anything is used.
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass
from enum import IntEnum

from construct import Array, Bytes, GreedyBytes, Int16ul, Int32ul, Int64ul, Struct


class Refused(Exception):
    """A request we answer with an error reply (the session goes on)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class Fatal(Exception):
    """A byte stream we can no longer frame: the connection is closed (the server stays).

    ``header`` is set when the header itself arrived, so the client still gets an error
    reply before the close."""

    def __init__(self, message: str, header: Header | None = None) -> None:
        super().__init__(message)
        self.header = header


class Cmd(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# header flags
TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
NO_REPLY = 0x10
ERROR = 0x20

MAJOR = 0
MINOR = 1

# VFIO_DEVICE_FLAGS_*
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1

# VFIO_PCI_*_REGION_INDEX
BAR0_REGION = 0
ROM_REGION = 6
CONFIG_REGION = 7
VGA_REGION = 8
NUM_REGIONS = 9

# VFIO_REGION_INFO_FLAG_*
REGION_READ = 1 << 0
REGION_WRITE = 1 << 1
REGION_MMAP = 1 << 2
REGION_CAPS = 1 << 3

# VFIO_PCI_*_IRQ_INDEX
INTX_IRQ = 0
MSI_IRQ = 1
MSIX_IRQ = 2
ERR_IRQ = 3
REQ_IRQ = 4
NUM_IRQS = 5
IRQ_NAMES = ("INTx", "MSI", "MSI-X", "ERR", "REQ")

# VFIO_IRQ_INFO_*
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3

# VFIO_IRQ_SET_*
SET_DATA_NONE = 1 << 0
SET_DATA_BOOL = 1 << 1
SET_DATA_EVENTFD = 1 << 2
SET_ACTION_MASK = 1 << 3
SET_ACTION_UNMASK = 1 << 4
SET_ACTION_TRIGGER = 1 << 5
SET_DATA_MASK = SET_DATA_NONE | SET_DATA_BOOL | SET_DATA_EVENTFD
SET_ACTION_MASK_ALL = SET_ACTION_MASK | SET_ACTION_UNMASK | SET_ACTION_TRIGGER

# VFIO_USER_F_DMA_REGION_*
DMA_READ_FLAG = 1 << 0
DMA_WRITE_FLAG = 1 << 1

# --- what we offer in VERSION -----------------------------------------------------------
PAGE_SIZE = 4096
#: largest REGION_READ/WRITE ``count`` we accept (and advertise); QEMU's largest is a
#: whole config space at set-up (4 KiB), a guest access is at most 8 bytes
MAX_DATA_XFER = 64 * 1024
#: fds we accept in one message: QEMU sends SET_IRQS eventfds in chunks of this many
MAX_MSG_FDS = 16
#: concurrent DMA mappings (each is an mmap of the client's memory)
MAX_DMA_MAPS = 1024
#: a header plus the largest payload: REGION_WRITE with MAX_DATA_XFER bytes
MAX_MESSAGE = 16 + 16 + MAX_DATA_XFER
#: the VERSION payload's JSON may be long, but not longer than this
MAX_VERSION_JSON = 4096
MULTI_MAX_WRITES = 1024

# --- layouts (construct: the protocol's description) ---------------------------------------
header = Struct(
    "id" / Int16ul,
    "command" / Int16ul,
    "size" / Int32ul,  # the whole message, header included
    "flags" / Int32ul,
    "error" / Int32ul,
)
version = Struct("major" / Int16ul, "minor" / Int16ul, "data" / GreedyBytes)
dma_map = Struct(
    "argsz" / Int32ul, "flags" / Int32ul, "offset" / Int64ul, "address" / Int64ul,
    "size" / Int64ul,
)
dma_unmap = Struct("argsz" / Int32ul, "flags" / Int32ul, "address" / Int64ul, "size" / Int64ul)
device_info = Struct(
    "argsz" / Int32ul, "flags" / Int32ul, "num_regions" / Int32ul, "num_irqs" / Int32ul,
)
region_info = Struct(
    "argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul, "cap_offset" / Int32ul,
    "size" / Int64ul, "offset" / Int64ul,
)
irq_info = Struct("argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul, "count" / Int32ul)
irq_set = Struct(
    "argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul, "start" / Int32ul,
    "count" / Int32ul, "data" / GreedyBytes,
)
region_access = Struct(
    "offset" / Int64ul, "region" / Int32ul, "count" / Int32ul, "data" / GreedyBytes,
)
write_one = Struct(
    "offset" / Int64ul, "region" / Int32ul, "count" / Int32ul, "data" / Bytes(8),
)
write_multi = Struct("wr_cnt" / Int64ul, "wrs" / Array(lambda this: this.wr_cnt, write_one))
dma_access = Struct("address" / Int64ul, "count" / Int64ul, "data" / GreedyBytes)

_COMPILED = {name: layout.compile() for name, layout in (
    ("dma_map", dma_map), ("dma_unmap", dma_unmap), ("device_info", device_info),
    ("region_info", region_info), ("irq_info", irq_info), ("irq_set", irq_set),
    ("version", version))}

# --- the hot-path twins (checked against the construct layouts by a unit test) -----------
HEADER = struct.Struct("<HHIII")
REGION_ACCESS = struct.Struct("<QII")
WRITE_ONE = struct.Struct("<QII8s")
U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Header:
    id: int
    command: int
    size: int
    flags: int
    error: int

    @property
    def kind(self) -> int:
        return self.flags & TYPE_MASK

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & NO_REPLY)


def parse_header(data: bytes | memoryview) -> Header:
    """The 16-byte header. Only its framing is judged here (the session checks the rest):
    a size below 16 cannot be framed at all."""
    if len(data) != HEADER.size:
        raise Fatal(f"short header ({len(data)} bytes)")
    h = Header(*HEADER.unpack(data))
    if h.size < HEADER.size:
        raise Fatal(f"message size {h.size} is smaller than its header", h)
    return h


def reply(h: Header, payload: bytes = b"") -> bytes:
    """The reply to ``h``: same id and command, the reply type, then ``payload``."""
    return HEADER.pack(h.id, h.command, HEADER.size + len(payload), TYPE_REPLY, 0) + payload


def error_reply(h: Header, err: int) -> bytes:
    """An error reply: the header alone, with the Error flag and the errno."""
    return HEADER.pack(h.id, h.command, HEADER.size, TYPE_REPLY | ERROR, err & 0xFFFF_FFFF)


def command(cmd: int, payload: bytes = b"", *, msg_id: int = 0, flags: int = 0) -> bytes:
    """A whole command message (the test client's requests)."""
    return HEADER.pack(msg_id & 0xFFFF, cmd & 0xFFFF, HEADER.size + len(payload),
                       (flags & ~TYPE_MASK) | TYPE_COMMAND, 0) + payload


def _parse(name: str, payload: bytes, what: str, need: int) -> object:
    if len(payload) < need:
        raise Refused(errno.EINVAL, f"{what}: payload of {len(payload)} bytes, need {need}")
    return _COMPILED[name].parse(payload)


# --- VERSION ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    capabilities: dict[str, object]


def parse_version(payload: bytes) -> Version:
    """The client's proposal: two u16s, then optional NUL-terminated JSON."""
    v = _parse("version", payload, "VERSION", 4)
    raw = bytes(v.data)  # type: ignore[attr-defined]
    caps: dict[str, object] = {}
    if raw:
        if len(raw) > MAX_VERSION_JSON:
            raise Refused(errno.E2BIG, f"VERSION: {len(raw)} bytes of JSON")
        text = raw.split(b"\0", 1)[0]
        try:
            doc = json.loads(text.decode("utf-8")) if text.strip() else {}
        except (UnicodeDecodeError, ValueError) as e:
            raise Refused(errno.EINVAL, f"VERSION: capabilities are not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise Refused(errno.EINVAL, "VERSION: the version data is not a JSON object")
        got = doc.get("capabilities", {})
        if not isinstance(got, dict):
            raise Refused(errno.EINVAL, "VERSION: 'capabilities' is not an object")
        caps = got
    return Version(v.major, v.minor, caps)  # type: ignore[attr-defined]


def version_payload(major: int, minor: int, capabilities: dict[str, object]) -> bytes:
    doc = json.dumps({"capabilities": capabilities}, separators=(",", ":")).encode()
    return version.build({"major": major, "minor": minor, "data": doc + b"\0"})


# --- DMA ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DmaMap:
    flags: int
    offset: int
    address: int
    size: int


def parse_dma_map(payload: bytes) -> DmaMap:
    m = _parse("dma_map", payload, "DMA_MAP", dma_map.sizeof())
    return DmaMap(m.flags, m.offset, m.address, m.size)  # type: ignore[attr-defined]


def parse_dma_unmap(payload: bytes) -> tuple[int, int, int, int]:
    """(argsz, flags, address, size)."""
    m = _parse("dma_unmap", payload, "DMA_UNMAP", dma_unmap.sizeof())
    return m.argsz, m.flags, m.address, m.size  # type: ignore[attr-defined]


def dma_unmap_payload(argsz: int, flags: int, address: int, size: int) -> bytes:
    return dma_unmap.build({"argsz": argsz, "flags": flags, "address": address, "size": size})


def dma_map_payload(flags: int, offset: int, address: int, size: int) -> bytes:
    return dma_map.build({"argsz": dma_map.sizeof(), "flags": flags, "offset": offset,
                          "address": address, "size": size})


# --- device, region and IRQ info ------------------------------------------------------------
def parse_argsz(payload: bytes, what: str, layout_name: str, need: int) -> object:
    return _parse(layout_name, payload, what, need)


def device_info_payload(flags: int, num_regions: int, num_irqs: int) -> bytes:
    return device_info.build({"argsz": device_info.sizeof(), "flags": flags,
                              "num_regions": num_regions, "num_irqs": num_irqs})


def region_info_payload(index: int, flags: int, size: int, offset: int = 0) -> bytes:
    return region_info.build({"argsz": region_info.sizeof(), "flags": flags, "index": index,
                              "cap_offset": 0, "size": size, "offset": offset})


def irq_info_payload(index: int, flags: int, count: int) -> bytes:
    return irq_info.build({"argsz": irq_info.sizeof(), "flags": flags, "index": index,
                           "count": count})


@dataclass(frozen=True)
class IrqSet:
    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes

    @property
    def data_kind(self) -> int:
        return self.flags & SET_DATA_MASK

    @property
    def action(self) -> int:
        return self.flags & SET_ACTION_MASK_ALL


IRQ_SET_HEADER = 20


def parse_irq_set(payload: bytes) -> IrqSet:
    s = _parse("irq_set", payload, "SET_IRQS", IRQ_SET_HEADER)
    return IrqSet(s.argsz, s.flags, s.index, s.start, s.count,  # type: ignore[attr-defined]
                  bytes(s.data))  # type: ignore[attr-defined]


def irq_set_payload(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    return irq_set.build({"argsz": IRQ_SET_HEADER + len(data), "flags": flags, "index": index,
                          "start": start, "count": count, "data": data})


# --- region access (hot path: struct) ------------------------------------------------------
def parse_region_access(payload: bytes, *, write: bool) -> tuple[int, int, int, bytes]:
    """(offset, region, count, data); a write carries exactly ``count`` bytes."""
    if len(payload) < REGION_ACCESS.size:
        raise Refused(errno.EINVAL, f"region access: payload of {len(payload)} bytes")
    offset, region, count = REGION_ACCESS.unpack_from(payload)
    if count > MAX_DATA_XFER:
        raise Refused(errno.E2BIG, f"region access of {count} bytes (max {MAX_DATA_XFER})")
    data = b""
    if write:
        data = payload[REGION_ACCESS.size :]
        if len(data) != count:
            raise Refused(errno.EINVAL, f"region write of {count} bytes carries {len(data)}")
    return offset, region, count, data


def region_access_payload(offset: int, region: int, count: int, data: bytes = b"") -> bytes:
    return REGION_ACCESS.pack(offset, region, count) + data


def parse_write_multi(payload: bytes) -> list[tuple[int, int, int, bytes]]:
    """REGION_WRITE_MULTI: (offset, region, count, data) for each write (count <= 8)."""
    if len(payload) < U64.size:
        raise Refused(errno.EINVAL, "REGION_WRITE_MULTI without a count")
    (n,) = U64.unpack_from(payload)
    if n > MULTI_MAX_WRITES or len(payload) != U64.size + n * WRITE_ONE.size:
        raise Refused(errno.EINVAL, f"REGION_WRITE_MULTI of {n} writes in {len(payload)} bytes")
    out = []
    for i in range(n):
        offset, region, count, data = WRITE_ONE.unpack_from(payload, U64.size + i * WRITE_ONE.size)
        if not 1 <= count <= 8:
            raise Refused(errno.EINVAL, f"REGION_WRITE_MULTI write {i} of {count} bytes")
        out.append((offset, region, count, data[:count]))
    return out


def write_multi_payload(writes: list[tuple[int, int, bytes]]) -> bytes:
    return U64.pack(len(writes)) + b"".join(
        WRITE_ONE.pack(off, region, len(data), data.ljust(8, b"\0"))
        for off, region, data in writes)


__all__ = ["Cmd", "Fatal", "Header", "Refused"]
