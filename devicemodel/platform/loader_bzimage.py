"""``-k bzImage [-B cmdline] [-r initrd]``: the Linux x86 boot protocol's 32-bit entry,
with acrn-dm's placement (acrn-facts §3.3).

The whole file goes to 16 MiB and the BSP starts at 16 MiB + setup size, in flat 32-bit
protected mode with ESI = the zero page.  At the top of lowmem (from the end): zero page
(−4 KiB), bootargs (−8 KiB, up to 2 KiB), the initrd below those (page aligned, 8 KiB
clear of the end), and the GDT 2 KiB below the initrd.  The zero page carries the setup
header copied from the image, the loader fields, and the e820 table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ConfigError
from ..hsm.base import VcpuRegs
from ..memory import GuestMemory, KiB, MiB
from .loader_common import e820_bytes, flat_protected_mode, read_image, write_guest, zero_guest

KERNEL_LOAD = 16 * MiB
ZEROPAGE_SIZE = 4 * KiB
BOOTARGS_MAX = 2 * KiB  # the gap between the bootargs and the entry area
HDRS_MAGIC = 0x53726448  # "HdrS"
BOOT_FLAG = 0xAA55
LOADED_HIGH = 0x01
QUIET_FLAG = 0x20
LOADER_TYPE_UNDEFINED = 0xFF
E820_MAX = 128

# setup header / zero page offsets (Documentation/arch/x86/boot.rst)
OFF_E820_ENTRIES = 0x1E8
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_CMDLINE_SIZE = 0x238
OFF_E820_TABLE = 0x2D0
SETUP_HEADER_MAX_END = 0x280
MIN_FILE = 0x250


def _roundup(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class BzImageLayout:
    zeropage: int
    bootargs: int
    ramdisk: int
    gdt: int
    entry: int


def layout(lowmem: int, ramdisk_size: int, setup_size: int) -> BzImageLayout:
    """acrn-dm's addresses for a given lowmem and initrd size."""
    ramdisk_area = _roundup(ramdisk_size + 8 * KiB, 4 * KiB)
    return BzImageLayout(
        zeropage=lowmem - 4 * KiB,
        bootargs=lowmem - 8 * KiB,
        ramdisk=lowmem - ramdisk_area,
        gdt=lowmem - ramdisk_area - 2 * KiB,
        entry=KERNEL_LOAD + setup_size,
    )


def check_header(kernel: bytes, path: str) -> tuple[int, int]:
    """Validate the boot protocol header; returns (setup size in bytes, protocol version)."""
    what = f"-k {path}"
    if len(kernel) < MIN_FILE:
        raise ConfigError(f"{what}: {len(kernel)} bytes is too short for a bzImage")
    (boot_flag,) = struct.unpack_from("<H", kernel, OFF_BOOT_FLAG)
    (magic,) = struct.unpack_from("<I", kernel, OFF_HEADER)
    if boot_flag != BOOT_FLAG or magic != HDRS_MAGIC:
        raise ConfigError(f"{what}: not a bzImage (no 0xAA55 boot flag and \"HdrS\" "
                          "header at 0x1FE/0x202); an ELF kernel is loaded with -E")
    (version,) = struct.unpack_from("<H", kernel, OFF_VERSION)
    if version < 0x0200:
        raise ConfigError(f"{what}: boot protocol {version >> 8}.{version & 0xFF:02} is "
                          "too old (2.00 or later is needed)")
    if not kernel[OFF_LOADFLAGS] & LOADED_HIGH:
        raise ConfigError(f"{what}: a zImage (loaded low) cannot be booted; "
                          "build a bzImage")
    setup_sects = kernel[OFF_SETUP_SECTS] or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(kernel):
        raise ConfigError(f"{what}: the setup code ({setup_sects} sectors) is larger than "
                          "the file: truncated image?")
    return setup_size, version


def load_bzimage(memory: GuestMemory, kernel_path: str, bootargs: str | None,
                 ramdisk_path: str | None) -> VcpuRegs:
    """Place kernel, initrd, command line and zero page; return the BSP registers."""
    kernel = read_image(kernel_path, "-k", minimum=1)
    setup_size, version = check_header(kernel, kernel_path)
    ramdisk = read_image(ramdisk_path, "-r") if ramdisk_path else b""
    lowmem = memory.lowmem
    lay = layout(lowmem, len(ramdisk), setup_size)
    if KERNEL_LOAD + len(kernel) > lay.gdt:
        raise ConfigError(
            f"-k {kernel_path}: the kernel ({len(kernel)} bytes at 16 MiB)"
            + (f" and the initrd ({len(ramdisk)} bytes)" if ramdisk else "")
            + f" do not fit below {lowmem // MiB} MiB of low memory; give the VM more (-m)"
        )

    args = (bootargs or "").encode()
    if len(args) >= BOOTARGS_MAX:
        raise ConfigError(f"-B: the command line is {len(args)} bytes; at most "
                          f"{BOOTARGS_MAX - 1} fit")
    if version >= 0x0206:
        (cmdline_size,) = struct.unpack_from("<I", kernel, OFF_CMDLINE_SIZE)
        if cmdline_size and len(args) > cmdline_size:
            raise ConfigError(f"-B: the command line is {len(args)} bytes; this kernel "
                              f"takes at most {cmdline_size}")
    if ramdisk and version >= 0x0203:
        (addr_max,) = struct.unpack_from("<I", kernel, OFF_INITRD_ADDR_MAX)
        if addr_max and lay.ramdisk + len(ramdisk) - 1 > addr_max:
            raise ConfigError(f"-r {ramdisk_path}: the kernel takes an initrd only below "
                              f"{addr_max + 1:#x}; this one would end at "
                              f"{lay.ramdisk + len(ramdisk):#x}")

    write_guest(memory, KERNEL_LOAD, kernel, f"-k {kernel_path}")
    if ramdisk:
        write_guest(memory, lay.ramdisk, ramdisk, f"-r {ramdisk_path}")
    zero_guest(memory, lay.bootargs, BOOTARGS_MAX, "the command line")
    write_guest(memory, lay.bootargs, args + b"\0", "the command line")

    zp = bytearray(ZEROPAGE_SIZE)
    hdr_end = min(OFF_HEADER + kernel[OFF_JUMP + 1], SETUP_HEADER_MAX_END)
    hdr_end = max(hdr_end, OFF_CMD_LINE_PTR + 4)
    zp[OFF_SETUP_SECTS:hdr_end] = kernel[OFF_SETUP_SECTS:hdr_end]
    zp[OFF_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    zp[OFF_LOADFLAGS] |= QUIET_FLAG
    struct.pack_into("<II", zp, OFF_RAMDISK_IMAGE, lay.ramdisk if ramdisk else 0, len(ramdisk))
    struct.pack_into("<I", zp, OFF_CMD_LINE_PTR, lay.bootargs)
    table = memory.e820()[:E820_MAX]
    zp[OFF_E820_ENTRIES] = len(table)
    raw = e820_bytes(table)
    zp[OFF_E820_TABLE : OFF_E820_TABLE + len(raw)] = raw
    write_guest(memory, lay.zeropage, bytes(zp), "the zero page")

    regs = flat_protected_mode(memory, lay.gdt, null_entries=2, rip=lay.entry)
    regs.gprs = {"rsi": lay.zeropage}
    return regs
