"""A disk image: a raw file or block device, the byte range a guest sees of it, and the
system calls that move data between it and guest-memory views.

Offsets are relative to the start of the disk the guest sees (``range=`` may make that
a window of the file). Every blocking call here runs wherever its caller puts it (a
thread pool, an I/O thread, a data-plane thread); ``try_read``/``try_write`` never wait
for the disk (``RWF_NOWAIT``), so the event loop may call them. Data is sacred: a write
with ``sync`` returns only once ``fdatasync`` did, and a short transfer is an error.

The module-level functions are the system-call layer (tests replace them to simulate a
slow disk or a cold page cache).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable, Sequence

from ....errors import ConfigError

SECTOR = 512
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
BLKGETSIZE64 = 0x80081272
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
for _op in (_libc.preadv, _libc.pwritev):  # a ready-made struct iovec array (bytes)
    _op.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int64]
    _op.restype = ctypes.c_ssize_t

#: One write of a batch: (offset, length, the guest buffers holding its data).
Write = tuple[int, int, list[memoryview]]


# -- the system-call layer ---------------------------------------------------------------


def _advance(views: list[memoryview], n: int) -> None:
    while n and views:
        if n >= len(views[0]):
            n -= len(views.pop(0))
        else:
            views[0] = views[0][n:]
            n = 0


def _transfer_all(op: Callable[[int, list[memoryview], int], int], fd: int,
                  views: list[memoryview], offset: int, what: str) -> None:
    views = [v for v in views if len(v)]
    while views:
        n = op(fd, views[:IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"short {what} the image")
        offset += n
        _advance(views, n)


def preadv_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Fill every view from ``offset`` (OSError if the file ends first)."""
    if len(views) > IOV_MAX or os.preadv(fd, views, offset) != sum(map(len, views)):
        _transfer_all(os.preadv, fd, views, offset, "read from")  # rare: start over


def pwritev_all(fd: int, views: list[memoryview], offset: int, sync: bool) -> None:
    """Write every view at ``offset``, then ``fdatasync`` if ``sync``."""
    if len(views) > IOV_MAX or os.pwritev(fd, views, offset) != sum(map(len, views)):
        _transfer_all(os.pwritev, fd, views, offset, "write to")  # rare: start over
    if sync:
        os.fdatasync(fd)


def preadv_nowait(fd: int, views: list[memoryview], offset: int) -> int:
    """One read from the page cache (BlockingIOError if it would wait for the disk)."""
    return os.preadv(fd, views, offset, os.RWF_NOWAIT)


def pwritev_nowait(fd: int, views: list[memoryview], offset: int) -> int:
    """One write into the page cache (BlockingIOError if it would wait)."""
    return os.pwritev(fd, views, offset, os.RWF_NOWAIT)


def transfer_iov(write: bool, fd: int, iov: bytes, count: int, offset: int) -> int:
    """One ``preadv``/``pwritev`` of ``count`` iovecs already laid out in ``iov`` (the
    caller built them inside guest RAM: virtio/bulk.py); bytes moved, -1 on error. A
    signal does not cut it short (EINTR: again)."""
    op = _libc.pwritev if write else _libc.preadv
    while True:
        n = op(fd, iov, count, offset)
        if n >= 0 or ctypes.get_errno() != errno.EINTR:
            return n


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); a signal (a data-plane thread's relaxed peer-write guard) is retried,
    as Python's own calls do."""
    while _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        if e != errno.EINTR:
            raise OSError(e, os.strerror(e))


def _unsupported(e: OSError) -> bool:
    return e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


# -- the image -----------------------------------------------------------------------------


class DiskImage:
    """An open image: ``size`` bytes from ``base`` of ``fd``, read-only or not."""

    def __init__(self, fd: int, size: int, *, base: int = 0, ro: bool = False,
                 path: str = "", sector_size: int = SECTOR) -> None:
        self.fd = fd
        self.size = size
        self.base = base
        self.ro = ro
        self.path = path
        self.sector_size = sector_size
        #: RWF_NOWAIT works here (cleared when the file system says it cannot: ext4
        #: refuses it for buffered writes)
        self.nowait_read = self.nowait_write = hasattr(os, "RWF_NOWAIT")

    @classmethod
    def open(cls, path: str, *, ro: bool = False, sector_size: int = SECTOR,
             range_start: int | None = None, range_size: int | None = None,
             who: str = "disk") -> DiskImage:
        """Open ``path`` (read-only if it cannot be written, as acrn-dm does); the range
        counts in ``sector_size`` units. ConfigError, naming ``who``, if it cannot serve."""
        fd, ro = _open(path, ro, who)
        image = cls(fd, 0, path=path, ro=ro, sector_size=sector_size)
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                size = struct.unpack("<Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                raise ConfigError(f"{who}: {path} is not a regular file or block device")
            if range_start is not None:
                start = range_start * sector_size
                length = (range_size or 0) * sector_size
                if not length or start + length > size:
                    raise ConfigError(f"{who}: range={range_start}/{range_size}: "
                                      f"outside {path} ({size} bytes)")
                image.base, size = start, length
            if size < SECTOR or size % SECTOR:
                raise ConfigError(f"{who}: {path}: size {size} is not a non-zero "
                                  "multiple of 512 bytes")
            image.size = size
        except BaseException:
            image.close()
            raise
        return image

    def in_range(self, offset: int, length: int) -> bool:
        """Whether [offset, offset+length) is whole logical sectors inside the disk."""
        return (offset % self.sector_size == 0 and length % self.sector_size == 0
                and offset + length <= self.size)

    # -- blocking --------------------------------------------------------------------

    def read(self, views: list[memoryview], offset: int) -> None:
        preadv_all(self.fd, views, self.base + offset)

    def write(self, views: list[memoryview], offset: int, sync: bool) -> None:
        pwritev_all(self.fd, views, self.base + offset, sync)

    def transfer_iov(self, write: bool, iov: bytes, count: int, offset: int, length: int,
                     sync: bool = False) -> bool:
        """Move ``length`` bytes at ``offset`` through a ready-made iovec array in one
        call, a write with ``sync`` made durable (OSError if that fails); False if the
        call fell short or failed: the caller redoes the request the general way, which
        retries and reports."""
        if transfer_iov(write, self.fd, iov, count, self.base + offset) != length:
            return False
        if write and sync:
            os.fdatasync(self.fd)
        return True

    def write_batch(self, writes: Sequence[Write], sync: bool
                    ) -> tuple[list[bool], OSError | None]:
        """Write each of a batch (writes that continue one another in one ``pwritev``),
        then ``fdatasync`` once if ``sync``: whether each landed, and the last error. A
        write counts only once its data is on the image (and synced, if asked)."""
        done = [False] * len(writes)
        error: OSError | None = None
        i = 0
        while i < len(writes):
            start, length, views = writes[i]
            views = list(views)
            j = i + 1
            while (j < len(writes) and writes[j][0] == start + length
                   and len(views) + len(writes[j][2]) <= IOV_MAX):
                views += writes[j][2]
                length += writes[j][1]
                j += 1
            try:
                pwritev_all(self.fd, views, self.base + start, False)
            except OSError as e:
                error = e
            else:
                done[i:j] = [True] * (j - i)
            i = j
        if sync and any(done):
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                return [False] * len(writes), e
        return done, error

    def flush(self) -> None:
        """Make every completed write durable."""
        if not self.ro:
            os.fsync(self.fd)

    def write_zeroes(self, offset: int, length: int, unmap: bool, sync: bool) -> None:
        """Make the range read as zeroes, deallocating it only if ``unmap``: the first of
        punch-hole (if allowed), zero-range and plain zero writes the file system takes."""
        offset += self.base
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                break
            except OSError as e:
                if not _unsupported(e):
                    raise
        else:
            zeros = memoryview(bytes(min(length, 1 << 20)))
            while length:
                n = os.pwrite(self.fd, zeros[: min(length, len(zeros))], offset)
                offset += n
                length -= n
        if sync:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int, sync: bool) -> None:
        """Deallocate the range if the file system can; a no-op otherwise (a discard is
        a hint)."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      self.base + offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        if sync:
            os.fdatasync(self.fd)

    # -- non-blocking (the page cache only) ------------------------------------------

    def try_read(self, views: list[memoryview], offset: int) -> int:
        """Bytes read from the page cache without waiting for the disk, or -1."""
        try:
            return preadv_nowait(self.fd, views, self.base + offset)
        except BlockingIOError:
            return -1
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # the file system cannot
                self.nowait_read = False
            return -1

    def try_write(self, views: list[memoryview], offset: int, length: int) -> bool:
        """Write ``length`` bytes into the page cache without waiting; False: nothing
        or part of it was written, the caller writes it all with :meth:`write`."""
        try:
            return pwritev_nowait(self.fd, views, self.base + offset) == length
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # e.g. ext4: never inline
                self.nowait_write = False
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(path: str, ro: bool, who: str) -> tuple[int, bool]:
    """Open without blocking on a FIFO that has no writer (it is refused later): the fd,
    and whether it is read-only (as asked, or because writing was refused)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    try:
        try:
            fd = os.open(path, flags | (os.O_RDONLY if ro else os.O_RDWR))
        except PermissionError:
            if ro:
                raise
            fd = os.open(path, flags | os.O_RDONLY)  # as acrn-dm: fall back to ro
            ro = True
    except OSError as e:
        raise ConfigError(f"{who}: cannot open {path}: {e.strerror}") from None
    os.set_blocking(fd, True)
    return fd, ro
