"""The FISes a drive sends back, written into the port's received-FIS area (SATA 3.x
§10.5): the register FIS that ends a command (or carries a reset's signature), the set
device bits FIS that completes queued (NCQ) commands, the PIO setup FIS in front of PIO
data (libahci reads a PIO data-in command's ending status from it)."""

from __future__ import annotations

import struct

from . import regs as r

_SDB = struct.Struct("<BBBBI")


def d2h(status: int, error: int, shadow: bytes, *, interrupt: bool) -> bytes:
    """A device-to-host register FIS: ``shadow`` holds bytes 4..13 (LBA, device, count)
    as a register FIS lays them out."""
    fis = bytearray(20)
    fis[0] = r.FIS_D2H
    fis[1] = r.FIS_I if interrupt else 0
    fis[2] = status
    fis[3] = error
    fis[4:14] = shadow[:10].ljust(10, b"\0")
    return bytes(fis)


def sdb(status: int, error: int, sactive: int, *, interrupt: bool) -> bytes:
    """A set device bits FIS: ``sactive`` are the NCQ tags it completes."""
    return _SDB.pack(r.FIS_SDB, r.FIS_I if interrupt else 0, status & 0x77, error, sactive)


def pio_setup(status: int, end_status: int, count: int, shadow: bytes, *,
              to_host: bool, interrupt: bool) -> bytes:
    """A PIO setup FIS: ``count`` bytes follow, ``end_status`` is the status once they
    have."""
    fis = bytearray(20)
    fis[0] = r.FIS_PIO_SETUP
    fis[1] = (r.FIS_I if interrupt else 0) | (r.FIS_D if to_host else 0)
    fis[2] = status
    fis[4:14] = shadow[:10].ljust(10, b"\0")
    fis[15] = end_status
    fis[16:18] = (count & 0xFFFF).to_bytes(2, "little")
    return bytes(fis)


def shadow_of(cfis: bytes) -> bytes:
    """Bytes 4..13 of a command FIS: what a register FIS echoes back."""
    return cfis[4:14]


def signature_shadow(signature: int) -> bytes:
    """The registers a reset leaves: count and LBA low 1, LBA mid/high the signature."""
    return bytes([signature >> 8 & 0xFF, signature >> 16 & 0xFF, signature >> 24 & 0xFF,
                  0, 0, 0, 0, 0, signature & 0xFF, 0])


__all__ = ["d2h", "pio_setup", "sdb", "shadow_of", "signature_shadow"]
