"""The data an ATAPI CD-ROM drive answers with (SPC-3 and MMC-5, the parts Linux's sr,
cdrom and libata layers read): INQUIRY, sense, capacity, the table of contents, the
feature list of GET CONFIGURATION, mode pages and media events.

One data track of 2048-byte blocks from LBA 0 (an ISO 9660 image), in one session;
addresses in LBA or MSF form (MSF counts the 150-block pregap, as CDs do).
"""

from __future__ import annotations

import struct

BLOCK = 2048
VENDOR, PRODUCT, REVISION = "ACRN-DM", "ACRN-DM DVD-ROM", "001"

# sense keys, and the (ASC, ASCQ) pairs we report
NO_SENSE, NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST, UNIT_ATTENTION = 0x0, 0x2, 0x3, 0x5, 0x6
NO_MEDIUM_TRAY_CLOSED, NO_MEDIUM_TRAY_OPEN = (0x3A, 0x01), (0x3A, 0x02)
INVALID_OPCODE, INVALID_FIELD, LBA_OUT_OF_RANGE = (0x20, 0), (0x24, 0), (0x21, 0)
SAVING_NOT_SUPPORTED, REMOVAL_PREVENTED = (0x39, 0), (0x53, 0x02)
MEDIUM_MAY_HAVE_CHANGED, READ_ERROR = (0x28, 0), (0x11, 0)

# GET EVENT STATUS NOTIFICATION: the media class and its event codes
EVENT_CLASS_MEDIA = 4
EV_NONE, EV_EJECT_REQUEST, EV_NEW_MEDIA, EV_MEDIA_REMOVAL = 0, 1, 2, 3
PROFILE_CD_ROM = 0x0008
LEAD_OUT = 0xAA


def ascii_field(text: str, n: int) -> bytes:
    return text.encode("ascii")[:n].ljust(n)


def inquiry() -> bytes:
    """Standard INQUIRY data: a removable CD/DVD device (type 5), SPC-3."""
    return (bytes([0x05, 0x80, 0x05, 0x02, 31, 0, 0, 0]) + ascii_field(VENDOR, 8)
            + ascii_field(PRODUCT, 16) + ascii_field(REVISION, 4))


def sense(key: int, asc: int, ascq: int) -> bytes:
    """Fixed-format sense data (18 bytes)."""
    data = bytearray(18)
    data[0], data[2], data[7], data[12], data[13] = 0x70, key, 10, asc, ascq
    return bytes(data)


def capacity(blocks: int) -> bytes:
    """READ CAPACITY(10): the last LBA and the block size."""
    return struct.pack(">II", max(blocks - 1, 0), BLOCK)


def _address(lba: int, msf: bool) -> bytes:
    if not msf:
        return struct.pack(">I", lba)
    m, s, f = msf_of(lba)
    return bytes([0, m, s, f])


def msf_of(lba: int) -> tuple[int, int, int]:
    """Minutes, seconds, frames of a block (after the 2-second pregap)."""
    lba += 150
    return min(lba // (75 * 60), 0xFF), lba // 75 % 60, lba % 75


def toc(blocks: int, fmt: int, msf: bool, start_track: int) -> bytes | None:
    """READ TOC/PMA/ATIP formats 0 (tracks), 1 (sessions) and 2 (raw TOC); None: the
    request is invalid."""
    if fmt == 0:
        if start_track > 1 and start_track != LEAD_OUT:
            return None
        body = b""
        if start_track <= 1:
            body += bytes([0, 0x14, 1, 0]) + _address(0, msf)
        body += bytes([0, 0x14, LEAD_OUT, 0]) + _address(blocks, msf)
        return struct.pack(">HBB", len(body) + 2, 1, 1) + body
    if fmt == 1:
        body = bytes([0, 0x14, 1, 0]) + _address(0, msf)
        return struct.pack(">HBB", len(body) + 2, 1, 1) + body
    if fmt == 2:
        lm, ls, lf = msf_of(blocks)
        # points A0 (first track 1, a CD-ROM disc), A1 (last track 1), A2 (lead-out),
        # then track 1 at 00:02:00
        points = [(0xA0, 1, 0, 0), (0xA1, 1, 0, 0), (0xA2, lm, ls, lf), (0x01, 0, 2, 0)]
        body = b"".join(bytes([1, 0x14, 0, point, 0, 0, 0, 0, pm, ps, pf])
                        for point, pm, ps, pf in points)
        return struct.pack(">HBB", len(body) + 2, 1, 1) + body
    return None


def _feature(number: int, data: bytes, *, current: bool, version: int = 0,
             persistent: bool = False) -> tuple[int, bool, bytes]:
    flags = version << 2 | (2 if persistent else 0) | (1 if current else 0)
    return number, current, struct.pack(">HBB", number, flags, len(data)) + data


def configuration(present: bool, rt: int, start: int) -> bytes | None:
    """GET CONFIGURATION: the feature header and the features ``rt`` asks for (0: all
    from ``start``, 1: the current ones from ``start``, 2: ``start`` alone); None:
    ``rt`` is invalid."""
    if rt == 3:
        return None
    features = [
        _feature(0x0000, struct.pack(">HBB", PROFILE_CD_ROM, 1 if present else 0, 0),
                 current=True, persistent=True),
        _feature(0x0001, struct.pack(">IB3x", 2, 0), current=True, persistent=True,
                 version=1),  # core: ATAPI
        _feature(0x0002, bytes([0x02, 0, 0, 0]), current=True, persistent=True, version=1),
        _feature(0x0003, bytes([0x29, 0, 0, 0]), current=True, persistent=True),  # tray
        _feature(0x0010, struct.pack(">IHBx", BLOCK, 1, 0), current=present),
        _feature(0x001E, bytes(4), current=present, version=2),  # CD read
        _feature(0x0100, b"", current=True, persistent=True),  # power management
    ]
    if rt == 0:
        chosen = [f for n, _, f in features if n >= start]
    elif rt == 1:
        chosen = [f for n, cur, f in features if n >= start and cur]
    else:
        chosen = [f for n, _, f in features if n == start]
    body = b"".join(chosen)
    profile = PROFILE_CD_ROM if present else 0
    return struct.pack(">IHH", len(body) + 4, 0, profile) + body


def _capabilities_page(locked: bool) -> bytes:
    page = bytearray(22)
    page[0], page[1] = 0x2A, 20
    page[4] = 0x71  # audio play, mode 2 form 1 and 2, multi-session
    page[6] = 0x20 | 0x08 | 0x01 | (0x02 if locked else 0)  # tray, eject, lock (+state)
    struct.pack_into(">HHHH", page, 8, 4224, 256, 512, 4224)  # speeds (kB/s), levels, buffer
    return bytes(page)


def _error_recovery_page() -> bytes:
    return bytes([0x01, 0x0A, 0x00, 5, 0, 0, 0, 0, 5, 0, 0, 0])


def mode_sense(page: int, pc: int, locked: bool) -> bytes | None:
    """MODE SENSE(10): the mode parameter header and the page(s); None: not a page we
    have. ``pc`` 1 (changeable values) reports every field fixed."""
    pages = {0x01: _error_recovery_page(), 0x2A: _capabilities_page(locked)}
    if page == 0x3F:
        chosen = list(pages.values())
    elif page in pages:
        chosen = [pages[page]]
    else:
        return None
    if pc == 1:
        chosen = [p[:2] + bytes(len(p) - 2) for p in chosen]
    body = b"".join(chosen)
    return struct.pack(">HBB2xH", len(body) + 6, 0, 0, 0) + body


def media_event(requested: int, event: int, tray_open: bool, present: bool) -> bytes:
    """GET EVENT STATUS NOTIFICATION (polled): the media class when asked for, else the
    no-event-available header."""
    if not requested & (1 << EVENT_CLASS_MEDIA):
        return bytes([0, 2, 0x80, 1 << EVENT_CLASS_MEDIA])
    status = (1 if tray_open else 0) | (2 if present else 0)
    return bytes([0, 6, EVENT_CLASS_MEDIA, 1 << EVENT_CLASS_MEDIA, event, status, 0, 0])


def disc_information() -> bytes:
    """READ DISC INFORMATION (standard): a complete, finalized single-session disc."""
    data = bytearray(34)
    struct.pack_into(">H", data, 0, 32)
    data[2] = 0x0E  # last session complete, disc complete, not erasable
    data[3:7] = bytes([1, 1, 1, 1])  # first track, sessions, first/last track of last
    data[7] = 0x20  # unrestricted use
    data[16:24] = b"\xff" * 8  # no lead-in / lead-out for a finalized disc
    return bytes(data)


def track_information(blocks: int, address_type: int, number: int) -> bytes | None:
    """READ TRACK INFORMATION of the one data track (by LBA inside it, by track number
    1 or by session number 1); None: no such track."""
    if address_type == 0 and number >= blocks:
        return None
    if address_type in (1, 2) and number != 1:
        return None
    if address_type == 3:
        return None
    data = bytearray(36)
    struct.pack_into(">H", data, 0, 34)
    data[2], data[3] = 1, 1  # track 1, session 1
    data[5] = 0x04  # a data track, recorded uninterrupted
    data[6] = 0x01  # data mode 1
    struct.pack_into(">II", data, 24, blocks, max(blocks - 1, 0))  # size, last recorded
    return bytes(data)


__all__ = ["BLOCK", "EV_EJECT_REQUEST", "EV_MEDIA_REMOVAL", "EV_NEW_MEDIA", "EV_NONE",
           "ILLEGAL_REQUEST", "MEDIUM_ERROR", "NOT_READY", "NO_SENSE", "UNIT_ATTENTION",
           "capacity", "configuration", "disc_information", "inquiry", "media_event",
           "mode_sense", "msf_of", "sense", "toc", "track_information"]
