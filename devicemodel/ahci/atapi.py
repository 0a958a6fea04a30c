"""An ATAPI CD-ROM drive on an AHCI port: the ATA commands a packet device answers
(IDENTIFY PACKET DEVICE, PACKET, DEVICE RESET, SET FEATURES) and the SCSI/MMC commands
that arrive in PACKET's command block, over an ISO image read through the block I/O
engine.

The tray and the medium are separate, as on a real drive: the guest's eject (START STOP
UNIT with LoEj) opens the tray and its load closes it again over the same disc; the
host changes or removes the disc through the monitor (``change_medium``), refused
while the guest holds the tray locked (PREVENT ALLOW MEDIUM REMOVAL) unless forced. A
new disc is reported as Linux looks for one: a UNIT ATTENTION (28h, medium may have
changed) on the next command and a NEW MEDIA event for GET EVENT STATUS NOTIFICATION.
A replaced image is closed once no read still uses it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from ..ratelimit import RateLimitedLog
from ..virtio.blk.io import DiskImage, NowaitIo, Runner, ThreadIo
from . import mmc
from . import regs as r
from .ata import INLINE_MAX
from .command import Command
from .drive import CommandLog, Done, Outcome, aborted, log
from .fis import signature_shadow
from .identify import MWDMA_BASE, PIO_BASE, UDMA6, UDMA_BASE, CdIdentity

PACKET, IDENTIFY_PACKET, DEVICE_RESET = 0xA0, 0xA1, 0x08
#: commands a pending UNIT ATTENTION does not stop (MMC-5 §4.1.6.1)
_NO_ATTENTION = {0x03, 0x12, 0x46, 0x4A}
_INTERRUPT_REASON_DONE = 0x03  # count register after a packet command: C/D and I/O


class AtapiCd:
    """A CD-ROM drive; ``image`` None is an empty drive."""

    atapi = True
    signature = r.SIG_ATAPI

    def __init__(self, image: DiskImage | None, run: Runner, serial: str, *,
                 who: str) -> None:
        self.run = run
        self.serial = serial
        self.who = who
        self.image: DiskImage | None = None
        self.io: ThreadIo | None = None
        self.nowait: NowaitIo | None = None
        self.tray_open = False
        self.locked = False
        self.xfer_mode = UDMA6
        self.sense_data = (mmc.NO_SENSE, 0, 0)
        self.attention: tuple[int, int, int] | None = None
        self.event = mmc.EV_NONE
        self.changes = 0
        self.io_errors = 0
        self._reads = 0
        self._retired: list[DiskImage] = []
        self.log = CommandLog(who)
        self._glog = RateLimitedLog(log)
        self._set_image(image)
        self._packets: dict[int, Callable[[bytes, Command], Outcome]] = {
            0x00: self._test_unit_ready, 0x03: self._request_sense, 0x12: self._inquiry,
            0x1B: self._start_stop, 0x1E: self._prevent_allow, 0x25: self._read_capacity,
            0x28: self._read, 0xA8: self._read, 0x2B: self._seek, 0x43: self._read_toc,
            0x46: self._get_configuration, 0x4A: self._event_status,
            0x51: self._disc_information, 0x52: self._track_information,
            0x5A: self._mode_sense, 0xBB: self._set_speed,
        }

    # --- the medium -----------------------------------------------------------------------
    @property
    def present(self) -> bool:
        return self.image is not None and not self.tray_open

    @property
    def blocks(self) -> int:
        return self.image.size // mmc.BLOCK if self.image is not None else 0

    def _set_image(self, image: DiskImage | None) -> None:
        old, self.image = self.image, image
        self.io = ThreadIo(image, self.run) if image is not None else None
        self.nowait = NowaitIo(image, self.who) if image is not None else None
        if old is not None:
            self._retired.append(old)
            self._close_retired()

    def _close_retired(self) -> None:
        if not self._reads:
            for image in self._retired:
                image.close()
            self._retired.clear()

    def change_medium(self, image: DiskImage | None, *, force: bool = False) -> None:
        """The host puts in a new disc (``image``), or takes the disc out (None).
        RuntimeError if the guest locked the tray and ``force`` is not given."""
        if self.locked and not force:
            if image is not None:
                image.close()
            raise RuntimeError("the guest has locked the tray (PREVENT MEDIUM REMOVAL); "
                               "force the change or eject in the guest first")
        self._set_image(image)
        self.changes += 1
        if image is None:
            self.tray_open = True
            self.event = mmc.EV_MEDIA_REMOVAL
            self.attention = None
        else:
            self.tray_open = False
            self.event = mmc.EV_NEW_MEDIA
            self.attention = (mmc.UNIT_ATTENTION, *mmc.MEDIUM_MAY_HAVE_CHANGED)

    # --- the Drive interface ------------------------------------------------------------
    def reset(self) -> None:
        self.sense_data = (mmc.NO_SENSE, 0, 0)

    def queued(self, command: Command) -> bool:
        return False

    def execute(self, command: Command) -> Outcome:
        op = command.opcode
        if op == PACKET:
            return self._packet(command)
        served = op in (IDENTIFY_PACKET, DEVICE_RESET, 0xEF, 0xE5, 0xE0, 0xE1, 0xE6)
        self.log.note("ATA", op, served)
        if op == IDENTIFY_PACKET:
            return Done(count=command.prdt.copy_in(
                CdIdentity(self.serial, self.xfer_mode).data()), pio=True)
        if op == DEVICE_RESET:
            self.reset()
            return Done(status=0, error=0x01, shadow=signature_shadow(self.signature))
        if op == 0xEF:
            return self._set_features(command)
        if op in (0xE5, 0xE0, 0xE1, 0xE6):  # power modes: always active
            return Done(shadow=bytes(8) + b"\xff\x00")
        # IDENTIFY DEVICE and the rest: abort, showing the packet signature (ACS §7.16)
        return aborted() if op != 0xEC else Done(
            status=r.ST_DRDY | r.ST_ERR, error=r.ER_ABRT,
            shadow=signature_shadow(self.signature))

    def counters(self) -> dict[str, Any]:
        return {"kind": "cd", "path": self.image.path if self.image is not None else None,
                "tray_open": self.tray_open, "locked": self.locked,
                "medium_changes": self.changes, "io_errors": self.io_errors,
                "commands": self.log.as_dict()}

    def close(self) -> None:
        self._reads = 0
        self._set_image(None)

    def _set_features(self, cmd: Command) -> Outcome:
        sub, mode = cmd.cfis[3], cmd.cfis[12]
        if sub == 0x03:
            if not (mode in (0, 1) or PIO_BASE <= mode <= PIO_BASE + 4
                    or MWDMA_BASE <= mode <= MWDMA_BASE + 2 or UDMA_BASE <= mode <= UDMA6):
                return aborted()
            self.xfer_mode = mode
            return Done()
        return Done() if sub in (0x66, 0xCC, 0xAA, 0x55) else aborted()

    # --- PACKET ---------------------------------------------------------------------------
    def _packet(self, cmd: Command) -> Outcome:
        cdb = cmd.acmd[:12]
        op = cdb[0]
        handler = self._packets.get(op)
        self.log.note("ATAPI", op, handler is not None)
        if handler is None:
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.INVALID_OPCODE)
        if self.attention is not None and op not in _NO_ATTENTION:
            key, asc, ascq = self.attention
            self.attention = None
            return self.check(key, asc, ascq)
        return handler(cdb, cmd)

    def check(self, key: int, asc: int, ascq: int) -> Done:
        """CHECK CONDITION: the sense is kept for REQUEST SENSE, its key goes to the
        error register."""
        self.sense_data = (key, asc, ascq)
        return Done(status=r.ST_DRDY | r.ST_ERR, error=key << 4,
                    shadow=self._done_shadow())

    def _done_shadow(self) -> bytes:
        return bytes(8) + bytes([_INTERRUPT_REASON_DONE, 0])

    def reply(self, cmd: Command, data: bytes, alloc: int) -> Done:
        """Data in: at most ``alloc`` bytes of ``data`` into the buffers."""
        self.sense_data = (mmc.NO_SENSE, 0, 0)
        count = cmd.prdt.copy_in(data[:alloc])
        return Done(count=count, pio=not cmd.features & 1, shadow=self._done_shadow())

    def ok(self) -> Done:
        self.sense_data = (mmc.NO_SENSE, 0, 0)
        return Done(shadow=self._done_shadow())

    def _not_ready(self) -> Done:
        return self.check(mmc.NOT_READY, *(mmc.NO_MEDIUM_TRAY_OPEN if self.tray_open
                                           else mmc.NO_MEDIUM_TRAY_CLOSED))

    def _test_unit_ready(self, cdb: bytes, cmd: Command) -> Outcome:
        return self.ok() if self.present else self._not_ready()

    def _request_sense(self, cdb: bytes, cmd: Command) -> Outcome:
        if self.attention is not None:
            key, asc, ascq = self.attention
            self.attention = None
        elif not self.present:
            key, asc, ascq = (mmc.NOT_READY, *(mmc.NO_MEDIUM_TRAY_OPEN if self.tray_open
                                               else mmc.NO_MEDIUM_TRAY_CLOSED))
        else:
            key, asc, ascq = self.sense_data
        return self.reply(cmd, mmc.sense(key, asc, ascq), cdb[4])

    def _inquiry(self, cdb: bytes, cmd: Command) -> Outcome:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        if cdb[1] & 1:  # vital product data: only the list of pages
            if cdb[2] != 0:
                return self.check(mmc.ILLEGAL_REQUEST, *mmc.INVALID_FIELD)
            return self.reply(cmd, bytes([0x05, 0, 0, 1, 0]), alloc)
        return self.reply(cmd, mmc.inquiry(), alloc)

    def _start_stop(self, cdb: bytes, cmd: Command) -> Outcome:
        start, load_eject = cdb[4] & 1, cdb[4] & 2
        if cdb[4] >> 4 or not load_eject:  # power conditions, spin up/down: nothing to do
            return self.ok()
        if start:  # load: close the tray over whatever disc is in it
            if self.tray_open:
                self.tray_open = False
                if self.image is not None:
                    self.event = mmc.EV_NEW_MEDIA
                    self.attention = (mmc.UNIT_ATTENTION, *mmc.MEDIUM_MAY_HAVE_CHANGED)
            return self.ok()
        if self.locked:
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.REMOVAL_PREVENTED)
        if not self.tray_open:
            self.tray_open = True
            self.event = mmc.EV_MEDIA_REMOVAL
        return self.ok()

    def _prevent_allow(self, cdb: bytes, cmd: Command) -> Outcome:
        self.locked = bool(cdb[4] & 1)
        return self.ok()

    def _read_capacity(self, cdb: bytes, cmd: Command) -> Outcome:
        if not self.present:
            return self._not_ready()
        return self.reply(cmd, mmc.capacity(self.blocks), 8)

    def _seek(self, cdb: bytes, cmd: Command) -> Outcome:
        return self.ok() if self.present else self._not_ready()

    def _set_speed(self, cdb: bytes, cmd: Command) -> Outcome:
        return self.ok()

    def _read(self, cdb: bytes, cmd: Command) -> Outcome:
        if cdb[0] == 0x28:
            lba, n = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        else:
            lba, n = struct.unpack_from(">II", cdb, 2)
        if not self.present:
            return self._not_ready()
        if lba + n > self.blocks:
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.LBA_OUT_OF_RANGE)
        if not n:
            return self.ok()
        length, offset, pio = n * mmc.BLOCK, lba * mmc.BLOCK, not cmd.features & 1
        views = cmd.prdt.views(length)
        nowait = self.nowait
        if (length <= INLINE_MAX and nowait is not None and nowait.can_read
                and nowait.read(views, offset) == length):  # from the page cache, at once
            self.sense_data = (mmc.NO_SENSE, 0, 0)
            return Done(count=length, pio=pio, shadow=self._done_shadow())
        return self._read_blocks(views, offset, length, pio=pio)

    async def _read_blocks(self, views: list[memoryview], offset: int, length: int, *,
                           pio: bool) -> Done:
        io, image = self.io, self.image
        assert io is not None and image is not None
        self._reads += 1
        try:
            await io.read(views, offset)
        except OSError as e:
            self.io_errors += 1
            self._glog.warning("%s: I/O error on %s: %s", self.who, image.path, e)
            return self.check(mmc.MEDIUM_ERROR, *mmc.READ_ERROR)
        finally:
            self._reads -= 1
            self._close_retired()
        self.sense_data = (mmc.NO_SENSE, 0, 0)
        return Done(count=length, pio=pio, shadow=self._done_shadow())

    def _read_toc(self, cdb: bytes, cmd: Command) -> Outcome:
        if not self.present:
            return self._not_ready()
        fmt = cdb[2] & 0x0F or cdb[9] >> 6
        data = mmc.toc(self.blocks, fmt, bool(cdb[1] & 2), cdb[6])
        if data is None:
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.INVALID_FIELD)
        return self.reply(cmd, data, struct.unpack_from(">H", cdb, 7)[0])

    def _get_configuration(self, cdb: bytes, cmd: Command) -> Outcome:
        data = mmc.configuration(self.present, cdb[1] & 3, struct.unpack_from(">H", cdb, 2)[0])
        if data is None:
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.INVALID_FIELD)
        return self.reply(cmd, data, struct.unpack_from(">H", cdb, 7)[0])

    def _event_status(self, cdb: bytes, cmd: Command) -> Outcome:
        if not cdb[1] & 1:  # only the polled form
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.INVALID_FIELD)
        data = mmc.media_event(cdb[4], self.event, self.tray_open, self.present)
        if cdb[4] & (1 << mmc.EVENT_CLASS_MEDIA):
            self.event = mmc.EV_NONE
        return self.reply(cmd, data, struct.unpack_from(">H", cdb, 7)[0])

    def _disc_information(self, cdb: bytes, cmd: Command) -> Outcome:
        if cdb[1] & 7:
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.INVALID_FIELD)
        if not self.present:
            return self._not_ready()
        return self.reply(cmd, mmc.disc_information(), struct.unpack_from(">H", cdb, 7)[0])

    def _track_information(self, cdb: bytes, cmd: Command) -> Outcome:
        if not self.present:
            return self._not_ready()
        data = mmc.track_information(self.blocks, cdb[1] & 3,
                                     struct.unpack_from(">I", cdb, 2)[0])
        if data is None:
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.INVALID_FIELD)
        return self.reply(cmd, data, struct.unpack_from(">H", cdb, 7)[0])

    def _mode_sense(self, cdb: bytes, cmd: Command) -> Outcome:
        pc, page = cdb[2] >> 6, cdb[2] & 0x3F
        if pc == 3:
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.SAVING_NOT_SUPPORTED)
        data = mmc.mode_sense(page, pc, self.locked)
        if data is None:
            return self.check(mmc.ILLEGAL_REQUEST, *mmc.INVALID_FIELD)
        return self.reply(cmd, data, struct.unpack_from(">H", cdb, 7)[0])


__all__ = ["AtapiCd"]
