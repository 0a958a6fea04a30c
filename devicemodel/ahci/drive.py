"""What a port asks of the drive behind it, and what a drive answers.

A drive (``ata.AtaDisk``, ``atapi.AtapiCd``) gets each fetched command through
``execute``: a command that moves no data through the image is answered at once with a
``Done``; one that does returns a coroutine the port awaits in a task of its own (so NCQ
commands overlap). ``Done`` says how the command ended: the task-file status and error,
the bytes moved, whether data went by PIO (a PIO setup FIS goes first) and the shadow
registers the ending FIS carries.

``CommandLog`` records every command a guest sent, by opcode, and whether the drive
serves it: logged once per opcode at debug level (logger ``devicemodel.ahci.commands``),
counted for the monitor's ``devices`` command.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from . import regs as r
from .command import Command

log = logging.getLogger("devicemodel.ahci.commands")


@dataclass
class Done:
    """How a command ended."""

    status: int = r.ST_OK
    error: int = 0
    #: bytes moved between the drive and the PRD buffers (reported in PRDBC)
    count: int = 0
    #: data moved by PIO: a PIO setup FIS precedes the ending register FIS
    pio: bool = False
    #: data moved device to host (for the PIO setup FIS's direction bit)
    to_host: bool = True
    #: registers 4..13 of the ending FIS; None: those of the command
    shadow: bytes | None = None

    @property
    def failed(self) -> bool:
        return bool(self.status & r.ST_ERR)


def aborted(error: int = r.ER_ABRT, status: int = r.ST_DRDY | r.ST_ERR) -> Done:
    """A command the drive refuses (ABRT unless told otherwise)."""
    return Done(status=status, error=error)


Outcome = Done | Coroutine[Any, Any, Done]


class Drive(Protocol):
    """A drive on a port."""

    #: an ATAPI device (PxSIG, PxCMD.ATAPI)
    atapi: bool

    @property
    def signature(self) -> int: ...

    def reset(self) -> None:
        """A COMRESET or software reset reached the drive."""

    def queued(self, command: Command) -> bool:
        """An NCQ command (completed by a set device bits FIS, tag = slot)."""

    def execute(self, command: Command) -> Outcome: ...

    def counters(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


ATA_NAMES = {
    0x00: "NOP", 0x06: "DATA SET MANAGEMENT", 0x08: "DEVICE RESET", 0x20: "READ SECTOR(S)",
    0x24: "READ SECTOR(S) EXT", 0x25: "READ DMA EXT", 0x27: "READ NATIVE MAX ADDRESS EXT",
    0x29: "READ MULTIPLE EXT", 0x2F: "READ LOG EXT", 0x30: "WRITE SECTOR(S)",
    0x34: "WRITE SECTOR(S) EXT", 0x35: "WRITE DMA EXT", 0x39: "WRITE MULTIPLE EXT",
    0x3D: "WRITE DMA FUA EXT", 0x3F: "WRITE LOG EXT", 0x40: "READ VERIFY SECTOR(S)",
    0x42: "READ VERIFY SECTOR(S) EXT", 0x47: "READ LOG DMA EXT", 0x57: "WRITE LOG DMA EXT",
    0x60: "READ FPDMA QUEUED", 0x61: "WRITE FPDMA QUEUED", 0x63: "NCQ NON-DATA",
    0x64: "SEND FPDMA QUEUED", 0x65: "RECEIVE FPDMA QUEUED", 0x90: "EXECUTE DEVICE DIAGNOSTIC",
    0x91: "INITIALIZE DEVICE PARAMETERS", 0xA0: "PACKET", 0xA1: "IDENTIFY PACKET DEVICE",
    0xB0: "SMART", 0xB1: "DEVICE CONFIGURATION", 0xC4: "READ MULTIPLE", 0xC5: "WRITE MULTIPLE",
    0xC6: "SET MULTIPLE MODE", 0xC8: "READ DMA", 0xCA: "WRITE DMA",
    0xCE: "WRITE MULTIPLE FUA EXT", 0xE0: "STANDBY IMMEDIATE", 0xE1: "IDLE IMMEDIATE",
    0xE2: "STANDBY", 0xE3: "IDLE", 0xE4: "READ BUFFER", 0xE5: "CHECK POWER MODE",
    0xE6: "SLEEP", 0xE7: "FLUSH CACHE", 0xE8: "WRITE BUFFER", 0xEA: "FLUSH CACHE EXT",
    0xEC: "IDENTIFY DEVICE", 0xEF: "SET FEATURES", 0xF5: "SECURITY FREEZE LOCK",
    0xF8: "READ NATIVE MAX ADDRESS", 0xF9: "SET MAX ADDRESS",
}

SCSI_NAMES = {
    0x00: "TEST UNIT READY", 0x03: "REQUEST SENSE", 0x12: "INQUIRY", 0x1A: "MODE SENSE(6)",
    0x1B: "START STOP UNIT", 0x1E: "PREVENT ALLOW MEDIUM REMOVAL", 0x23: "READ FORMAT CAPACITIES",
    0x25: "READ CAPACITY(10)", 0x28: "READ(10)", 0x2B: "SEEK(10)", 0x42: "READ SUB-CHANNEL",
    0x43: "READ TOC/PMA/ATIP", 0x46: "GET CONFIGURATION", 0x4A: "GET EVENT STATUS NOTIFICATION",
    0x51: "READ DISC INFORMATION", 0x52: "READ TRACK INFORMATION", 0x55: "MODE SELECT(10)",
    0x5A: "MODE SENSE(10)", 0xA0: "REPORT LUNS", 0xA8: "READ(12)", 0xAC: "GET PERFORMANCE",
    0xAD: "READ DISC STRUCTURE", 0xBB: "SET CD SPEED", 0xBD: "MECHANISM STATUS", 0xBE: "READ CD",
}


class CommandLog:
    """Every opcode a drive was sent, with whether it is served."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.seen: Counter[str] = Counter()

    def note(self, kind: str, opcode: int, served: bool, detail: str = "") -> None:
        names = SCSI_NAMES if kind == "ATAPI" else ATA_NAMES
        key = f"{kind} {opcode:#04x} {names.get(opcode, '?')}" + ("" if served else
                                                                   " (not served)")
        if key not in self.seen:
            log.debug("%s: first %s%s", self.who, key, f" [{detail}]" if detail else "")
        self.seen[key] += 1

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.seen.items()))


__all__ = ["ATA_NAMES", "SCSI_NAMES", "CommandLog", "Done", "Drive", "Outcome", "aborted"]
