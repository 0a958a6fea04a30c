"""ACPI tables, judged by acpica-tools: extracted from guest memory the way a guest finds
them (RSDP scan in the BIOS area, then XSDT/FADT pointers), every checksum holds and
``iasl -d`` disassembles every table without errors."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.memory import MemoryMap
from devicemodel.platform import acpi, aml
from devicemodel.vm import running

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")


def find_rsdp(mem: MemoryMap) -> int:
    for addr in range(0xE0000, 0x100000, 16):
        if mem.read(addr, 8) == b"RSD PTR " and sum(mem.read(addr, 20)) % 256 == 0:
            return addr
    raise AssertionError("no RSDP in the BIOS area")


def extract_tables(mem: MemoryMap) -> dict[str, tuple[int, bytes]]:
    """Signature → (address, bytes), walking the pointers a guest walks."""
    rsdp_at = find_rsdp(mem)
    rsdp = mem.read(rsdp_at, 36)
    out = {"RSDP": (rsdp_at, rsdp)}
    rsdt_at, length, xsdt_at = struct.unpack_from("<IIQ", rsdp, 16)
    assert length == 36

    def table(addr: int) -> bytes:
        n = struct.unpack("<I", mem.read(addr + 4, 4))[0]
        return mem.read(addr, n)

    out["RSDT"] = (rsdt_at, table(rsdt_at))
    xsdt = table(xsdt_at)
    out["XSDT"] = (xsdt_at, xsdt)
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = table(addr)
        out[t[:4].decode()] = (addr, t)
    fadt = out["FACP"][1]
    facs_at, dsdt_at = struct.unpack_from("<QQ", fadt, 132)
    out["FACS"] = (facs_at, mem.read(facs_at, 64))
    out["DSDT"] = (dsdt_at, table(dsdt_at))
    return out


def iasl_disassemble(name: str, data: bytes, workdir: Path) -> str:
    src = workdir / f"{name.lower()}.dat"
    src.write_bytes(data)
    proc = subprocess.run([IASL, "-d", str(src)], cwd=workdir, capture_output=True, text=True,
                          timeout=60)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"iasl -d {name} failed:\n{log}"
    assert "Error" not in log.replace("0 Errors", ""), log
    return (workdir / f"{name.lower()}.dsl").read_text()


@needs_iasl
async def test_tables_from_guest_memory_disassemble_and_checksum(tmp_path):
    sim = SimHypervisor()
    args = ["-s", "0:0,hostbridge", "-s", "1:0,lpc", "-s", "3,dummy,intx", "-s", "4,dummy,intx",
            "-l", "com1", "-l", "com2", "--cpu_affinity", "0,1,2", "vm"]
    async with running(args, sim) as vm:
        tables = extract_tables(sim.memory)
        routes = [r for r in vm.pci.intx.routes()]
    assert set(tables) == {"RSDP", "RSDT", "XSDT", "APIC", "FACP", "MCFG", "FACS", "DSDT"}
    # acrn-dm's addresses
    assert {k: v[0] for k, v in tables.items()} == {
        "RSDP": 0xF2400, "RSDT": 0xF2440, "XSDT": 0xF2480, "APIC": 0xF2500, "FACP": 0xF2600,
        "MCFG": 0xF2780, "FACS": 0xF27C0, "DSDT": 0xF3500}
    rsdp = tables["RSDP"][1]
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    for name, (_, data) in tables.items():
        if name not in ("RSDP", "FACS"):
            assert sum(data) % 256 == 0, f"{name} checksum"
    dsl = {name: iasl_disassemble(name, data, tmp_path)
           for name, (_, data) in tables.items() if name != "RSDP"}

    madt = dsl["APIC"]
    assert madt.count("Subtable Type : 00 [Processor Local APIC]") == 3
    assert "Subtable Type : 01 [I/O APIC]" in madt and "FEC00000" in madt
    fadt = dsl["FACP"]
    assert "SCI Interrupt : 0009" in fadt
    assert "PM1A Event Block Address : 00000400" in fadt
    assert "PM1A Control Block Address : 00000404" in fadt
    assert "Address : 0000000000000CF9" in fadt
    assert "Base Address : 00000000E0000000" in dsl["MCFG"]
    dsdt = dsl["DSDT"]
    assert "Name (_S5, Package (0x02)" in dsdt
    assert 'EisaId ("PNP0A03")' in dsdt and "Device (ISA)" in dsdt
    assert "Device (COM1)" in dsdt and "Device (COM2)" in dsdt
    assert "0x03F8" in dsdt and "{4}" in dsdt and "0x02F8" in dsdt and "{3}" in dsdt
    assert "Method (_PRT, 0" in dsdt and "If (PICM)" in dsdt  # APIC or PIC mode
    assert "Method (_PIC, 1" in dsdt
    assert len(routes) == 2
    for r in routes:
        assert f"0x{(r.slot << 16) | 0xFFFF:08X}" in dsdt
        assert f"0x{r.gsi:02X}" in dsdt
        assert f"\\_SB.PCI0.ISA.LNK{'ABCDEFGH'[r.pirq_pin - 1]}" in dsdt
    assert dsdt.count('EisaId ("PNP0C0F")') == 8
    assert "{5,6,7,9,10,11,12,14,15}" in dsdt  # COM1/COM2's IRQs 4 and 3 are not offered


@needs_iasl
def test_rsdp_matches_what_iasl_compiles(tmp_path):
    """iasl cannot disassemble an RSDP, but it compiles one: ours must be byte-identical."""
    ours = acpi.build_rsdp(0xF2440, 0xF2480)
    src = tmp_path / "rsdp.asl"
    src.write_text(
        '[0008]                          Signature : "RSD PTR "\n'
        "[0001]                           Checksum : 00\n"
        '[0006]                             Oem ID : "DM    "\n'
        "[0001]                           Revision : 02\n"
        "[0004]                       RSDT Address : 000F2440\n"
        "[0004]                             Length : 00000024\n"
        "[0008]                       XSDT Address : 00000000000F2480\n"
        "[0001]                  Extended Checksum : 00\n"
        "[0003]                           Reserved : 000000\n")
    proc = subprocess.run([IASL, str(src)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "rsdp.aml").read_bytes() == ours


@needs_iasl
def test_hpet_only_when_offered_and_big_dsdt(tmp_path):
    cfg = acpi.AcpiConfig(lapic_ids=list(range(16)), hpet=0x8086A201, lpc_slot=(31, 0),
                          prt=[acpi.PrtEntry(s, p, 16 + 4 * s + p) for s in range(1, 32)
                               for p in range(1, 5)][:120])
    tables = acpi.build_tables(cfg)
    xsdt = tables[0xF2480]
    listed = [a for (a,) in struct.iter_unpack("<Q", xsdt[36:])]
    assert 0xF2740 in listed
    assert tables[0xF2740][:4] == b"HPET"
    dsl = iasl_disassemble("HPET", tables[0xF2740], tmp_path)
    assert "FED00000" in dsl
    dsdt = tables[0xF3500]
    assert len(dsdt) > 1024  # two-byte package lengths on the way
    text = iasl_disassemble("DSDT", dsdt, tmp_path)
    assert text.count("Package (0x04)") == 120
    assert "Device (HPET)" in text
    # three-byte package lengths: a scope holding a 5000-byte buffer
    big = acpi._table(b"SSDT", 2, b"BIG", aml.scope("\\", aml.scope(
        "_SB", aml.name("BIGB", aml.buffer(bytes(range(256)) * 20)))))
    assert "Name (BIGB, Buffer (0x1400)" in iasl_disassemble("SSDT", big, tmp_path)
    no_hpet = acpi.build_tables(acpi.AcpiConfig(lapic_ids=[0]))
    assert 0xF2740 not in no_hpet
    assert b"HPET" not in no_hpet[0xF3500]


@needs_iasl
def test_dsdt_survives_an_iasl_round_trip(tmp_path):
    """Disassemble ours, compile that with iasl, disassemble again: the same ASL."""
    cfg = acpi.AcpiConfig(lapic_ids=[0, 1], lpc_slot=(1, 0),
                          com_ports=[acpi.ComDevice("COM1", 0x3F8, 4)],
                          prt=[acpi.PrtEntry(3, 1, 16, 1), acpi.PrtEntry(4, 2, 17, 2)])
    first = iasl_disassemble("DSDT", acpi.build_dsdt(cfg), tmp_path)
    # -on: keep our absolute name paths (iasl would shorten them)
    proc = subprocess.run([IASL, "-on", "-p", "again", "dsdt.dsl"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    second = iasl_disassemble("again", (tmp_path / "again.aml").read_bytes(), tmp_path)

    def body(text: str) -> str:
        return text[text.index("DefinitionBlock"):].split("\n", 1)[1]

    assert body(first) == body(second)


def test_aml_pkg_length_encodings():
    assert aml.pkg_length(0x3E) == b"\x3f"
    assert aml.pkg_length(0x3F) == bytes([0x41, 0x04])  # 0x41 total: 2 bytes
    assert aml.pkg_length(0xFFD) == bytes([0x4F, 0xFF])
    assert aml.pkg_length(0xFFE) == bytes([0x81, 0x00, 0x01])  # 0x1001 total
    assert aml.pkg_length(0x300, include_self=False) == bytes([0x40, 0x30])
    assert aml.name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.eisa_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"
    assert aml.integer(0x1FF) == b"\x0b\xff\x01"
    with pytest.raises(ValueError):
        aml.name_string("toolong")


def test_tables_too_big_are_refused():
    with pytest.raises(ValueError, match="runs into"):
        acpi.build_tables(acpi.AcpiConfig(lapic_ids=list(range(40))))
