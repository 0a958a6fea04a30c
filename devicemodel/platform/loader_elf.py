"""``-E image``: an ELF32/ELF64 image (PT_LOAD segments at their physical addresses) or a
multiboot image, started the way a multiboot v1 loader starts it.

Machine state (multiboot 0.6.96 §3.2): 32-bit protected mode, paging off, CS a flat
4 GiB code segment, DS/ES/SS/FS/GS a flat data segment, EAX = 0x2BADB002 and, when the
image has a multiboot header (searched in its first 8 KiB), EBX = the info block with
mem_lower/mem_upper, the e820 map, the ``-B`` command line and our name.  A header with
the a.out kludge (flag 16) loads a non-ELF image by its address fields.  Placement as
acrn-dm: info at 0x20000, GDT 64 KiB below the top of low memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ConfigError
from ..hsm.base import VcpuRegs
from ..memory import GuestMemory, KiB, MiB
from .loader_common import flat_protected_mode, read_image, write_guest, zero_guest

MB_HEADER_MAGIC = 0x1BADB002
MB_BOOT_MAGIC = 0x2BADB002
MB_SEARCH = 8 * KiB
MB_PAGE_ALIGN = 1 << 0
MB_MEMORY_INFO = 1 << 1
MB_VIDEO_MODE = 1 << 2
MB_AOUT_KLUDGE = 1 << 16
MB_SUPPORTED_REQUIRED = MB_PAGE_ALIGN | MB_MEMORY_INFO

MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MEM_MAP = 1 << 6
MBI_LOADER_NAME = 1 << 9

MBI_BASE = 0x20000
MBI_MMAP = MBI_BASE + 0x100
MBI_CMDLINE_AT = MBI_BASE + 0x400
MBI_NAME_AT = MBI_BASE + 0xC00
MBI_END = MBI_BASE + 0x1000
CMDLINE_MAX = MBI_NAME_AT - MBI_CMDLINE_AT
LOADER_NAME = b"acrn-pydm\0"
GDT_BELOW_TOP = 64 * KiB

EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1


@dataclass(frozen=True)
class Segment:
    file_offset: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


@dataclass(frozen=True)
class Image:
    """What to copy where, and where to start."""

    segments: list[tuple[int, bytes, int]]  # (paddr, bytes, memsz)
    entry: int
    multiboot: MultibootHeader | None


def find_multiboot(data: bytes, path: str) -> MultibootHeader | None:
    """The multiboot header in the first 8 KiB (4-byte aligned, checksum holds)."""
    limit = min(len(data), MB_SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, csum = struct.unpack_from("<III", data, off)
        if magic != MB_HEADER_MAGIC or (magic + flags + csum) & 0xFFFF_FFFF:
            continue
        if flags & MB_AOUT_KLUDGE:
            if off + 32 > len(data):
                raise ConfigError(f"-E {path}: the multiboot header at {off:#x} announces "
                                  "address fields (flag 16) but the file ends before them")
            return MultibootHeader(off, flags, *struct.unpack_from("<5I", data, off + 12))
        return MultibootHeader(off, flags)
    return None


def parse_elf(data: bytes, path: str) -> tuple[list[Segment], int]:
    """PT_LOAD segments and the entry point; ConfigError for anything malformed."""
    what = f"-E {path}"
    if len(data) < 52:
        raise ConfigError(f"{what}: {len(data)} bytes is too short for an ELF header")
    ei_class, ei_data = data[4], data[5]
    if ei_data != 1:
        raise ConfigError(f"{what}: a big-endian ELF cannot run on x86")
    if ei_class == 1:
        (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize,
         e_phnum) = struct.unpack_from("<HHIIIIIHHH", data, 16)
        ph_fmt, min_ent = "<IIIIIIII", 32
    elif ei_class == 2:
        if len(data) < 64:
            raise ConfigError(f"{what}: {len(data)} bytes is too short for an ELF64 header")
        (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize,
         e_phnum) = struct.unpack_from("<HHIQQQIHHH", data, 16)
        ph_fmt, min_ent = "<IIQQQQQQ", 56
    else:
        raise ConfigError(f"{what}: unknown ELF class {ei_class} (neither 32 nor 64 bit)")
    if e_machine not in (EM_386, EM_X86_64):
        raise ConfigError(f"{what}: ELF machine {e_machine} is not x86 (3) or x86-64 (62)")
    if e_type not in (2, 3):
        raise ConfigError(f"{what}: ELF type {e_type} is not an executable")
    if e_phnum == 0:
        raise ConfigError(f"{what}: the ELF has no program headers")
    if e_phentsize < min_ent:
        raise ConfigError(f"{what}: program header entries of {e_phentsize} bytes are "
                          f"smaller than {min_ent}")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise ConfigError(f"{what}: the program headers ({e_phnum} at {e_phoff:#x}) run "
                          "past the end of the file: truncated image?")
    segments = []
    for i in range(e_phnum):
        fields = struct.unpack_from(ph_fmt, data, e_phoff + i * e_phentsize)
        if ei_class == 1:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = fields[:6]
        else:
            p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = fields[:7]
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise ConfigError(f"{what}: segment {i} has more file bytes ({p_filesz:#x}) "
                              f"than memory bytes ({p_memsz:#x})")
        if p_offset + p_filesz > len(data):
            raise ConfigError(f"{what}: segment {i} ({p_filesz:#x} bytes at file offset "
                              f"{p_offset:#x}) runs past the end of the file")
        segments.append(Segment(p_offset, p_paddr, p_vaddr, p_filesz, p_memsz))
    if not segments:
        raise ConfigError(f"{what}: the ELF has no loadable (PT_LOAD) segment")
    entry = e_entry
    for seg in segments:  # an entry given as a virtual address: translate it
        if seg.vaddr != seg.paddr and seg.vaddr <= e_entry < seg.vaddr + seg.memsz:
            entry = e_entry - seg.vaddr + seg.paddr
            break
    return segments, entry


def _aout_image(data: bytes, mb: MultibootHeader, path: str) -> Image:
    what = f"-E {path}"
    if mb.load_addr > mb.header_addr:
        raise ConfigError(f"{what}: multiboot load_addr {mb.load_addr:#x} is above "
                          f"header_addr {mb.header_addr:#x}")
    start = mb.offset - (mb.header_addr - mb.load_addr)
    if start < 0:
        raise ConfigError(f"{what}: multiboot header_addr/load_addr put the image start "
                          "before the beginning of the file")
    if mb.load_end_addr:
        if mb.load_end_addr < mb.load_addr:
            raise ConfigError(f"{what}: multiboot load_end_addr is below load_addr")
        length = mb.load_end_addr - mb.load_addr
        if start + length > len(data):
            raise ConfigError(f"{what}: multiboot load_end_addr asks for {length:#x} bytes "
                              "but the file is shorter")
    else:
        length = len(data) - start
    memsz = length
    if mb.bss_end_addr:
        if mb.bss_end_addr < mb.load_addr + length:
            raise ConfigError(f"{what}: multiboot bss_end_addr is below the loaded image")
        memsz = mb.bss_end_addr - mb.load_addr
    return Image([(mb.load_addr, data[start : start + length], memsz)], mb.entry_addr, mb)


def parse_image(data: bytes, path: str) -> Image:
    mb = find_multiboot(data, path)
    if mb is not None and mb.flags & 0xFFFF & ~MB_SUPPORTED_REQUIRED:
        missing = "a video mode" if mb.flags & MB_VIDEO_MODE else "unknown features"
        raise ConfigError(f"-E {path}: the multiboot header requires {missing} "
                          f"(flags {mb.flags:#x}), which this loader does not provide")
    if data[:4] == b"\x7fELF":
        segments, entry = parse_elf(data, path)
        return Image([(s.paddr, data[s.file_offset : s.file_offset + s.filesz], s.memsz)
                      for s in segments], entry, mb)
    if mb is not None and mb.flags & MB_AOUT_KLUDGE:
        return _aout_image(data, mb, path)
    raise ConfigError(f"-E {path}: neither an ELF file nor a multiboot image with load "
                      "addresses (no \\x7fELF magic, no multiboot header with flag 16 in "
                      "the first 8 KiB)")


def _check_placement(image: Image, memory: GuestMemory, gdt: int, path: str) -> None:
    reserved = [(gdt, gdt + 24, "the boot GDT"),
                (0xA0000, 0x100000, "the legacy video and BIOS area (ACPI tables)")]
    if image.multiboot is not None:
        reserved.append((MBI_BASE, MBI_END, "the multiboot information"))
    for paddr, _, memsz in image.segments:
        end = paddr + memsz
        if end > memory.lowmem:
            raise ConfigError(f"-E {path}: a segment at {paddr:#x}+{memsz:#x} does not fit "
                              f"in the {memory.lowmem // MiB} MiB of low memory; give the VM "
                              "more (-m) or link the image lower")
        for lo, hi, name in reserved:
            if paddr < hi and lo < end:
                raise ConfigError(f"-E {path}: a segment at {paddr:#x}+{memsz:#x} overlaps "
                                  f"{name} at {lo:#x}")
    if not 0 <= image.entry < 1 << 32:
        raise ConfigError(f"-E {path}: entry point {image.entry:#x} is not a 32-bit "
                          "physical address; the image starts in 32-bit protected mode")


def _write_multiboot_info(memory: GuestMemory, bootargs: str | None, mem_top: int) -> None:
    table = memory.e820()
    mmap = b"".join(struct.pack("<IQQI", 20, e.addr, e.size, e.type) for e in table)
    flags = MBI_MEMORY | MBI_MEM_MAP | MBI_LOADER_NAME
    info = bytearray(0x100)
    struct.pack_into("<III", info, 0, 0, 640, (mem_top - MiB) // KiB)
    struct.pack_into("<II", info, 44, len(mmap), MBI_MMAP)
    struct.pack_into("<I", info, 64, MBI_NAME_AT)
    zero_guest(memory, MBI_BASE, MBI_END - MBI_BASE, "the multiboot information")
    if bootargs is not None:
        args = bootargs.encode() + b"\0"
        if len(args) > CMDLINE_MAX:
            raise ConfigError(f"-B: the command line is {len(args) - 1} bytes; at most "
                              f"{CMDLINE_MAX - 1} fit")
        write_guest(memory, MBI_CMDLINE_AT, args, "the command line")
        struct.pack_into("<I", info, 16, MBI_CMDLINE_AT)
        flags |= MBI_CMDLINE
    struct.pack_into("<I", info, 0, flags)
    write_guest(memory, MBI_MMAP, mmap, "the multiboot memory map")
    write_guest(memory, MBI_NAME_AT, LOADER_NAME, "the boot loader name")
    write_guest(memory, MBI_BASE, bytes(info), "the multiboot information")


def load_elf(memory: GuestMemory, path: str, bootargs: str | None) -> VcpuRegs:
    data = read_image(path, "-E", minimum=4)
    image = parse_image(data, path)
    gdt = memory.lowmem - GDT_BELOW_TOP
    _check_placement(image, memory, gdt, path)
    for paddr, raw, memsz in image.segments:
        zero_guest(memory, paddr, memsz, f"-E {path}")
        write_guest(memory, paddr, raw, f"-E {path}")
    regs = flat_protected_mode(memory, gdt, null_entries=1, rip=image.entry)
    regs.fs_sel = regs.gs_sel = regs.ds_sel
    regs.gprs = {"rax": MB_BOOT_MAGIC}
    if image.multiboot is not None:
        _write_multiboot_info(memory, bootargs, gdt)
        regs.gprs["rbx"] = MBI_BASE
    return regs
