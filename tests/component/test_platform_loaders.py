"""Loaders against synthetic images (tests/support/images.py): bzImage, ELF32/ELF64,
multiboot, OVMF."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.config import ConfigError
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.memory import GuestMemory, MiB
from devicemodel.platform import loader_elf
from devicemodel.platform.loader_bzimage import check_header
from devicemodel.vm import running
from tests.support.images import make_bzimage, make_elf32, make_elf64, multiboot_header


# --- bzImage ----------------------------------------------------------------------------
async def test_bzimage_boot_protocol_and_placement(tmp_path):
    kernel = make_bzimage()
    (tmp_path / "bz").write_bytes(kernel)
    (tmp_path / "initrd").write_bytes(b"INITRD" * 1000)
    sim = SimHypervisor()
    args = ["-m", "256M", "-k", str(tmp_path / "bz"), "-r", str(tmp_path / "initrd"),
            "-B", "console=ttyS0 panic=-1", "vm"]
    async with running(args, sim) as vm:
        mem = sim.memory
        lowmem = vm.memory.lowmem
        regs = sim.vcpu_regs[0]
        setup_size = 5 * 512
        assert regs.rip == 16 * MiB + setup_size
        assert (regs.cs_sel, regs.cs_ar, regs.cs_limit, regs.cr0) == (0x10, 0xC09B,
                                                                      0xFFFF_FFFF, 0x31)
        assert (regs.ds_sel, regs.es_sel, regs.ss_sel) == (0x18, 0x18, 0x18)
        zp = lowmem - 4096
        assert regs.gprs["rsi"] == zp
        assert mem.read(16 * MiB, len(kernel)) == kernel
        # GDT: two null entries, flat code, flat data
        gdt = struct.unpack("<4Q", mem.read(regs.gdt_base, 32))
        assert gdt == (0, 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
        assert regs.gdt_limit == 31
        # zero page: loader fields, initrd, command line, e820
        assert mem.read_u8(zp + 0x210) == 0xFF
        assert mem.read_u32(zp + 0x202) == 0x53726448
        rd_addr, rd_size = mem.read_u32(zp + 0x218), mem.read_u32(zp + 0x21C)
        assert rd_size == 6000 and rd_addr % 4096 == 0
        assert rd_addr == lowmem - ((6000 + 8192 + 4095) // 4096 * 4096)
        assert mem.read(rd_addr, 6) == b"INITRD"
        assert regs.gdt_base == rd_addr - 2048
        cmd = mem.read_u32(zp + 0x228)
        assert cmd == lowmem - 8192
        assert mem.read(cmd, 23) == b"console=ttyS0 panic=-1\0"
        n = mem.read_u8(zp + 0x1E8)
        table = [struct.unpack("<QQI", mem.read(zp + 0x2D0 + 20 * i, 20)) for i in range(n)]
        assert table == [(e.addr, e.size, e.type) for e in vm.memory.e820()]
        assert (0x100000, lowmem - 0x100000, 1) in table


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:0x100], "too short"),
    (lambda b: b[:0x1FE] + b"\0\0" + b[0x200:], "not a bzImage"),
    (lambda b: b[:0x206] + b"\x01\x01" + b[0x208:], "too old"),
    (lambda b: b[:0x211] + b"\0" + b[0x212:], "zImage"),
    (lambda b: b[:0x1F1] + b"\x40" + b[0x1F2:0x300], "truncated"),
])
def test_bzimage_header_errors(mutate, message):
    with pytest.raises(ConfigError, match=message) as e:
        check_header(mutate(make_bzimage()), "/k/bz")
    assert "/k/bz" in str(e.value)


def test_bzimage_missing_file_and_oversized(tmp_path):
    mem = GuestMemory(128 * MiB)
    try:
        from devicemodel.platform.loader_bzimage import load_bzimage

        with pytest.raises(ConfigError, match="no such file") as e:
            load_bzimage(mem, str(tmp_path / "nope"), None, None)
        assert str(tmp_path / "nope") in str(e.value)
        big = tmp_path / "big"
        big.write_bytes(make_bzimage(payload=bytes(113 * MiB)))
        with pytest.raises(ConfigError, match="do not fit"):
            load_bzimage(mem, str(big), None, None)
        ok = tmp_path / "ok"
        ok.write_bytes(make_bzimage(cmdline_size=10))
        with pytest.raises(ConfigError, match="at most 10"):
            load_bzimage(mem, str(ok), "x" * 11, None)
    finally:
        mem.close()


# --- ELF and multiboot --------------------------------------------------------------------
async def test_multiboot_elf32_machine_state_and_info(tmp_path):
    code = b"\xf4" * 16
    img = make_elf32(code, load=0x400000, bss=0x1000, multiboot=multiboot_header(0x2))
    (tmp_path / "t.flat").write_bytes(img)
    sim = SimHypervisor()
    args = ["--debugexit", "-E", str(tmp_path / "t.flat"), "-B", "testarg", "-m", "512M",
            "--cpu_affinity", "0,1", "vm"]
    async with running(args, sim) as vm:
        mem = sim.memory
        regs = sim.vcpu_regs[0]
        assert regs.rip == 0x400000 + 12
        assert regs.gprs["rax"] == 0x2BADB002
        mbi = regs.gprs["rbx"]
        assert mbi == 0x20000
        assert (regs.cr0 & 0x80000001, regs.cs_limit, regs.cs_base) == (1, 0xFFFF_FFFF, 0)
        code_desc = mem.read_u64(regs.gdt_base + regs.cs_sel)
        data_desc = mem.read_u64(regs.gdt_base + regs.ds_sel)
        assert (code_desc, data_desc) == (0x00CF9B000000FFFF, 0x00CF93000000FFFF)
        assert regs.ss_sel == regs.es_sel == regs.fs_sel == regs.gs_sel == regs.ds_sel
        assert mem.read(0x400000 + 12, 16) == code
        assert mem.read(0x400000 + 28, 0x1000) == bytes(0x1000)  # bss cleared
        flags, lower, upper = struct.unpack("<III", mem.read(mbi, 12))
        assert flags & 0x1 and flags & 0x40 and flags & 0x4 and flags & 0x200
        assert lower == 640
        assert 0x100000 + upper * 1024 <= vm.memory.lowmem
        assert upper * 1024 > 500 * MiB - 0x100000 - 64 * 1024 - 1
        cmdline = struct.unpack_from("<I", mem.read(mbi + 16, 4))[0]
        assert mem.read(cmdline, 8) == b"testarg\0"
        mmap_len, mmap_addr = struct.unpack("<II", mem.read(mbi + 44, 8))
        entries = [struct.unpack("<IQQI", mem.read(mmap_addr + off, 24))
                   for off in range(0, mmap_len, 24)]
        assert [(a, s, t) for _, a, s, t in entries] == [
            (e.addr, e.size, e.type) for e in vm.memory.e820()]
        assert all(size == 20 for size, *_ in entries)
        name = struct.unpack("<I", mem.read(mbi + 64, 4))[0]
        assert mem.read(name, 10) == b"acrn-pydm\0"


async def test_plain_elf_gets_no_info_block(tmp_path):
    (tmp_path / "e").write_bytes(make_elf32(b"\xf4", load=0x200000))
    sim = SimHypervisor()
    async with running(["-E", str(tmp_path / "e"), "vm"], sim):
        regs = sim.vcpu_regs[0]
        assert regs.rip == 0x200000
        assert regs.gprs == {"rax": 0x2BADB002}


def test_elf64_loads_at_physical_addresses(tmp_path):
    img = make_elf64(b"\xf4\xf4", vaddr=0xFFFF_FFFF_8100_0000, paddr=0x100_0000,
                     entry=0xFFFF_FFFF_8100_0001)
    (tmp_path / "k64").write_bytes(img)
    mem = GuestMemory(128 * MiB)
    try:
        regs = loader_elf.load_elf(mem, str(tmp_path / "k64"), None)
        assert regs.rip == 0x100_0001
        assert mem.read(0x100_0000, 2) == b"\xf4\xf4"
    finally:
        mem.close()


def test_multiboot_aout_kludge(tmp_path):
    load = 0x100000
    hdr = multiboot_header(0x10002, struct.pack("<5I", load, load, 0, load + 0x2000,
                                                load + 0x20))
    img = hdr + bytes(0x20 - len(hdr)) + b"\xeb\xfe" + b"\xaa" * 30
    (tmp_path / "raw").write_bytes(img)
    mem = GuestMemory(128 * MiB)
    try:
        mem.write(load + 0x1000, b"\x55" * 16)
        regs = loader_elf.load_elf(mem, str(tmp_path / "raw"), None)
        assert regs.rip == load + 0x20
        assert regs.gprs["rbx"] == 0x20000
        assert mem.read(load, len(img)) == img
        assert mem.read(load + 0x1000, 16) == bytes(16)  # up to bss_end is cleared
    finally:
        mem.close()


@pytest.mark.parametrize("image, message", [
    (b"hello world, not an image at all" * 10, "neither an ELF"),
    (b"\x7fELF" + bytes([1, 1, 1]) + bytes(20), "too short"),
    (make_elf32(b"\xf4")[:0x1000], "past the end"),
    (make_elf32(b"\xf4", machine=40), "not x86"),
    (make_elf32(b"\xf4", multiboot=multiboot_header(0x6)), "video mode"),
    (make_elf32(b"\xf4", load=0xF0000), "BIOS area"),
    (make_elf32(b"\xf4", load=0x1F000, bss=0x2000, multiboot=multiboot_header()),
     "multiboot information"),
    (make_elf32(b"\xf4", load=0x7FF0_0000), "does not fit"),
    (b"\x7fELF" + bytes([3, 1, 1]) + bytes(60), "unknown ELF class"),
])
def test_elf_errors_name_file_and_problem(tmp_path, image, message):
    path = tmp_path / "bad.elf"
    path.write_bytes(image)
    mem = GuestMemory(128 * MiB)
    try:
        with pytest.raises(ConfigError, match=message) as e:
            loader_elf.load_elf(mem, str(path), None)
        assert str(path) in str(e.value)
    finally:
        mem.close()


def test_missing_and_directory_images(tmp_path):
    mem = GuestMemory(128 * MiB)
    try:
        with pytest.raises(ConfigError, match="no such file"):
            loader_elf.load_elf(mem, str(tmp_path / "none"), None)
        with pytest.raises(ConfigError, match="not a regular file|directory"):
            loader_elf.load_elf(mem, str(tmp_path), None)
    finally:
        mem.close()


async def test_missing_image_fails_the_build_cleanly(tmp_path):
    from devicemodel.config import parse_args
    from devicemodel.vm import Vm

    sim = SimHypervisor()  # the file went away between parsing and building
    vm = Vm(parse_args(["-E", str(tmp_path / "gone.elf"), "vm"], check_files=False), sim)
    with pytest.raises(ConfigError, match="gone.elf: no such file"):
        vm.build()
    assert sim.state == "destroyed"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.integers(0, 3))
def test_malformed_images_only_raise_config_errors(blob, kind):
    """Whatever the bytes, parsing ends in an Image or a ConfigError."""
    if kind == 1:
        blob = b"\x7fELF" + blob
    elif kind == 2:
        blob = b"\x7fELF\x01\x01\x01" + bytes(9) + blob
    elif kind == 3:
        blob = multiboot_header(0x10002, blob[:20]) + blob[20:]
    try:
        image = loader_elf.parse_image(blob, "fuzz")
    except ConfigError:
        return
    for paddr, raw, memsz in image.segments:
        assert len(raw) <= memsz and paddr >= 0


# --- OVMF -----------------------------------------------------------------------------------
async def test_ovmf_split_image_ends_at_4g(tmp_path):
    code = bytes(range(256)) * 64 * 4  # 64 KiB
    vars_ = b"\x5a" * (128 * 1024)
    (tmp_path / "code.fd").write_bytes(code)
    (tmp_path / "vars.fd").write_bytes(vars_)
    sim = SimHypervisor()
    args = ["--ovmf", f"w,code={tmp_path}/code.fd,vars={tmp_path}/vars.fd", "vm"]
    async with running(args, sim) as vm:
        mem = sim.memory
        top = 1 << 32
        assert mem.read(top - len(code), len(code)) == code
        assert mem.read(top - len(code) - len(vars_), len(vars_)) == vars_
        regs = sim.vcpu_regs[0]
        assert (regs.cs_sel, regs.cs_base, regs.rip) == (0xF000, 0xFFFF0000, 0xFFF0)
        assert regs.cs_base + regs.rip == top - 16
        assert regs.cr0 & 1 == 0
        assert mem.read(0xEF000, 4) == b"820\0"
        assert mem.read_u32(0xEF004) == len(vm.memory.e820())
        assert sim.calls.count("set_memseg") == 2  # RAM and the firmware region
        mem.write(top - len(code) - len(vars_), b"NEWVARS!")  # the guest saves a variable
    assert (tmp_path / "vars.fd").read_bytes()[:8] == b"NEWVARS!"  # written back


def test_ovmf_too_big(tmp_path):
    (tmp_path / "big.fd").write_bytes(bytes(3 * MiB))
    mem = GuestMemory(128 * MiB)
    sim = SimHypervisor()
    from devicemodel.config import OvmfConfig
    from devicemodel.ioreq import new_ioreq_page
    from devicemodel.platform.loader_ovmf import OvmfFirmware

    sim.create_vm("t", new_ioreq_page())
    try:
        with pytest.raises(ConfigError, match="larger than"):
            OvmfFirmware(mem, sim, OvmfConfig(str(tmp_path / "big.fd"))).load()
    finally:
        mem.close()
