"""The 512-byte IDENTIFY DEVICE (disk) and IDENTIFY PACKET DEVICE (CD-ROM) data
(ATA8-ACS §7.16-7.17): what Linux's libata, hdparm -I and Windows learn of a drive.

The strings are acrn-dm's (model "ACRN-DM SATA DISK", firmware "001", the serial from
the drive's option string), so a guest's /dev/disk/by-id names stay the same when
acrn-pydm replaces acrn-dm. Words are little endian; strings swap each byte pair;
word 255 carries the A5h signature and a checksum that makes the 512 bytes sum to 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DISK_MODEL = "ACRN-DM SATA DISK"
CD_MODEL = "ACRN-DM SATA DVD ROM"
FIRMWARE = "001"
#: commands per DATA SET MANAGEMENT in 512-byte blocks of range entries (word 105)
DSM_BLOCKS = 8
#: sectors per DRQ block of READ/WRITE MULTIPLE (word 47)
MAX_MULTIPLE = 16
QUEUE_DEPTH = 32

UDMA6 = 0x46  # SET FEATURES transfer-mode values: 0x40 | UDMA mode
MWDMA_BASE, UDMA_BASE, PIO_BASE = 0x20, 0x40, 0x08


def ata_string(text: str, nbytes: int) -> bytes:
    """An IDENTIFY string: space padded, each byte pair swapped."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes)
    return bytes(raw[i ^ 1] for i in range(nbytes))


def seal(words: list[int]) -> bytes:
    """The 256 words as bytes, with word 255's signature and checksum."""
    data = bytearray(struct.pack("<256H", *[w & 0xFFFF for w in words]))
    data[510] = 0xA5
    data[511] = -sum(data[:511]) & 0xFF
    return bytes(data)


def _put(words: list[int], first: int, raw: bytes) -> None:
    for i in range(len(raw) // 2):
        words[first + i] = raw[2 * i] | raw[2 * i + 1] << 8


def _transfer_words(words: list[int], xfer_mode: int) -> None:
    """Words 49-88 every drive shares: LBA/DMA capabilities, PIO/DMA modes supported and
    the one selected by SET FEATURES."""
    words[53] = 0x0006  # words 64-70 and 88 are valid
    words[63] = 0x0007  # multiword DMA 0-2 supported
    words[64] = 0x0003  # PIO 3-4
    words[65:69] = [120, 120, 120, 120]
    words[88] = 0x007F  # UDMA 0-6 supported
    if xfer_mode & 0xF8 == UDMA_BASE:
        words[88] |= 1 << (8 + (xfer_mode & 7))
    elif xfer_mode & 0xF8 == MWDMA_BASE:
        words[63] |= 1 << (8 + (xfer_mode & 7))


@dataclass(frozen=True)
class DiskIdentity:
    """What an ATA disk reports of itself."""

    serial: str
    sectors: int  # logical sectors
    logical: int = 512
    physical: int = 512
    write_cache: bool = False
    trim: bool = False
    xfer_mode: int = UDMA6
    multiple: int = MAX_MULTIPLE  # 0: READ/WRITE MULTIPLE not set up

    def data(self) -> bytes:
        w = [0] * 256
        w[0] = 0x0040  # a fixed (not removable) ATA device
        cyls = min(self.sectors // (16 * 63), 16383)
        w[1], w[3], w[6] = cyls, 16, 63  # the obsolete CHS view, as BIOSes still read it
        _put(w, 10, ata_string(self.serial, 20))
        _put(w, 23, ata_string(FIRMWARE, 8))
        _put(w, 27, ata_string(DISK_MODEL, 40))
        w[47] = 0x8000 | MAX_MULTIPLE
        w[49] = 0x0B00  # IORDY, LBA, DMA
        w[50] = 0x4000
        w[54:57] = [cyls, 16, 63]
        chs = cyls * 16 * 63
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        w[59] = 0x0100 | self.multiple if self.multiple else 0
        lba28 = min(self.sectors, 0x0FFF_FFFF)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        _transfer_words(w, self.xfer_mode)
        w[69] = (1 << 14 | 1 << 5) if self.trim else 0  # deterministic zeroes after TRIM
        w[75] = QUEUE_DEPTH - 1
        w[76] = 0x010E  # NCQ; SATA gen 1-3
        w[80] = 0x01F0  # ATA/ATAPI-4 .. ATA8-ACS
        w[82] = 0x0068  # look-ahead, write cache, power management
        w[83] = 0x7400  # FLUSH CACHE EXT, FLUSH CACHE, 48-bit addresses
        w[84] = 0x4060  # WRITE DMA FUA EXT and FPDMA FUA, general purpose logging
        w[85] = 0x0048 | (0x20 if self.write_cache else 0)
        w[86] = 0x3400
        w[87] = 0x4060
        w[93] = 0
        for i in range(4):
            w[100 + i] = self.sectors >> (16 * i) & 0xFFFF
        w[105] = DSM_BLOCKS if self.trim else 0
        ratio = self.physical // self.logical
        w[106] = 0x4000 | (0x2000 | (ratio.bit_length() - 1) if ratio > 1 else 0)
        if self.logical > 512:
            w[106] |= 0x1000
            words = self.logical // 2
            w[117], w[118] = words & 0xFFFF, words >> 16
        w[119] = w[120] = 0x4000
        w[169] = 1 if self.trim else 0
        w[217] = 1  # not a rotating medium
        w[222] = 0x103F  # serial ATA, SATA 1.0a .. 3.0
        return seal(w)


@dataclass(frozen=True)
class CdIdentity:
    """What an ATAPI CD-ROM reports to IDENTIFY PACKET DEVICE."""

    serial: str
    xfer_mode: int = UDMA6

    def data(self) -> bytes:
        w = [0] * 256
        # ATAPI, CD-ROM, removable, DRQ within 50 us, 12-byte packets
        w[0] = 2 << 14 | 5 << 8 | 1 << 7 | 2 << 5
        _put(w, 10, ata_string(self.serial, 20))
        _put(w, 23, ata_string(FIRMWARE, 8))
        _put(w, 27, ata_string(CD_MODEL, 40))
        w[49] = 0x0B00  # IORDY, LBA, DMA
        w[50] = 0x4000
        _transfer_words(w, self.xfer_mode)
        w[76] = 0x000E  # SATA gen 1-3
        w[80] = 0x01F0
        w[82] = 0x4210  # NOP, DEVICE RESET, PACKET
        w[83] = 0x4000
        w[84] = 0x4000
        w[85] = 0x4210
        w[87] = 0x4000
        w[222] = 0x103F
        return seal(w)


__all__ = ["CD_MODEL", "DISK_MODEL", "DSM_BLOCKS", "FIRMWARE", "MAX_MULTIPLE",
           "QUEUE_DEPTH", "UDMA6", "CdIdentity", "DiskIdentity", "ata_string", "seal"]
