"""What the loaders share: reading an image with clear errors, the flat GDT, e820 bytes."""

from __future__ import annotations

import os
import stat
import struct

from ..errors import ConfigError
from ..hsm.base import VcpuRegs
from ..memory import E820Entry, GuestMemoryError, MemoryMap

#: a flat 4 GiB code segment and data segment (base 0, limit 0xFFFFF pages, G, D/B)
FLAT_CODE = 0x00CF9B000000FFFF
FLAT_DATA = 0x00CF93000000FFFF
#: VMX access rights of a flat 32-bit code segment (acrn-dm's cs_ar for bzImage)
CS_AR_FLAT32 = 0xC09B
CR0_PE_ET_NE = 0x31
E820_ENTRY = struct.Struct("<QQI")


def read_image(path: str, what: str, *, limit: int | None = None, minimum: int = 1) -> bytes:
    """The whole file, or a ConfigError that names the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{what} {path}: not a regular file")
            if limit is not None and st.st_size > limit:
                raise ConfigError(f"{what} {path}: {st.st_size} bytes is larger than the "
                                  f"{limit} bytes it may have")
            data = f.read() if limit is None else f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory, not an image file") from None
    except PermissionError:
        raise ConfigError(f"{what} {path}: permission denied") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read: {e.strerror}") from None
    if len(data) < minimum:
        raise ConfigError(f"{what} {path}: the file is {len(data)} bytes, too short to be "
                          f"an image of this kind")
    return data


def write_guest(memory: MemoryMap, gpa: int, data: bytes | memoryview, what: str) -> None:
    """Copy into guest RAM; a range that is not RAM is the user's image being too big."""
    try:
        memory.write(gpa, data)
    except GuestMemoryError:
        raise ConfigError(f"{what} does not fit in guest RAM at {gpa:#x}+{len(data):#x}; "
                          "give the VM more memory (-m)") from None


def zero_guest(memory: MemoryMap, gpa: int, length: int, what: str) -> None:
    try:
        memory.view(gpa, length)[:] = bytes(length)
    except GuestMemoryError:
        raise ConfigError(f"{what} does not fit in guest RAM at {gpa:#x}+{length:#x}; "
                          "give the VM more memory (-m)") from None


def e820_bytes(table: list[E820Entry]) -> bytes:
    return b"".join(E820_ENTRY.pack(e.addr, e.size, e.type) for e in table)


def flat_protected_mode(memory: MemoryMap, gdt_base: int, *, null_entries: int,
                        rip: int) -> VcpuRegs:
    """Write a flat GDT at ``gdt_base`` and return the BSP state of a 32-bit protected
    mode entry with paging off: CS = the code descriptor, DS/ES/SS(/FS/GS) = data."""
    gdt = [0] * null_entries + [FLAT_CODE, FLAT_DATA]
    write_guest(memory, gdt_base, struct.pack(f"<{len(gdt)}Q", *gdt), "the boot GDT")
    code_sel = 8 * null_entries
    data_sel = code_sel + 8
    return VcpuRegs(
        rip=rip,
        rflags=0x2,
        cr0=CR0_PE_ET_NE,
        cs_base=0,
        cs_limit=0xFFFF_FFFF,
        cs_ar=CS_AR_FLAT32,
        cs_sel=code_sel,
        ds_sel=data_sel,
        es_sel=data_sel,
        ss_sel=data_sel,
        gdt_base=gdt_base,
        gdt_limit=8 * len(gdt) - 1,
    )
