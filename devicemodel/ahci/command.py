"""One issued command as the HBA fetches it from guest memory: its header in the command
list, the command FIS and ATAPI command of its table, and the PRD table that describes
its data buffers (AHCI 1.3.1 §4.2.2-4.2.3).

Everything here comes from the guest and is checked: an address outside guest memory is
a ``BusError`` (the port reports a host bus fatal error), a malformed header or FIS a
``FisError`` (an interface fatal error); the PRD table is read only as far as a command
needs, so a huge PRDTL costs nothing until a transfer walks it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..memory import GuestMemoryError, MemoryMap
from . import regs as r

_HDR = struct.Struct("<HHIQ")  # flags, PRDTL, PRDBC, CTBA
_PRD = struct.Struct("<QII")  # DBA, reserved, DBC | I
#: a command FIS is 5..16 dwords (a register FIS is 5)
CFL_MIN, CFL_MAX = 5, 16


class BusError(Exception):
    """A guest pointer (command list, table, PRD, FIS area) outside guest memory."""


class FisError(Exception):
    """A command header or FIS no device could accept."""


class ShortBuffer(Exception):
    """The PRD table holds fewer bytes than the command moves."""


def view(memory: MemoryMap, gpa: int, length: int) -> memoryview:
    """Guest memory, or BusError."""
    try:
        return memory.view(gpa, length)
    except GuestMemoryError as e:
        raise BusError(str(e)) from None


class Prdt:
    """A command's data buffers: PRDTL entries at ``gpa``, read as far as needed."""

    def __init__(self, memory: MemoryMap, gpa: int, entries: int) -> None:
        self.memory = memory
        self.gpa = gpa
        self.entries = entries

    def views(self, length: int) -> list[memoryview]:
        """Guest memory for the first ``length`` bytes of the buffers (BusError,
        ShortBuffer)."""
        out: list[memoryview] = []
        if length <= 0:
            return out
        if not self.entries:
            raise ShortBuffer(f"no PRD entries for {length} bytes")
        table = view(self.memory, self.gpa, self.entries * r.PRD_SIZE)
        left = length
        for dba, _, dbc in _PRD.iter_unpack(table):
            n = min((dbc & r.PRD_DBC_MASK) + 1, left)
            out.append(view(self.memory, dba & ~1, n))
            left -= n
            if not left:
                return out
        raise ShortBuffer(f"the PRD table holds {length - left} of {length} bytes")

    def capacity(self, limit: int) -> int:
        """Bytes the buffers hold, counting no further than ``limit``."""
        if not self.entries or limit <= 0:
            return 0
        table = view(self.memory, self.gpa, self.entries * r.PRD_SIZE)
        total = 0
        for _, _, dbc in _PRD.iter_unpack(table):
            total += (dbc & r.PRD_DBC_MASK) + 1
            if total >= limit:
                return limit
        return total

    def copy_in(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` (as much as the buffers hold) into the buffers: bytes written."""
        n = self.capacity(len(data))
        at = 0
        for v in self.views(n):
            v[:] = data[at : at + len(v)]
            at += len(v)
        return n

    def copy_out(self, length: int) -> bytes:
        """The first ``length`` bytes of the buffers (ShortBuffer if they hold fewer)."""
        return b"".join(bytes(v) for v in self.views(length))


@dataclass
class Command:
    """A fetched command: slot, header flags, the command FIS, the ATAPI command (if the
    header's A bit is set), and the data buffers."""

    slot: int
    flags: int
    cfis: bytes
    acmd: bytes
    prdt: Prdt
    #: where the header is, to write back the bytes transferred (PRDBC)
    header_gpa: int

    @property
    def opcode(self) -> int:
        return self.cfis[2]

    @property
    def is_command(self) -> bool:
        """Sets the command register (C bit); else a device control update."""
        return bool(self.cfis[1] & r.FIS_C)

    @property
    def features(self) -> int:
        return self.cfis[3] | self.cfis[11] << 8

    @property
    def count(self) -> int:
        """Sector count (16 bits as written; 0 means the maximum, see ``sectors``)."""
        return self.cfis[12] | self.cfis[13] << 8

    @property
    def device(self) -> int:
        return self.cfis[7]

    @property
    def control(self) -> int:
        return self.cfis[15]

    @property
    def lba48(self) -> int:
        c = self.cfis
        return (c[4] | c[5] << 8 | c[6] << 16 | c[8] << 24 | c[9] << 32 | c[10] << 40)

    @property
    def lba28(self) -> int:
        c = self.cfis
        return c[4] | c[5] << 8 | c[6] << 16 | (c[7] & 0x0F) << 24


def fetch(memory: MemoryMap, clb: int, slot: int) -> Command:
    """Read slot ``slot`` of the command list at ``clb`` and its command table."""
    header_gpa = clb + slot * r.HDR_SIZE
    flags, prdtl, _, ctba = _HDR.unpack(view(memory, header_gpa, _HDR.size))
    cfl = flags & r.HDR_CFL_MASK
    if not CFL_MIN <= cfl <= CFL_MAX:
        raise FisError(f"command FIS length {cfl} dwords")
    ctba &= ~0x7F  # 128-byte aligned, the low bits are reserved
    table = view(memory, ctba, r.CT_PRDT)
    cfis = bytes(table[r.CT_CFIS : r.CT_CFIS + 20])
    if cfis[0] != r.FIS_H2D:
        raise FisError(f"FIS type {cfis[0]:#04x} is not a host-to-device register FIS")
    acmd = bytes(table[r.CT_ACMD : r.CT_ACMD + 16])
    return Command(slot, flags | prdtl << 16, cfis, acmd,
                   Prdt(memory, ctba + r.CT_PRDT, prdtl), header_gpa)


def set_prdbc(memory: MemoryMap, command: Command, count: int) -> None:
    """Report the bytes transferred in the command's header (if it is still RAM)."""
    try:
        struct.pack_into("<I", memory.view(command.header_gpa + 4, 4), 0, count)
    except GuestMemoryError:
        pass


__all__ = ["BusError", "Command", "FisError", "Prdt", "ShortBuffer", "fetch", "set_prdbc",
           "view"]
