"""Synthetic guest images for the loaders: bzImage, ELF32/ELF64, a multiboot header."""

from __future__ import annotations

import struct

MB_MAGIC = 0x1BADB002


def multiboot_header(flags: int = 0x2, extra: bytes = b"") -> bytes:
    return struct.pack("<III", MB_MAGIC, flags, (-(MB_MAGIC + flags)) & 0xFFFF_FFFF) + extra


def make_elf32(code: bytes, *, load: int = 0x100000, entry: int | None = None,
               bss: int = 0, multiboot: bytes | None = None, machine: int = 3) -> bytes:
    """One PT_LOAD segment: [multiboot header] + code at ``load``."""
    payload = (multiboot or b"") + code
    phoff, data_off = 52, 0x1000
    ehdr = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIIIIIHHHHHH", 2, machine, 1,
                        entry if entry is not None else load + len(multiboot or b""),
                        phoff, 0, 0, 52, 32, 1, 40, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, data_off, load, load, len(payload),
                       len(payload) + bss, 7, 0x1000)
    img = bytearray(ehdr + phdr)
    img += bytes(data_off - len(img))
    return bytes(img + payload)


def make_elf64(code: bytes, *, vaddr: int, paddr: int, entry: int) -> bytes:
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0x1000, vaddr, paddr, len(code), len(code), 0x1000)
    img = bytearray(ehdr + phdr)
    img += bytes(0x1000 - len(img))
    return bytes(img + code)


def make_bzimage(setup_sects: int = 4, payload: bytes = b"\x90" * 4096,
                 version: int = 0x020F, cmdline_size: int = 2047) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = 0x66  # jump over the header: the header ends at 0x268
    struct.pack_into("<I", setup, 0x202, 0x53726448)
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    return bytes(setup) + payload
