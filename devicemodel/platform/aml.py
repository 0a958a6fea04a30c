"""A small AML encoder: just the terms the DSDT needs, as bytes (ACPI 6.x §20).

acrn-dm writes ASL text and runs iasl at run time; we emit the byte stream directly, so
no compiler is needed on the host.  Each function returns the encoding of one term;
composites take already-encoded children.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

ZERO_OP = b"\x00"
ONE_OP = b"\x01"
ONES_OP = b"\xff"
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
EXT_PREFIX = 0x5B
DEVICE_OP = 0x82
OPREGION_OP = 0x80
FIELD_OP = 0x81
STORE_OP = 0x70
RETURN_OP = 0xA4
IF_OP = 0xA0
ELSE_OP = 0xA1
ARG0 = b"\x68"
LOCAL0 = b"\x60"
NULL_TARGET = b"\x00"

REGION_SYSTEM_MEMORY = 0x00
REGION_SYSTEM_IO = 0x01
REGION_PCI_CONFIG = 0x02


def pkg_length(length: int, *, include_self: bool = True) -> bytes:
    """PkgLength: 1-4 bytes; for a package the count includes the PkgLength bytes."""
    for extra in range(4):
        total = length + (extra + 1 if include_self else 0)
        limit = 0x40 if extra == 0 else 1 << (4 + 8 * extra)
        if total < limit:
            break
    else:
        raise ValueError(f"AML package too long: {length} bytes")
    if extra == 0:
        return bytes([total])
    out = [(extra << 6) | (total & 0x0F)]
    rest = total >> 4
    for _ in range(extra):
        out.append(rest & 0xFF)
        rest >>= 8
    return bytes(out)


def _seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_"):
        raise ValueError(f"bad AML name segment {seg!r}")
    if not all(c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(name: str) -> bytes:
    """``\\_SB.PCI0``, ``^FOO``, ``_HID`` → NameString bytes."""
    prefix = b""
    while name.startswith(("\\", "^")):
        prefix += name[0].encode()
        name = name[1:]
    segs = [s for s in name.split(".") if s] if name else []
    if not segs:
        return prefix + b"\x00"
    body = b"".join(_seg(s) for s in segs)
    if len(segs) == 1:
        return prefix + body
    if len(segs) == 2:
        return prefix + b"\x2e" + body
    return prefix + b"\x2f" + bytes([len(segs)]) + body


def integer(value: int) -> bytes:
    """The shortest integer encoding (ZeroOp/OneOp/Byte/Word/DWord/QWord)."""
    if value < 0 or value > 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError(f"AML integer out of range: {value}")
    if value == 0:
        return ZERO_OP
    if value == 1:
        return ONE_OP
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def eisa_id(text: str) -> bytes:
    """EisaId("PNP0A03") → its compressed DWord."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"bad EISA id {text!r}")
    value = (
        ((ord(text[0]) - 0x40) << 26)
        | ((ord(text[1]) - 0x40) << 21)
        | ((ord(text[2]) - 0x40) << 16)
        | int(text[3:], 16)
    )
    swapped = struct.unpack(">I", struct.pack("<I", value))[0]
    return bytes([DWORD_PREFIX]) + struct.pack("<I", swapped)


def name(name_: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(name_) + value


def _pkg(op: bytes, body: bytes) -> bytes:
    return op + pkg_length(len(body)) + body


def scope(name_: str, *terms: bytes) -> bytes:
    return _pkg(bytes([SCOPE_OP]), name_string(name_) + b"".join(terms))


def device(name_: str, *terms: bytes) -> bytes:
    return _pkg(bytes([EXT_PREFIX, DEVICE_OP]), name_string(name_) + b"".join(terms))


def method(name_: str, nargs: int, *terms: bytes, serialized: bool = False) -> bytes:
    flags = (nargs & 7) | (0x08 if serialized else 0)
    return _pkg(bytes([METHOD_OP]), name_string(name_) + bytes([flags]) + b"".join(terms))


def package(elements: Iterable[bytes]) -> bytes:
    items = list(elements)
    if len(items) > 255:
        raise ValueError("AML package with more than 255 elements")
    return _pkg(bytes([PACKAGE_OP]), bytes([len(items)]) + b"".join(items))


def buffer(data: bytes) -> bytes:
    return _pkg(bytes([BUFFER_OP]), integer(len(data)) + data)


def ret(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


def store(source: bytes, target: bytes) -> bytes:
    return bytes([STORE_OP]) + source + target


def if_(predicate: bytes, *terms: bytes) -> bytes:
    return _pkg(bytes([IF_OP]), predicate + b"".join(terms))


def else_(*terms: bytes) -> bytes:
    return _pkg(bytes([ELSE_OP]), b"".join(terms))


def and_(a: bytes, b: bytes, target: bytes = NULL_TARGET) -> bytes:
    return b"\x7b" + a + b + target


def shift_left(a: bytes, b: bytes, target: bytes = NULL_TARGET) -> bytes:
    return b"\x79" + a + b + target


def lless(a: bytes, b: bytes) -> bytes:
    return b"\x95" + a + b


def lequal(a: bytes, b: bytes) -> bytes:
    return b"\x93" + a + b


def decrement(target: bytes) -> bytes:
    return b"\x76" + target


def find_set_right_bit(a: bytes, target: bytes = NULL_TARGET) -> bytes:
    return b"\x82" + a + target


def create_word_field(source: bytes, index: bytes, name_: str) -> bytes:
    return b"\x8b" + source + index + name_string(name_)


def call(method_: str, *args: bytes) -> bytes:
    """Invoke a method defined earlier in the table (its arity fixes how args parse)."""
    return name_string(method_) + b"".join(args)


def op_region(name_: str, space: int, offset: int, length: int) -> bytes:
    return (bytes([EXT_PREFIX, OPREGION_OP]) + name_string(name_) + bytes([space])
            + integer(offset) + integer(length))


def field(region: str, fields: Iterable[tuple[str | None, int]], flags: int = 0) -> bytes:
    """Field (region, AnyAcc, NoLock, Preserve) {...}; a ``None`` name is a gap of that
    many bits (what Offset () compiles to)."""
    body = name_string(region) + bytes([flags])
    for fname, bits in fields:
        if fname is None:
            body += b"\x00" + pkg_length(bits, include_self=False)
        else:
            body += _seg(fname) + pkg_length(bits, include_self=False)
    return _pkg(bytes([EXT_PREFIX, FIELD_OP]), body)


# --- resource descriptors (ACPI §6.4) -------------------------------------------------------
def res_io(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length)."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 0x01, length)


def res_irq_noflags(*irqs: int) -> bytes:
    mask = 0
    for irq in irqs:
        mask |= 1 << irq
    return struct.pack("<BH", 0x22, mask)


def res_irq(irqs: Iterable[int], *, level: bool = True, active_low: bool = True,
            shared: bool = True) -> bytes:
    """IRQ (Level|Edge, ActiveLow|ActiveHigh, Shared|Exclusive) {irqs}."""
    mask = 0
    for irq in irqs:
        mask |= 1 << irq
    flags = (0 if level else 0x01) | (0x08 if active_low else 0) | (0x10 if shared else 0)
    return struct.pack("<BHB", 0x23, mask, flags)


def res_memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", 0x86, 9, 1 if writable else 0, base, length)


_PRODUCER_FIXED = 0x0C  # ResourceProducer, PosDecode, MinFixed, MaxFixed


def res_word_bus(lo: int, hi: int) -> bytes:
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 2, _PRODUCER_FIXED, 0, 0, lo, hi, 0,
                       hi - lo + 1)


def res_word_io(lo: int, hi: int) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, TypeStatic)."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, 1, _PRODUCER_FIXED, 0x03, 0, lo, hi, 0,
                       hi - lo + 1)


def res_dword_memory(lo: int, hi: int) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, RW)."""
    return struct.pack("<BHBBBIIIII", 0x87, 23, 0, _PRODUCER_FIXED, 0x01, 0, lo, hi, 0,
                       hi - lo + 1)


def res_qword_memory(lo: int, hi: int) -> bytes:
    return struct.pack("<BHBBBQQQQQ", 0x8A, 43, 0, _PRODUCER_FIXED, 0x01, 0, lo, hi, 0,
                       hi - lo + 1)


def resource_template(*descriptors: bytes) -> bytes:
    """A ResourceTemplate buffer, closed with an EndTag (checksum 0 = "not checked")."""
    return buffer(b"".join(descriptors) + b"\x79\x00")
