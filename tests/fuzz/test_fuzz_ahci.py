"""A hostile guest against the AHCI controller: command FISes and PRD tables from a
guest that lies (bad lengths, PRD entries past guest memory or straddling its end,
tables outside RAM, unknown opcodes and SCSI commands, an NCQ slot issued twice) mixed
with register writes (engine stop and COMRESET while I/O runs, HBA reset, pointers
anywhere) and host media changes.

Each input is a list of operations applied to one running controller (disk, CD-ROM,
empty CD-ROM drive). The properties: no register access raises, no command task fails
(an exception a port caught and logged counts as a failure), errors land in the ports'
registers, nothing stays in flight, and afterwards the controller still works: a
libahci-style re-initialization reads and writes the disk and reads the CD.
Hypothesis runs in a worker thread; the controller lives on the trio thread.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct

import trio
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.ahci import regs as r
from devicemodel.memory import MemoryMap, RamRegion
from tests.support.ahci_driver import h2d
from tests.support.ahci_rig import Rig, ahci_rig

from ._common import count, drive, fuzz_settings

RAM = 16 << 20
DISK = 1 << 20
CD_BLOCKS = 64
HOSTILE = 0x80_0000  # where the hostile command list, tables and buffers live
TABLE = HOSTILE + 0x1000
BUFFER = HOSTILE + 0x10_0000
OPCODES = [0x25, 0x35, 0x60, 0x61, 0xC8, 0xCA, 0x20, 0x24, 0x30, 0x34, 0x3D, 0x06, 0x2F,
           0x47, 0xEC, 0xA1, 0xA0, 0xEF, 0xC6, 0xE7, 0xEA, 0x40, 0x42, 0xE5, 0x90, 0x08,
           0x00, 0xB0, 0xFF]
SCSI = [0x00, 0x03, 0x12, 0x1B, 0x1E, 0x25, 0x28, 0xA8, 0x2B, 0x43, 0x46, 0x4A, 0x51, 0x52,
        0x5A, 0xBB, 0x1A, 0xBE, 0xFF]
PORT_REGS = [r.P_CLB, r.P_CLBU, r.P_FB, r.P_FBU, r.P_IS, r.P_IE, r.P_CMD, r.P_TFD, r.P_SCTL,
             r.P_SERR, r.P_SACT, r.P_CI, r.P_SNTF, 0x7C]

addresses = st.one_of(
    st.sampled_from([BUFFER, BUFFER + 0x1000, RAM - 512, RAM - 1, RAM, RAM + 0x1000, 0,
                     1 << 40, (1 << 64) - 16, 0xFEE0_0000]),
    st.integers(0, (1 << 64) - 1))
lbas = st.one_of(st.sampled_from([0, 1, DISK // 512 - 1, DISK // 512, CD_BLOCKS - 1,
                                  CD_BLOCKS, (1 << 48) - 1, 0x0FFF_FFFF]),
                 st.integers(0, (1 << 48) - 1))
prds = st.lists(st.tuples(addresses, st.one_of(st.sampled_from([1, 511, 512, 4095, 4096,
                                                                 0x3F_FFFF]),
                                               st.integers(0, 0x3F_FFFF))), max_size=6)
commands = st.fixed_dictionaries({
    "port": st.sampled_from([0, 1, 2, 3]),
    "slot": st.integers(0, 31),
    "cfl": st.sampled_from([5, 5, 5, 0, 4, 16, 17, 31]),
    "flags": st.integers(0, 0xFFE0),
    "ctba": st.one_of(st.just(None), addresses),
    "fis_type": st.sampled_from([r.FIS_H2D] * 6 + [0x34, 0x00]),
    "c": st.sampled_from([True] * 6 + [False]),
    "op": st.one_of(st.sampled_from(OPCODES), st.integers(0, 255)),
    "features": st.one_of(st.sampled_from([0, 1, 2, 3, 8, 0x82, 0xFFFF]),
                          st.integers(0, 0xFFFF)),
    "lba": lbas,
    "count": st.one_of(st.sampled_from([0, 1, 8, 9, 0xFFFF, 0x20 << 3]),
                       st.integers(0, 0xFFFF)),
    "device": st.sampled_from([0x40, 0xC0, 0x4F, 0x00, 0xFF]),
    "control": st.sampled_from([0, 0, 0, r.CTL_SRST]),
    "cdb": st.tuples(st.one_of(st.sampled_from(SCSI), st.integers(0, 255)),
                     st.binary(min_size=11, max_size=11)),
    "prds": prds,
    "prdtl": st.one_of(st.just(None), st.sampled_from([0, 0xFFFF]), st.integers(0, 64)),
    "ncq": st.booleans(),
})
register_writes = st.tuples(
    st.sampled_from(["port", "port", "port", "ghc", "is", "bad"]), st.integers(0, 5),
    st.sampled_from(PORT_REGS),
    st.one_of(st.sampled_from([0, 1, r.CMD_ST, r.CMD_FRE | r.CMD_ST, r.CMD_CLO, r.CMD_FRE,
                               r.SCTL_DET_COMRESET, r.SCTL_DET_OFFLINE, r.GHC_HR,
                               r.GHC_IE, 0xFFFF_FFFF]),
              st.integers(0, 0xFFFF_FFFF)))
operations = st.lists(st.one_of(
    commands.map(lambda c: ("command", c)),
    register_writes.map(lambda w: ("register", w)),
    st.sampled_from([("sleep", 0), ("sleep", 0.002), ("media", "eject"), ("media", "insert"),
                     ("media", "empty-insert")]),
), min_size=1, max_size=12)


class Failures(logging.Handler):
    """Error records a port logged (a command task that raised)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def _put_command(rig: Rig, c: dict) -> None:
    """Write one hostile command into the command list of its port (where the driver
    put it) and its table at TABLE."""
    mem, d = rig.memory, rig.driver
    port, slot = c["port"], c["slot"]
    table = TABLE + slot * 0x200 if c["ctba"] is None else c["ctba"]
    prdtl = len(c["prds"]) if c["prdtl"] is None else c["prdtl"]
    header = struct.pack("<HHIQ", (c["flags"] & ~0x1F) | c["cfl"], prdtl, 0,
                         table & 0xFFFF_FFFF_FFFF_FFFF)
    mem.write(d.clb(port) + slot * 32, header)
    cfis = bytearray(h2d(c["op"], features=c["features"], lba=c["lba"], count=c["count"],
                         device=c["device"], control=c["control"], c=c["c"]))
    cfis[0] = c["fis_type"]
    op, rest = c["cdb"]
    if TABLE <= table < TABLE + 32 * 0x200:
        mem.write(table, bytes(cfis).ljust(0x40, b"\0") + bytes([op]) + rest)
        for i, (dba, dbc) in enumerate(c["prds"][:16]):
            mem.write(table + 0x80 + 16 * i, struct.pack("<QII", dba, 0, dbc))


async def _apply(rig: Rig, ops: list, paths: dict[str, str]) -> None:
    hba = rig.hba
    for kind, arg in ops:
        if kind == "command":
            _put_command(rig, arg)
            bit = 1 << arg["slot"]
            base = r.PORT_BASE + arg["port"] * r.PORT_STRIDE
            if arg["ncq"]:
                hba.abar_write(base + r.P_SACT, 4, bit)
            hba.abar_write(base + r.P_CI, 4, bit)
        elif kind == "register":
            where, port, reg, value = arg
            if where == "port":
                hba.abar_write(r.PORT_BASE + port * r.PORT_STRIDE + reg, 4, value)
            elif where == "ghc":
                hba.abar_write(r.GHC, 4, value)
            elif where == "is":
                hba.abar_write(r.IS, 4, value)
            else:  # sub-dword and out-of-range accesses
                hba.abar_write(reg + 2, 2, value & 0xFFFF)
                hba.abar_read(0x1FFC, 4)
                hba.abar_read(reg + 1, 1)
            for p in range(6):
                for reg in PORT_REGS:
                    hba.abar_read(r.PORT_BASE + p * r.PORT_STRIDE + reg, 4)
        elif kind == "sleep":
            await trio.sleep(arg)
        else:
            try:
                hba.change_medium(None if arg == "eject" else paths["iso"],
                                  port=2 if arg == "empty-insert" else 1, force=True)
            except (ValueError, RuntimeError):
                pass


async def _settle_and_check(rig: Rig, failures: Failures, paths: dict[str, str]) -> None:
    hba, d = rig.hba, rig.driver
    with trio.fail_after(20):
        while any(p.inflight for p in hba.ports):
            await trio.sleep(0.001)
    assert not failures.records, failures.records
    assert hba.nursery is not None, "the controller's task ended"
    # the guest's way back: HBA reset and re-initialization; then everything works
    await d.init()
    hba.change_medium(paths["iso"], port=1, force=True)
    assert (await d.read(0, 0, 8)).ok
    res = await d.write(0, 8, b"z" * 512, ncq=True, slot=3)
    assert res.ok
    assert (await d.packet(1, bytes(12))).tfes  # UNIT ATTENTION for the new disc
    await d.recover(1)
    res = await d.packet(1, bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0]), 2048)
    assert res.ok and res.data == paths["iso_data"][2048:4096]  # type: ignore[index]


def test_hostile_commands_and_registers(tmp_path) -> None:
    img, iso = tmp_path / "d.img", tmp_path / "c.iso"
    img.write_bytes(os.urandom(DISK))
    iso_data = os.urandom(CD_BLOCKS * 2048)
    iso.write_bytes(iso_data)
    paths = {"iso": str(iso), "iso_data": iso_data}
    failures = Failures()
    logger = logging.getLogger("devicemodel.ahci")
    logger.addHandler(failures)

    async def main() -> None:
        memory = MemoryMap([RamRegion(0, RAM, mmap.mmap(-1, RAM))])
        async with ahci_rig(f"hd:{img},cd:{iso},cd:", memory=memory) as rig:
            await trio.to_thread.run_sync(run_examples, rig)

    def run_examples(rig: Rig) -> None:
        @fuzz_settings(60)
        @given(ops=operations)
        def one(ops):
            count("ahci.hostile")
            trio.from_thread.run(example, rig, ops)

        drive(one)

    async def example(rig: Rig, ops: list) -> None:
        await _apply(rig, ops, paths)  # type: ignore[arg-type]
        await _settle_and_check(rig, failures, paths)  # type: ignore[arg-type]

    try:
        trio.run(main)
    finally:
        logger.removeHandler(failures)
