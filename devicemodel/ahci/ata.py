"""An ATA disk on an AHCI port: the ATA8-ACS commands Linux's libata, hdparm and Windows
send a SATA disk, over a raw image through the block I/O engine virtio-blk uses.

Reads and writes come in every form a host may use (PIO, DMA, 28- and 48-bit, FUA,
NCQ: READ/WRITE FPDMA QUEUED with the slot as tag); each one's data buffers are the
command's PRD entries in guest memory, handed to the engine as views. The cache mode
is virtio-blk's: writethrough unless the drive was given ``writeback``; the guest may
turn the write cache on or off (SET FEATURES 02h/82h, as virtio-blk's CONFIG_WCE), and
while it is off, or for a FUA write, a write returns once it is durable. FLUSH CACHE is
an fsync. TRIM (DATA SET MANAGEMENT) is offered when the image can punch holes, and
then reads zeroes. A failed NCQ command leaves the NCQ command error log (10h) that
libata reads with READ LOG EXT to find the failed tag.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from typing import Any

from ..ratelimit import RateLimitedLog
from ..virtio.blk.io import BlockIo, DiskImage, NowaitIo
from ..virtio.blk.io.image import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from . import regs as r
from .command import Command
from .drive import CommandLog, Done, Outcome, aborted, log
from .identify import (
    DSM_BLOCKS,
    MAX_MULTIPLE,
    MWDMA_BASE,
    PIO_BASE,
    UDMA6,
    UDMA_BASE,
    DiskIdentity,
)

READ_FPDMA, WRITE_FPDMA = 0x60, 0x61
#: the largest transfer tried on the event loop from the page cache (as virtio-blk's)
INLINE_MAX = 2 << 20
LOG_DIRECTORY, LOG_NCQ_ERROR = 0x00, 0x10
SF_WC_ON, SF_WC_OFF, SF_XFER = 0x02, 0x82, 0x03
SF_HARMLESS = {0xAA, 0x55, 0x66, 0xCC}  # look-ahead on/off, revert to defaults on/off
_DSM_ENTRY = struct.Struct("<Q")

#: opcode → (lba48, dma, write, fua)
_RW: dict[int, tuple[bool, bool, bool, bool]] = {
    0x20: (False, False, False, False), 0x24: (True, False, False, False),
    0x29: (True, False, False, False), 0xC4: (False, False, False, False),
    0xC8: (False, True, False, False), 0x25: (True, True, False, False),
    0x30: (False, False, True, False), 0x34: (True, False, True, False),
    0x39: (True, False, True, False), 0xC5: (False, False, True, False),
    0xCA: (False, True, True, False), 0x35: (True, True, True, False),
    0x3D: (True, True, True, True), 0xCE: (True, False, True, True),
}
_NO_DATA_OK = {0x91, 0xE0, 0xE1, 0xE2, 0xE3, 0xE6, 0x70}  # power modes, CHS set-up, seek


def can_punch_holes(image: DiskImage) -> bool:
    """Whether the image's file system deallocates ranges (probed past the end of the
    file, where nothing is stored); a block device is not probed."""
    if image.ro:
        return False
    try:
        st = os.fstat(image.fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        fallocate(image.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, st.st_size, 4096)
    except OSError:
        return False
    return True


class AtaDisk:
    """A SATA disk backed by ``image``; blocking calls go through ``io``."""

    atapi = False
    signature = r.SIG_ATA

    def __init__(self, image: DiskImage, io: BlockIo, serial: str, *, writeback: bool,
                 who: str) -> None:
        self.image = image
        self.io = io
        #: the page cache's data without a thread hand-off (io/nowait.py), when it has it
        self.nowait = NowaitIo(image, who)
        self.serial = serial
        self.who = who
        self.sector = image.sector_size
        self.sectors = image.size // self.sector
        self.physical = self.sector
        self.writeback_default = writeback
        self.write_cache = writeback
        self.trim = can_punch_holes(image)
        self.xfer_mode = UDMA6
        self.multiple = MAX_MULTIPLE
        #: the NCQ command error log (10h) after a queued command failed, else None
        self.ncq_error: bytes | None = None
        self.log = CommandLog(who)
        self.io_errors = 0
        self._glog = RateLimitedLog(log)
        self._handlers: dict[int, Callable[[Command], Outcome]] = {
            0xEC: self._identify, 0xEF: self._set_features, 0xC6: self._set_multiple,
            0xE7: self._flush, 0xEA: self._flush, 0x06: self._dsm, 0x2F: self._read_log,
            0x47: self._read_log, 0x40: self._verify, 0x42: self._verify,
            0xE5: self._check_power, 0x90: self._diagnostic,
            READ_FPDMA: self._queued, WRITE_FPDMA: self._queued,
        }
        for op in _RW:
            self._handlers[op] = self._rw
        for op in _NO_DATA_OK:
            self._handlers[op] = lambda cmd: Done()

    # --- the Drive interface ------------------------------------------------------------
    def reset(self) -> None:
        self.ncq_error = None

    def queued(self, command: Command) -> bool:
        return command.opcode in (READ_FPDMA, WRITE_FPDMA)

    def execute(self, command: Command) -> Outcome:
        handler = self._handlers.get(command.opcode)
        self.log.note("ATA", command.opcode, handler is not None)
        if handler is None:
            return aborted()
        return handler(command)

    def identity(self) -> DiskIdentity:
        return DiskIdentity(self.serial, self.sectors, self.sector, self.physical,
                            write_cache=self.write_cache, trim=self.trim,
                            xfer_mode=self.xfer_mode, multiple=self.multiple)

    def counters(self) -> dict[str, Any]:
        return {"kind": "hd", "path": self.image.path, "sectors": self.sectors,
                "write_cache": self.write_cache, "trim": self.trim,
                "io_errors": self.io_errors, "commands": self.log.as_dict()}

    def close(self) -> None:
        self.nowait.close()
        self.image.close()

    # --- reads and writes ---------------------------------------------------------------
    def _rw(self, cmd: Command) -> Outcome:
        lba48, dma, write, fua = _RW[cmd.opcode]
        if lba48:
            lba, n = cmd.lba48, cmd.count or 0x10000
        else:
            lba, n = cmd.lba28, cmd.cfis[12] or 0x100
        return self._transfer(cmd, lba, n, write=write, sync=fua or not self.write_cache,
                              pio=not dma)

    def _transfer(self, cmd: Command, lba: int, n: int, *, write: bool, sync: bool,
                  pio: bool) -> Outcome:
        if lba + n > self.sectors:
            return aborted(r.ER_IDNF)
        if write and self.image.ro:
            return aborted()
        length = n * self.sector
        views = cmd.prdt.views(length)
        offset = lba * self.sector
        if length <= INLINE_MAX:  # what the page cache can do at once needs no thread
            nowait = self.nowait
            if write:
                if not sync and nowait.can_write and nowait.write(views, offset, length):
                    return Done(count=length, pio=pio, to_host=False)
            elif nowait.can_read and nowait.read(views, offset) == length:
                return Done(count=length, pio=pio)
        return self._move(views, offset, length, write=write, sync=sync, pio=pio)

    async def _move(self, views: list[memoryview], offset: int, length: int, *,
                    write: bool, sync: bool, pio: bool) -> Done:
        try:
            if write:
                await self.io.write(views, offset, sync)
            else:
                await self.io.read(views, offset)
        except OSError as e:
            self._io_error(e)
            return aborted(r.ER_ABRT if write else r.ER_UNC)
        return Done(count=length, pio=pio, to_host=not write)

    def _queued(self, cmd: Command) -> Outcome:
        """READ/WRITE FPDMA QUEUED: count in the features, the tag is the slot, FUA is
        the device register's bit 7; a failure fills the NCQ error log."""
        write = cmd.opcode == WRITE_FPDMA
        lba, n = cmd.lba48, cmd.features or 0x10000
        fua = bool(cmd.device & 0x80)
        out = self._transfer(cmd, lba, n, write=write, sync=fua or not self.write_cache,
                             pio=False)
        if isinstance(out, Done):
            self._note_ncq(cmd, out)
            return out
        return self._queued_done(cmd, out)

    async def _queued_done(self, cmd: Command, pending: Any) -> Done:
        done: Done = await pending
        self._note_ncq(cmd, done)
        return done

    def _note_ncq(self, cmd: Command, done: Done) -> None:
        if not done.failed:
            return
        page = bytearray(512)
        page[0] = cmd.slot & 0x1F
        page[2], page[3] = done.status, done.error
        page[4:7] = cmd.cfis[4:7]
        page[7] = cmd.device
        page[8:11] = cmd.cfis[8:11]
        page[12:14] = cmd.cfis[12:14]
        page[511] = -sum(page) & 0xFF
        self.ncq_error = bytes(page)

    def _io_error(self, e: OSError) -> None:
        self.io_errors += 1
        self._glog.warning("%s: I/O error on %s: %s", self.who, self.image.path, e)

    # --- cache, trim, verify ------------------------------------------------------------
    def _flush(self, cmd: Command) -> Outcome:
        return self._do_flush()

    async def _do_flush(self) -> Done:
        try:
            await self.io.flush()
        except OSError as e:
            self._io_error(e)
            return aborted()
        return Done()

    def _dsm(self, cmd: Command) -> Outcome:
        """DATA SET MANAGEMENT with TRIM: ``count`` 512-byte blocks of 8-byte entries,
        each a 48-bit LBA and a 16-bit length (0: unused)."""
        blocks = cmd.count
        if not cmd.features & 1 or not self.trim or not 1 <= blocks <= DSM_BLOCKS:
            return aborted()
        data = cmd.prdt.copy_out(blocks * 512)
        ranges: list[tuple[int, int]] = []
        for (entry,) in _DSM_ENTRY.iter_unpack(data):
            lba, n = entry & 0xFFFF_FFFF_FFFF, entry >> 48
            if not n:
                continue
            if lba + n > self.sectors:
                return aborted(r.ER_IDNF)
            if ranges and ranges[-1][0] + ranges[-1][1] == lba:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
            else:
                ranges.append((lba, n))
        return self._trim(ranges, len(data))

    async def _trim(self, ranges: list[tuple[int, int]], count: int) -> Done:
        sync = not self.write_cache
        try:
            for lba, n in ranges:
                await self.io.discard(lba * self.sector, n * self.sector, sync)
        except OSError as e:
            self._io_error(e)
            return aborted()
        return Done(count=count, to_host=False)

    def _verify(self, cmd: Command) -> Outcome:
        if cmd.opcode == 0x42:
            lba, n = cmd.lba48, cmd.count or 0x10000
        else:
            lba, n = cmd.lba28, cmd.cfis[12] or 0x100
        return aborted(r.ER_IDNF) if lba + n > self.sectors else Done()

    # --- identification and settings ----------------------------------------------------
    def _identify(self, cmd: Command) -> Outcome:
        return Done(count=cmd.prdt.copy_in(self.identity().data()), pio=True)

    def _set_features(self, cmd: Command) -> Outcome:
        sub = cmd.cfis[3]
        if sub == SF_WC_ON:
            self.write_cache = True
        elif sub == SF_WC_OFF:
            self.write_cache = False
        elif sub == SF_XFER:
            mode = cmd.cfis[12]
            if not (mode in (0, 1) or PIO_BASE <= mode <= PIO_BASE + 4
                    or MWDMA_BASE <= mode <= MWDMA_BASE + 2
                    or UDMA_BASE <= mode <= UDMA6):
                return aborted()
            self.xfer_mode = mode
        elif sub not in SF_HARMLESS:
            return aborted()
        return Done()

    def _set_multiple(self, cmd: Command) -> Outcome:
        n = cmd.cfis[12]
        if n and (n > MAX_MULTIPLE or n & (n - 1)):
            return aborted()
        self.multiple = n
        return Done()

    def _check_power(self, cmd: Command) -> Outcome:
        shadow = bytearray(cmd.cfis[4:14])
        shadow[8] = 0xFF  # count: active or idle
        return Done(shadow=bytes(shadow))

    def _diagnostic(self, cmd: Command) -> Outcome:
        from .fis import signature_shadow

        return Done(error=0x01, shadow=signature_shadow(self.signature))

    def _read_log(self, cmd: Command) -> Outcome:
        """READ LOG (DMA) EXT of the log directory and the NCQ command error log; reading
        the latter ends the NCQ error condition."""
        address, page, pages = cmd.cfis[4], cmd.cfis[5] | cmd.cfis[9] << 8, cmd.count
        if address == LOG_DIRECTORY and page == 0 and pages:
            data = bytearray(512)
            data[0] = 1  # general purpose logging version 1
            data[2 * LOG_NCQ_ERROR] = 1
        elif address == LOG_NCQ_ERROR and page == 0 and pages:
            data = bytearray(self.ncq_error or bytes(512))
            data[0] |= 0 if self.ncq_error else 0x80  # NQ: no queued command failed
            data[511] = -sum(data[:511]) & 0xFF
            self.ncq_error = None
        else:
            return aborted()
        count = cmd.prdt.copy_in(bytes(data))
        return Done(count=count, pio=cmd.opcode == 0x2F)


__all__ = ["AtaDisk", "can_punch_holes"]
