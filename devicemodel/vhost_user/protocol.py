"""vhost-user wire format (QEMU docs/interop/vhost-user.rst): numbers, header, payloads.

Everything here is pure: bytes in, typed values out, :class:`ProtocolError` for anything
malformed. The front end is a separate process we do not trust to be well-formed, so the
parsers check sizes, counts and ranges before anything is used; the connection is dropped
on the first error. Messages are control plane, parsed with precompiled ``struct`` layouts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum


class ProtocolError(Exception):
    """A malformed or unacceptable message: the back end drops the connection."""


class Req(IntEnum):
    """Front-end request ids."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# Protocol feature bits
PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_RARP = 2
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_MTU = 4
PROTOCOL_F_BACKEND_REQ = 5
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_RESET_DEVICE = 13
PROTOCOL_F_INBAND_NOTIFICATIONS = 14
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
PROTOCOL_F_STATUS = 16

#: The virtio feature bit a back end sets to say it speaks protocol features.
F_PROTOCOL_FEATURES = 1 << 30
#: VHOST_F_LOG_ALL (dirty logging for migration): never offered.
F_LOG_ALL = 1 << 26

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
#: Largest payload we accept: the biggest message we understand (a config space access,
#: 12 + 256 bytes) with room to spare. Anything larger is refused before it is read.
MAX_PAYLOAD = 4096
MAX_FDS = MAX_MEM_REGIONS

VRING_IDX_MASK = 0xFF
VRING_NOFD = 1 << 8

HEADER = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDR = struct.Struct("=IIQQQQ")
MEM_HEADER = struct.Struct("=II")
MEM_REGION = struct.Struct("=QQQQ")
CONFIG_HEADER = struct.Struct("=III")


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True)
class MemRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class ConfigAccess:
    offset: int
    size: int
    flags: int
    data: bytes


def parse_header(data: bytes) -> Header:
    """The 12-byte header; the version must be 1 and the payload size bounded."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"short header ({len(data)} bytes)")
    request, flags, size = HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported protocol version {flags & FLAG_VERSION_MASK}")
    if flags & FLAG_REPLY:
        raise ProtocolError("a front-end request has the reply flag set")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
    return Header(request, flags, size)


def _exact(payload: bytes, layout: struct.Struct, what: str) -> tuple[int, ...]:
    # QEMU sometimes sends more than it must (e.g. a u64 in a vring state); we accept a
    # payload at least as long as the layout, since the header's size says how much it is.
    if len(payload) < layout.size:
        raise ProtocolError(f"{what}: payload of {len(payload)} bytes, need {layout.size}")
    return layout.unpack_from(payload)


def parse_u64(payload: bytes, what: str = "u64") -> int:
    return _exact(payload, U64, what)[0]


def parse_vring_state(payload: bytes) -> tuple[int, int]:
    return _exact(payload, VRING_STATE, "vring state")  # type: ignore[return-value]


def parse_vring_addr(payload: bytes) -> VringAddr:
    return VringAddr(*_exact(payload, VRING_ADDR, "vring address"))


def parse_vring_file(payload: bytes) -> tuple[int, bool]:
    """A kick/call/err payload: (ring index, True if no fd accompanies it)."""
    value = parse_u64(payload, "vring file")
    if value & ~(VRING_IDX_MASK | VRING_NOFD):
        raise ProtocolError(f"vring file payload {value:#x} has unknown bits")
    return value & VRING_IDX_MASK, bool(value & VRING_NOFD)


def parse_mem_table(payload: bytes) -> list[MemRegion]:
    count, _pad = _exact(payload, MEM_HEADER, "memory table")
    if not 1 <= count <= MAX_MEM_REGIONS:
        raise ProtocolError(f"memory table with {count} regions (1..{MAX_MEM_REGIONS})")
    need = MEM_HEADER.size + count * MEM_REGION.size
    if len(payload) < need:
        raise ProtocolError(f"memory table of {count} regions needs {need} bytes")
    regions = []
    for i in range(count):
        gpa, size, uva, off = MEM_REGION.unpack_from(payload, MEM_HEADER.size + i * MEM_REGION.size)
        if size == 0 or gpa + size > 1 << 64 or uva + size > 1 << 64 or off + size > 1 << 63:
            raise ProtocolError(f"memory region {i}: bad range {gpa:#x}+{size:#x}")
        regions.append(MemRegion(gpa, size, uva, off))
    ordered = sorted(regions, key=lambda r: r.guest_addr)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.guest_addr + a.size > b.guest_addr:
            raise ProtocolError(
                f"memory regions at {a.guest_addr:#x} and {b.guest_addr:#x} overlap")
    return regions


def parse_config(payload: bytes, *, with_data: bool) -> ConfigAccess:
    offset, size, flags = _exact(payload, CONFIG_HEADER, "config access")
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"config access {offset}+{size} beyond {MAX_CONFIG_SIZE} bytes")
    data = b""
    if with_data:
        data = bytes(payload[CONFIG_HEADER.size : CONFIG_HEADER.size + size])
        if len(data) != size:
            raise ProtocolError(f"config write of {size} bytes carries {len(data)}")
    return ConfigAccess(offset, size, flags, data)


def encode(request: int, payload: bytes = b"", *, reply: bool = True, need_reply: bool = False
           ) -> bytes:
    """A whole message: header plus payload (our replies; the test front end's requests)."""
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_u64(request: int, value: int, **kw: bool) -> bytes:
    return encode(request, U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF), **kw)


def encode_config(offset: int, flags: int, data: bytes, request: int = Req.GET_CONFIG,
                  **kw: bool) -> bytes:
    return encode(request, CONFIG_HEADER.pack(offset, len(data), flags) + data, **kw)
