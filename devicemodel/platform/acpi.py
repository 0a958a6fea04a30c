"""ACPI tables built in Python at acrn-dm's addresses (acrn-facts §3.3).

Layout from ACPI_BASE 0xF2400 (inside the e820-reserved BIOS area, where a guest scans
for the RSDP): RSDP +0, RSDT +0x40, XSDT +0x80, MADT +0x100, FADT +0x200, HPET +0x340
(only when an HPET is offered), MCFG +0x380, FACS +0x3C0, DSDT +0x1100.  The DSDT is an AML
byte stream from ``aml.py``: PCI root bridge with its windows and the ``_PRT`` of the
INTx routes, the LPC bridge with its COM ports and legacy devices, and ``_S5``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..memory import ECAM_BASE, MemoryMap
from . import aml

ACPI_BASE = 0xF2400
ACPI_END = 0x100000
RSDT_OFFSET = 0x040
XSDT_OFFSET = 0x080
MADT_OFFSET = 0x100
FADT_OFFSET = 0x200
HPET_OFFSET = 0x340
MCFG_OFFSET = 0x380
FACS_OFFSET = 0x3C0
TPM2_OFFSET = 0xC00
DSDT_OFFSET = 0x1100
TPM_CRB_CTRL_REQ = 0x40  # the CRB's control area starts at the request register

OEM_ID = b"DM    "
CREATOR_ID = b"PYDM"
CREATOR_REV = 1

SCI_INT = 9
SMI_CMD = 0xB2
ACPI_ENABLE = 0xA0
ACPI_DISABLE = 0xA1
PM1A_EVT_ADDR = 0x400
PM1A_CNT_ADDR = 0x404
RESET_PORT = 0xCF9
RESET_VALUE = 0x0E
RTC_CENTURY_INDEX = 0x32
LAPIC_BASE = 0xFEE00000
IOAPIC_BASE = 0xFEC00000
HPET_BASE = 0xFED00000
HPET_SIZE = 0x400

PIRQ_FIELDS = ("PIRA", "PIRB", "PIRC", "PIRD", "PIRE", "PIRF", "PIRG", "PIRH")
PIRQ_PERMITTED = (3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15)
PIRQ_DIS = 0x80
ISA_PATH = "\\_SB.PCI0.ISA"
PCI_IO_BASE = 0x2000  # acrn-dm's PCI_EMUL_IOBASE: the PIO BAR pool starts here
PCI_MEM32 = (0x8000_0000, 0xE000_0000)
PCI_MEM64 = (0x40_0000_0000, 0x80_0000_0000)


@dataclass(frozen=True)
class PrtEntry:
    """One INTx route: PCI slot, pin (1 = INTA .. 4 = INTD) → IOAPIC input (GSI), and the
    PIRQ link (1..8 = LNKA..LNKH, 0 = none) that carries it in PIC mode."""

    slot: int
    pin: int
    gsi: int
    pirq: int = 0


@dataclass(frozen=True)
class ComDevice:
    name: str  # COM1..COM5
    base: int
    irq: int


@dataclass
class AcpiConfig:
    """Everything the tables describe; setup.py fills it from the VM."""

    lapic_ids: list[int]
    prt: list[PrtEntry] = field(default_factory=list)
    lpc_slot: tuple[int, int] | None = None  # (dev, func) of the LPC bridge on bus 0
    com_ports: list[ComDevice] = field(default_factory=list)
    hpet: int | None = None  # the HPET capabilities register (low 32 bits) when offered
    ecam_base: int = ECAM_BASE
    #: a real-time VM: no interrupt source overrides in the MADT (acrn-dm's is_rtvm)
    rtvm: bool = False
    #: DSDT terms for the processors (platform/acpi_pm.py), at the DSDT's root
    processors: bytes = b""
    #: a passed-through TPM 2.0 (CRB): (MMIO base, size, log length, log address)
    tpm: tuple[int, int, int, int] | None = None


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def _header(sig: bytes, length: int, revision: int, table_id: bytes) -> bytearray:
    hdr = bytearray(36)
    struct.pack_into("<4sIBB6s8sI4sI", hdr, 0, sig, length, revision, 0, OEM_ID,
                     table_id.ljust(8), 1, CREATOR_ID, CREATOR_REV)
    return hdr


def _table(sig: bytes, revision: int, table_id: bytes, body: bytes) -> bytes:
    data = _header(sig, 36 + len(body), revision, table_id) + body
    data[9] = checksum(data)
    return bytes(data)


def _gas(space: int, width: int, offset: int, access: int, address: int) -> bytes:
    return struct.pack("<BBBBQ", space, width, offset, access, address)


def build_rsdp(rsdt: int, xsdt: int) -> bytes:
    data = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt, 36, xsdt,
                                 0, b"\0\0\0"))
    data[8] = checksum(data[:20])
    data[32] = checksum(data)
    return bytes(data)


def build_rsdt(addrs: list[int]) -> bytes:
    return _table(b"RSDT", 1, b"DMRSDT", b"".join(struct.pack("<I", a) for a in addrs))


def build_xsdt(addrs: list[int]) -> bytes:
    return _table(b"XSDT", 1, b"DMXSDT", b"".join(struct.pack("<Q", a) for a in addrs))


def build_madt(lapic_ids: list[int], *, rtvm: bool = False) -> bytes:
    body = bytearray(struct.pack("<II", LAPIC_BASE, 1))  # PC-AT compatible (8259s present)
    for uid, apic_id in enumerate(lapic_ids):
        body += struct.pack("<BBBBI", 0, 8, uid, apic_id, 1)  # enabled
    body += struct.pack("<BBBBII", 1, 12, 0, 0, IOAPIC_BASE, 0)
    if not rtvm:  # acrn-dm leaves both overrides out for a real-time VM
        # ISA IRQ0 (the PIT) arrives on IOAPIC pin 2; the SCI is level, active high
        body += struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0x0005)
        body += struct.pack("<BBBBIH", 2, 10, 0, SCI_INT, SCI_INT, 0x000D)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0x0005, 1)  # NMI on LINT1 of every CPU
    return _table(b"APIC", 1, b"DMMADT", bytes(body))


FADT_FLAGS = (
    (1 << 0)  # WBINVD works
    | (1 << 2)  # C1 on all CPUs
    | (1 << 5)  # sleep button is a control method
    | (1 << 10)  # reset register supported
    | (1 << 12)  # headless
)
FADT_BOOT_FLAGS = (1 << 2) | (1 << 4)  # no VGA, no PCIe ASPM; no 8042, no legacy devices


def build_fadt(facs: int, dsdt: int) -> bytes:
    body = bytearray()
    body += struct.pack("<IIBBHIBBBB", facs, dsdt, 1, 0, SCI_INT, SMI_CMD, ACPI_ENABLE,
                        ACPI_DISABLE, 0, 0)
    body += struct.pack("<IIIIIIII", PM1A_EVT_ADDR, 0, PM1A_CNT_ADDR, 0, 0, 0, 0, 0)
    body += struct.pack("<BBBBBBBB", 4, 2, 0, 0, 0, 0, 0, 0)
    body += struct.pack("<HHHHBBBBBHB", 0, 0, 0, 0, 0, 0, 0, 0, RTC_CENTURY_INDEX,
                        FADT_BOOT_FLAGS, 0)
    body += struct.pack("<I", FADT_FLAGS)
    body += _gas(1, 8, 0, 1, RESET_PORT)
    body += struct.pack("<BHB", RESET_VALUE, 0, 1)  # reset value, ARM flags, minor rev 1
    body += struct.pack("<QQ", facs, dsdt)
    body += _gas(1, 32, 0, 2, PM1A_EVT_ADDR)
    body += _gas(0, 0, 0, 0, 0)  # PM1b event
    body += _gas(1, 16, 0, 2, PM1A_CNT_ADDR)
    body += _gas(0, 0, 0, 0, 0)  # PM1b control
    body += _gas(0, 0, 0, 0, 0)  # PM2 control
    body += _gas(0, 0, 0, 0, 0)  # PM timer
    body += _gas(0, 0, 0, 0, 0)  # GPE0
    body += _gas(0, 0, 0, 0, 0)  # GPE1
    body += _gas(0, 0, 0, 0, 0)  # sleep control (hardware-reduced only)
    body += _gas(0, 0, 0, 0, 0)  # sleep status
    table = _table(b"FACP", 5, b"DMFACP", bytes(body))
    assert len(table) == 268
    return table


def build_facs() -> bytes:
    data = struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 2, b"\0\0\0", 0,
                       bytes(24))
    assert len(data) == 64
    return data


def build_mcfg(ecam_base: int) -> bytes:
    body = bytes(8) + struct.pack("<QHBBI", ecam_base, 0, 0, 255, 0)
    return _table(b"MCFG", 1, b"DMMCFG", body)


def build_hpet(capabilities: int) -> bytes:
    body = struct.pack("<I", capabilities & 0xFFFF_FFFF) + _gas(0, 0, 0, 0, HPET_BASE)
    body += struct.pack("<BHB", 0, 0, 1)  # sequence 0, min tick 0, 4K page protection
    return _table(b"HPET", 1, b"DMHPET", body)


# --- DSDT -----------------------------------------------------------------------------------
def _named_device(name: str, hid: str, resources: list[bytes], uid: int | None = None) -> bytes:
    terms = [aml.name("_HID", aml.eisa_id(hid))]
    if uid is not None:
        terms.append(aml.name("_UID", aml.integer(uid)))
    terms.append(aml.name("_CRS", aml.resource_template(*resources)))
    return aml.device(name, *terms)


def _isa_bridge(cfg: AcpiConfig) -> bytes:
    assert cfg.lpc_slot is not None
    dev, func = cfg.lpc_slot
    terms = [
        aml.name("_ADR", aml.integer((dev << 16) | func)),
        aml.op_region("LPCR", aml.REGION_PCI_CONFIG, 0, 0x100),
        aml.field("LPCR", [
            (None, 0x60 * 8), ("PIRA", 8), ("PIRB", 8), ("PIRC", 8), ("PIRD", 8),
            (None, 4 * 8), ("PIRE", 8), ("PIRF", 8), ("PIRG", 8), ("PIRH", 8),
        ]),
    ]
    if _pic_mode_routes(cfg):
        terms += _pirq_links(cfg)
    for com in cfg.com_ports:
        uid = int(com.name[3:]) if com.name[3:].isdigit() else 0
        terms.append(_named_device(com.name, "PNP0501",
                                   [aml.res_io(com.base, 8), aml.res_irq_noflags(com.irq)],
                                   uid=uid))
    sysres = [
        aml.res_io(0x4D0, 2),  # ELCR
        aml.res_io(0x61, 1),  # NMI status/control
        aml.res_io(PM1A_EVT_ADDR, 8),
        aml.res_io(SMI_CMD, 1),
        aml.res_io(RESET_PORT, 1),
    ]
    terms.append(_named_device("SIO", "PNP0C02", sysres))
    terms.append(_named_device("PIC", "PNP0000", [aml.res_io(0x20, 2), aml.res_io(0xA0, 2),
                                                  aml.res_irq_noflags(2)]))
    terms.append(_named_device("TIMR", "PNP0100", [aml.res_io(0x40, 4),
                                                   aml.res_irq_noflags(0)]))
    terms.append(_named_device("RTC", "PNP0B00", [aml.res_io(0x70, 2),
                                                  aml.res_irq_noflags(8)]))
    return aml.device("ISA", *terms)


def _pic_mode_routes(cfg: AcpiConfig) -> bool:
    """PIC-mode routing needs the LPC bridge's PIRQ registers and links for every route."""
    return cfg.lpc_slot is not None and bool(cfg.prt) and all(
        1 <= e.pirq <= len(PIRQ_FIELDS) for e in cfg.prt)


def _pirq_links(cfg: AcpiConfig) -> list[bytes]:
    """LNKA..LNKH: PCI interrupt links over the PIRQ routing registers (PNP0C0F)."""
    local0 = aml.LOCAL0
    ret0 = aml.ret(aml.integer(0))
    # PIRV (reg): does the routing register name a usable ISA IRQ?
    pirv = aml.method(
        "PIRV", 1,
        aml.if_(aml.and_(aml.ARG0, aml.integer(PIRQ_DIS)), ret0),
        aml.and_(aml.ARG0, aml.integer(0x0F), local0),
        aml.if_(aml.lless(local0, aml.integer(3)), ret0),
        aml.if_(aml.lequal(local0, aml.integer(8)), ret0),
        aml.if_(aml.lequal(local0, aml.integer(13)), ret0),
        aml.ret(aml.integer(1)),
    )
    taken = {com.irq for com in cfg.com_ports}
    choices = [irq for irq in PIRQ_PERMITTED if irq not in taken]
    links = [pirv]
    for i, reg in enumerate(PIRQ_FIELDS):
        letter = "ABCDEFGH"[i]
        buf, cur, new = f"CB{i + 1:02d}", f"CIR{letter}", f"SIR{letter}"
        reg_name = aml.name_string(reg)
        links.append(aml.device(
            f"LNK{letter}",
            aml.name("_HID", aml.eisa_id("PNP0C0F")),
            aml.name("_UID", aml.integer(i + 1)),
            aml.method("_STA", 0,
                       aml.if_(aml.call("PIRV", reg_name), aml.ret(aml.integer(0x0B))),
                       aml.else_(aml.ret(aml.integer(0x09)))),
            aml.name("_PRS", aml.resource_template(aml.res_irq(choices))),
            aml.name(buf, aml.resource_template(aml.res_irq([]))),
            aml.create_word_field(aml.name_string(buf), aml.integer(1), cur),
            aml.method("_CRS", 0,
                       aml.and_(reg_name, aml.integer(PIRQ_DIS | 0x0F), local0),
                       aml.if_(aml.call("PIRV", local0),
                               aml.shift_left(aml.integer(1), local0,
                                              aml.name_string(cur))),
                       aml.else_(aml.store(aml.integer(0), aml.name_string(cur))),
                       aml.ret(aml.name_string(buf))),
            aml.method("_DIS", 0, aml.store(aml.integer(PIRQ_DIS), reg_name)),
            aml.method("_SRS", 1,
                       aml.create_word_field(aml.ARG0, aml.integer(1), new),
                       aml.find_set_right_bit(aml.name_string(new), local0),
                       aml.store(aml.decrement(local0), reg_name)),
        ))
    return links


def _prt_package(entries: list[PrtEntry], pic: bool) -> bytes:
    rows = []
    for e in sorted(entries, key=lambda e: (e.slot, e.pin)):
        source = (aml.name_string(f"{ISA_PATH}.LNK{'ABCDEFGH'[e.pirq - 1]}") if pic
                  else aml.integer(0))
        index = aml.integer(0) if pic else aml.integer(e.gsi)
        rows.append(aml.package([aml.integer((e.slot << 16) | 0xFFFF),
                                 aml.integer(e.pin - 1), source, index]))
    return aml.package(rows)


def _pci_root(cfg: AcpiConfig) -> bytes:
    crs = aml.resource_template(
        aml.res_word_bus(0, 0),
        aml.res_io(0xCF8, 8),
        aml.res_word_io(0x0000, 0x0CF7),
        aml.res_word_io(0x0D00, 0xFFFF),
        aml.res_dword_memory(PCI_MEM32[0], PCI_MEM32[1] - 1),
        aml.res_qword_memory(PCI_MEM64[0], PCI_MEM64[1] - 1),
    )
    terms = [
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_CRS", crs),
    ]
    if cfg.prt and _pic_mode_routes(cfg):
        # APIC mode (the OS called _PIC(1)): IOAPIC inputs; PIC mode: the PIRQ links
        terms.append(aml.name("APRT", _prt_package(cfg.prt, pic=False)))
        terms.append(aml.name("PPRT", _prt_package(cfg.prt, pic=True)))
        terms.append(aml.method(
            "_PRT", 0,
            aml.if_(aml.name_string("PICM"), aml.ret(aml.name_string("APRT"))),
            aml.else_(aml.ret(aml.name_string("PPRT")))))
    elif cfg.prt:
        terms.append(aml.name("_PRT", _prt_package(cfg.prt, pic=False)))
    if cfg.lpc_slot is not None:
        terms.append(_isa_bridge(cfg))
    if cfg.hpet is not None:
        terms.append(_named_device("HPET", "PNP0103",
                                   [aml.res_memory32_fixed(HPET_BASE, HPET_SIZE)], uid=0))
    return aml.device("PCI0", *terms)


def _tpm_device(base: int, size: int) -> bytes:
    """acrn-dm's tpm_write_dsdt: \\_SB.TPM, MSFT0101, its CRB window, always present."""
    return aml.scope("_SB", aml.device(
        "TPM", aml.name("_HID", aml.string("MSFT0101")),
        aml.name("_CRS", aml.resource_template(aml.res_memory32_fixed(base, size))),
        aml.method("_STA", 0, aml.ret(aml.integer(0x0F)))))


def build_tpm2(base: int, log_length: int, log_address: int) -> bytes:
    """The TPM2 table of a CRB TPM (start method 7), as acrn-dm's basl_fwrite_tpm2."""
    body = struct.pack("<HHQI12sIQ", 0, 0, base + TPM_CRB_CTRL_REQ, 7, bytes(12), log_length,
                       log_address)
    return _table(b"TPM2", 4, b"DMTPM2", body)


def build_dsdt(cfg: AcpiConfig) -> bytes:
    body = b"".join([
        # S5 is the one sleep state we implement: SLP_TYP 5 powers the VM off
        aml.name("_S5", aml.package([aml.integer(5), aml.integer(0)])),
        aml.name("PICM", aml.integer(0)),
        aml.method("_PIC", 1, aml.store(aml.ARG0, aml.name_string("PICM"))),
        aml.scope("_SB", _pci_root(cfg)),
        cfg.processors,
        _tpm_device(cfg.tpm[0], cfg.tpm[1]) if cfg.tpm is not None else b"",
    ])
    return _table(b"DSDT", 2, b"DMDSDT", body)


# --- placement ------------------------------------------------------------------------------
def build_tables(cfg: AcpiConfig, base: int = ACPI_BASE) -> dict[int, bytes]:
    """Every table, keyed by its guest physical address."""
    if not cfg.lapic_ids:
        raise ValueError("ACPI: at least one vCPU is needed for the MADT")
    addr = {name: base + off for name, off in (
        ("rsdt", RSDT_OFFSET), ("xsdt", XSDT_OFFSET), ("madt", MADT_OFFSET),
        ("fadt", FADT_OFFSET), ("hpet", HPET_OFFSET), ("mcfg", MCFG_OFFSET),
        ("facs", FACS_OFFSET), ("dsdt", DSDT_OFFSET), ("tpm2", TPM2_OFFSET))}
    listed = [addr["madt"], addr["fadt"]]
    if cfg.hpet is not None:
        listed.append(addr["hpet"])
    listed.append(addr["mcfg"])
    if cfg.tpm is not None:
        listed.append(addr["tpm2"])
    tables = {
        base: build_rsdp(addr["rsdt"], addr["xsdt"]),
        addr["rsdt"]: build_rsdt(listed),
        addr["xsdt"]: build_xsdt(listed),
        addr["madt"]: build_madt(cfg.lapic_ids, rtvm=cfg.rtvm),
        addr["fadt"]: build_fadt(addr["facs"], addr["dsdt"]),
        addr["mcfg"]: build_mcfg(cfg.ecam_base),
        addr["facs"]: build_facs(),
        addr["dsdt"]: build_dsdt(cfg),
    }
    if cfg.hpet is not None:
        tables[addr["hpet"]] = build_hpet(cfg.hpet)
    if cfg.tpm is not None:
        tables[addr["tpm2"]] = build_tpm2(cfg.tpm[0], cfg.tpm[2], cfg.tpm[3])
    slots = sorted(tables)
    for here, nxt in zip(slots, [*slots[1:], ACPI_END], strict=True):
        if here + len(tables[here]) > nxt:
            raise ValueError(f"ACPI table at {here:#x} ({len(tables[here])} bytes) runs into "
                             f"the next one at {nxt:#x}")
    return tables


def install_tables(memory: MemoryMap, cfg: AcpiConfig, base: int = ACPI_BASE) -> dict[int, bytes]:
    """Write the tables into guest RAM (clearing the ACPI area first)."""
    tables = build_tables(cfg, base)
    memory.view(base, ACPI_END - base)[:] = bytes(ACPI_END - base)
    for gpa, data in tables.items():
        memory.write(gpa, data)
    return tables
