"""virtio-blk (virtio 1.2 §5.2) over a raw image file or block device.

Data moves with ``os.preadv``/``os.pwritev`` straight between the image and guest RAM
memoryviews. A request the page cache can serve at once (``RWF_NOWAIT``) is done on the
event loop; every other one runs on the device's bounded thread pool, many in flight (one
trio task each), since a thread hand-off costs far more than a cached 4 KiB copy. The
worker takes the ring in batches: a plain read (header, one data buffer, status byte) skips
the general parser, reads that continue one another share one ``preadv`` (big ones are
copied on two CPUs, ``copier.py``: the loop's memcpy is a sequential stream's limit), and a batch
ends with one used-index store and at most one interrupt. Host I/O errors become
VIRTIO_BLK_S_IOERR for that request; only a driver that breaks the request format (no
header, no status byte) stops the device.

Data is sacred: the default is writethrough (fdatasync after every write), a flush is an
fsync, and writeback is used only if asked for (``writeback``) and the driver can flush.

Options, in acrn-dm's syntax (acrn-facts §4.2)::

    virtio-blk,[iothread[=N],][mq=N,]<path>|nodisk[,writeback|writethru|ro
               |discard[=max_sectors:max_seg:align]|sectorsize=<s>[/<ps>]
               |range=<start_lba>/<size>|aio=threads]

``range`` counts in logical sectors (``sectorsize``), as acrn-dm does. ``nocache``,
``no_bst_block`` and ``aio=io_uring`` are acrn-dm options we refuse by name.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import stat
import struct
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from ..errors import ConfigError
from .copier import CopyThread
from .device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    PciIds,
    VirtioDevice,
)
from .queue import DescriptorChain, Virtqueue, VirtqueueError

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_CONFIG_WCE = 1 << 11
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# Request types and status (§5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # header and status take two descriptors of a direct chain
SIZE_MAX = 1 << 20  # largest single segment we advertise
CONFIG_SIZE = 60  # through write_zeroes_may_unmap and its padding
CFG_WRITEBACK = 32
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
INLINE_MAX = 2 << 20  # largest read tried on the event loop (a memcpy from page cache)
INLINE_BATCH = 32  # requests popped and completed between interrupts/yields
COALESCE_MAX = 2 << 20  # sequential inline reads merged into one preadv up to this size
PARALLEL_MIN = 512 << 10  # reads this big are copied on two CPUs (copier.py)

_HDR = struct.Struct("<IIQ")  # type, reserved/ioprio, sector
_SEG = struct.Struct("<QII")  # sector, num_sectors, flags
_CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass(frozen=True)
class BlkOptions:
    """A parsed ``virtio-blk`` option string."""

    path: str | None  # None: nodisk
    ro: bool = False
    writeback: bool = False
    sectorsize: int = SECTOR
    physical_sectorsize: int = SECTOR
    range_start: int | None = None  # in logical sectors
    range_size: int | None = None
    discard: bool = False
    max_discard_sectors: int | None = None
    max_discard_seg: int = 1
    discard_alignment: int = 0
    mq: int = 1
    iothread: int = 0  # accepted for compatibility; trio tasks serve every queue
    text: str = ""  # the whole option string: the disk id is derived from it


def _int(opt: str, value: str) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise ConfigError(f"virtio-blk: {opt}: {value!r} is not a decimal number") from None
    if n < 0:
        raise ConfigError(f"virtio-blk: {opt}: must not be negative")
    return n


def parse_blk_options(text: str) -> BlkOptions:
    """Parse acrn-dm's virtio-blk options; a wrong option is named in the ConfigError."""
    tokens = text.split(",") if text else []
    kw: dict[str, object] = {"text": text}
    i = 0
    while i < len(tokens) and (tokens[i].startswith("iothread") or tokens[i].startswith("mq=")):
        tok = tokens[i]
        key, eq, val = tok.partition("=")
        if key == "iothread":
            kw["iothread"] = _int(tok, val) if eq else 1
        elif key == "mq":
            n = _int(tok, val)
            if not 1 <= n <= 64:
                raise ConfigError(f"virtio-blk: {tok}: mq must be 1..64")
            kw["mq"] = n
        else:
            raise ConfigError(f"virtio-blk: unknown option {tok!r}")
        i += 1
    if i >= len(tokens) or not tokens[i]:
        raise ConfigError("virtio-blk: expected an image path or nodisk, e.g. "
                          "-s 3,virtio-blk,/var/lib/vm/disk.img")
    kw["path"] = None if tokens[i] == "nodisk" else tokens[i]
    for tok in tokens[i + 1 :]:
        key, eq, val = tok.partition("=")
        if tok == "writeback":
            kw["writeback"] = True
        elif tok == "writethru":
            kw["writeback"] = False
        elif tok == "ro":
            kw["ro"] = True
        elif key == "discard":
            kw["discard"] = True
            if eq:
                parts = val.split(":")
                if len(parts) != 3:
                    raise ConfigError(f"virtio-blk: {tok}: expected discard="
                                      "<max_sectors>:<max_seg>:<align>")
                kw["max_discard_sectors"] = _int(tok, parts[0])
                kw["max_discard_seg"] = max(1, _int(tok, parts[1]))
                kw["discard_alignment"] = _int(tok, parts[2])
        elif key == "sectorsize" and eq:
            s, _, ps = val.partition("/")
            ss = _int(tok, s)
            pss = _int(tok, ps) if ps else ss
            if ss < SECTOR or ss & (ss - 1) or pss & (pss - 1) or pss < ss or ss > 4096:
                raise ConfigError(f"virtio-blk: {tok}: sector sizes must be powers of two, "
                                  "512 <= sectorsize <= 4096 and <= the physical size")
            kw["sectorsize"], kw["physical_sectorsize"] = ss, pss
        elif key == "range" and eq:
            start, slash, size = val.partition("/")
            if not slash:
                raise ConfigError(f"virtio-blk: {tok}: expected range=<start_lba>/<size>")
            kw["range_start"], kw["range_size"] = _int(tok, start), _int(tok, size)
        elif key == "aio" and val == "threads":
            pass
        elif tok in ("nocache", "no_bst_block") or key == "aio":
            raise ConfigError(f"virtio-blk: option {tok!r} is not supported by acrn-pydm")
        else:
            raise ConfigError(f"virtio-blk: unknown option {tok!r}")
    if kw["path"] is None and (kw.get("range_start") is not None or kw.get("discard")):
        raise ConfigError("virtio-blk: nodisk takes no range= or discard option")
    return BlkOptions(**kw)  # type: ignore[arg-type]


def disk_ident(text: str) -> bytes:
    """acrn-dm's serial: "ACRN--" and six bytes of the MD5 of the option string."""
    d = hashlib.md5(text.encode(), usedforsecurity=False).digest()
    return "ACRN--{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}".format(*d[:6]).encode()


# -- blocking helpers (run on the thread pool) -------------------------------------------


def _advance(views: list[memoryview], n: int) -> None:
    while n and views:
        if n >= len(views[0]):
            n -= len(views.pop(0))
        else:
            views[0] = views[0][n:]
            n = 0


def _preadv_all(fd: int, views: list[memoryview], offset: int) -> None:
    if len(views) <= IOV_MAX and os.preadv(fd, views, offset) == sum(map(len, views)):
        return  # the usual case: one call did it all
    views = [v for v in views if len(v)]
    while views:
        n = os.preadv(fd, views[:IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short read from the image")
        offset += n
        _advance(views, n)


def _preadv_nowait(fd: int, views: list[memoryview], offset: int) -> int:
    """One non-blocking read from the page cache (raises BlockingIOError if not cached)."""
    return os.preadv(fd, views, offset, os.RWF_NOWAIT)


def _pwritev_nowait(fd: int, views: list[memoryview], offset: int) -> int:
    return os.pwritev(fd, views, offset, os.RWF_NOWAIT)


def _pwritev_all(fd: int, views: list[memoryview], offset: int, sync: bool) -> None:
    if len(views) <= IOV_MAX and os.pwritev(fd, views, offset) == sum(map(len, views)):
        views = []  # the usual case: one call did it all
    else:
        views = [v for v in views if len(v)]
    while views:
        n = os.pwritev(fd, views[:IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write to the image")
        offset += n
        _advance(views, n)
    if sync:
        os.fdatasync(fd)


def _iovecs(lo: memoryview, addrs: Sequence[int], lens: Sequence[int],
            stop: int) -> list[memoryview]:
    """Views of ``lo`` for buffers 1..stop-1 of a chain, one per guest-physically
    contiguous run (Linux often hands out adjacent pages); the caller checked bounds."""
    out: list[memoryview] = []
    start = end = -1
    for a, n in zip(addrs[1:stop], lens[1:stop], strict=True):
        if a == end:
            end += n
            continue
        if end > start:
            out.append(lo[start:end])
        start, end = a, a + n
    if end > start:
        out.append(lo[start:end])
    return out


def _pwrite_batch(fd: int, writes: list[tuple[int, memoryview, int, int, list[memoryview]]],
                  sync: bool) -> tuple[list[int], OSError | None]:
    """Write every request of a batch (writes that continue one another in one
    ``pwritev``), then fdatasync once if ``sync``: the status of each and the last error.
    A request is OK only once its data is on the image (and synced, if asked)."""
    statuses = [VIRTIO_BLK_S_IOERR] * len(writes)
    error: OSError | None = None
    i = 0
    while i < len(writes):
        _, _, start, length, views = writes[i]
        views = list(views)
        j = i + 1
        while (j < len(writes) and writes[j][2] == start + length
               and len(views) + len(writes[j][4]) <= IOV_MAX):
            views += writes[j][4]
            length += writes[j][3]
            j += 1
        try:
            _pwritev_all(fd, views, start, False)
        except OSError as e:
            error = e
        else:
            statuses[i:j] = [VIRTIO_BLK_S_OK] * (j - i)
        i = j
    if sync and VIRTIO_BLK_S_OK in statuses:
        try:
            os.fdatasync(fd)
        except OSError as e:
            return [VIRTIO_BLK_S_IOERR] * len(writes), e
    return statuses, error


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _zero_range(fd: int, offset: int, length: int, unmap: bool, sync: bool) -> None:
    """Make [offset, offset+length) read as zeroes, deallocating only if ``unmap``."""
    modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []
    modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
    for mode in modes:
        try:
            _fallocate(fd, mode, offset, length)
            break
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
    else:
        zeros = bytes(min(length, 1 << 20))
        while length:
            n = os.pwrite(fd, memoryview(zeros)[: min(length, len(zeros))], offset)
            offset += n
            length -= n
    if sync:
        os.fdatasync(fd)


def _discard(fd: int, offset: int, length: int, sync: bool) -> None:
    try:
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise  # a discard the backend cannot do is a no-op, as the spec allows
    if sync:
        os.fdatasync(fd)


# -- request plumbing --------------------------------------------------------------------


def _take_front(views: list[memoryview], n: int) -> tuple[bytes, list[memoryview]]:
    """The first ``n`` bytes of a buffer list, and the views after them."""
    if views and len(views[0]) >= n:
        first = views[0]
        rest = [first[n:]] + views[1:] if len(first) > n else views[1:]
        return bytes(first[:n]), rest
    out = bytearray()
    rest = list(views)
    while rest and len(out) < n:
        v = rest.pop(0)
        take = n - len(out)
        out += v[:take]
        if len(v) > take:
            rest.insert(0, v[take:])
    return bytes(out), rest


def _take_back(views: list[memoryview]) -> tuple[list[memoryview], memoryview]:
    """Split the last byte (the status) off a writable buffer list."""
    rest = [v for v in views if len(v)]
    last = rest.pop()
    if len(last) > 1:
        rest.append(last[:-1])
    return rest, last[-1:]


T = TypeVar("T")
_Io = Callable[..., Awaitable[Any]]


async def _call_now(fn: Callable[..., Any], *args: Any) -> Any:
    """``_execute``'s ``io`` on a data-plane thread: the blocking call, right here."""
    return fn(*args)


def _run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its ``io`` is :func:`_call_now`) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a blocking request suspended on a data-plane thread")


# Reads that continue one another, read with one preadv: every buffer, then per request
# (head, status byte GPA, length, its buffers), and the image range [start, end).
_ReadGroup = tuple[list[memoryview], list[tuple[int, int, int, list[memoryview]]], int, int]


@dataclass(slots=True)
class _Request:
    head: int
    rtype: int
    sector: int
    out_views: list[memoryview]
    in_views: list[memoryview]
    status_view: memoryview
    length: int = 0  # bytes to read, for a read


class VirtioBlk(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    pci_ids = PciIds(legacy_device_id=0x1001, device_type=VIRTIO_ID_BLOCK,
                     class_code=0x010000, windows_subvendor=True)
    name = "virtio-blk"

    def __init__(self, opts: BlkOptions, *, threads: int = 16) -> None:
        self.opts = opts
        self.fd = -1
        self.ro = opts.ro
        self.base = 0
        self.size = 0
        self.sectsz = opts.sectorsize
        self._nowait_read = self._nowait_write = hasattr(os, "RWF_NOWAIT")
        self._copier: CopyThread | None = None  # the loop's
        if opts.path is not None:
            self._open(opts)
        self.capacity = self.size // SECTOR
        self.ident = disk_ident(opts.text)
        features = (VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC
                    | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
                    | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY | VIRTIO_BLK_F_CONFIG_WCE)
        if self.ro:
            features |= VIRTIO_BLK_F_RO
        elif self.fd >= 0:
            features |= VIRTIO_BLK_F_WRITE_ZEROES
            if opts.discard:
                features |= VIRTIO_BLK_F_DISCARD
        if opts.mq > 1:
            features |= VIRTIO_BLK_F_MQ
        super().__init__(opts.mq, QUEUE_SIZE, features, CONFIG_SIZE, threads=threads)
        self.max_discard_sectors = min(opts.max_discard_sectors or self.capacity, 0xFFFF_FFFF)
        self.max_zeroes_sectors = min(self.capacity, 0xFFFF_FFFF)
        self._build_config()

    def _open(self, opts: BlkOptions) -> None:
        assert opts.path is not None
        flags = os.O_CLOEXEC | (os.O_RDONLY if opts.ro else os.O_RDWR)
        try:
            try:
                fd = os.open(opts.path, flags)
            except PermissionError:
                if opts.ro:
                    raise
                fd = os.open(opts.path, os.O_CLOEXEC | os.O_RDONLY)  # as acrn-dm: fall back to ro
                self.ro = True
        except OSError as e:
            raise ConfigError(f"virtio-blk: cannot open {opts.path}: {e.strerror}") from None
        self.fd = fd
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("<Q", buf)[0]
        else:
            size = st.st_size
        if opts.range_start is not None:
            start = opts.range_start * self.sectsz
            length = (opts.range_size or 0) * self.sectsz
            if not length or start + length > size:
                self.close()
                raise ConfigError(f"virtio-blk: range={opts.range_start}/{opts.range_size}: "
                                  f"outside {opts.path} ({size} bytes)")
            self.base, size = start, length
        if size < SECTOR or size % SECTOR:
            self.close()
            raise ConfigError(f"virtio-blk: {opts.path}: size {size} is not a non-zero "
                              "multiple of 512 bytes")
        self.size = size

    def _build_config(self) -> None:
        phys_exp = (self.opts.physical_sectorsize // self.sectsz).bit_length() - 1
        _CONFIG.pack_into(
            self.config, 0,
            self.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,  # geometry
            self.sectsz,
            phys_exp, 0, 0, 0,  # topology: alignment offset, min/opt io size
            1 if self.opts.writeback else 0, 0, self.num_queues,
            self.max_discard_sectors, self.opts.max_discard_seg, self.opts.discard_alignment,
            self.max_zeroes_sectors, 1, 1,
        )

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == CFG_WRITEBACK and len(data) == 1:
            self.config[CFG_WRITEBACK] = 1 if data[0] else 0

    def on_reset(self) -> None:
        self.config[CFG_WRITEBACK] = 1 if self.opts.writeback else 0

    def close(self) -> None:
        self.stop_dataplanes()  # a data-plane thread ends with the request it is serving
        self.stop_io_thread()  # writes still queued land before the image closes
        if self._copier is not None:
            self._copier.close()
            self._copier = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def writeback(self) -> bool:
        """The effective cache mode: writeback needs a driver that can flush (§5.2.6.2)."""
        if self.features & VIRTIO_BLK_F_CONFIG_WCE:
            return bool(self.config[CFG_WRITEBACK])
        return bool(self.features & VIRTIO_BLK_F_FLUSH) and self.opts.writeback

    # -- workers -----------------------------------------------------------------------

    def start_workers(self, nursery: trio.Nursery) -> None:
        for q in self.queues:
            if q.ready and not self.start_dataplane(q, nursery, self._serve_blocking):
                nursery.start_soon(self._serve, q, nursery)

    def _serve_blocking(self, q: Virtqueue) -> bool:
        """A data-plane thread's work (``dataplane.py``): a batch of requests in ring
        order, with blocking I/O; False when the ring was empty."""
        chains = q.pop_batch(INLINE_BATCH)
        if not chains:
            return False
        used: list[tuple[int, int]] = []
        try:
            for chain in chains:
                used.append((chain.head, self._request_blocking(q, chain)))
        finally:  # a malformed request fails the device, but the ones before it are done
            if used:
                q.add_used_batch(used)
                self.signal(q)
        return True

    def _request_blocking(self, q: Virtqueue, chain: DescriptorChain) -> int:
        """Serve one request on a data-plane thread; the bytes written to the driver."""
        lens = chain.lens
        lo = q.low_ram[1]
        if (self.fd >= 0 and lo is not None and chain.low and len(lens) >= 3 and lens[0] == 16
                and lens[-1] == 1):  # header, data, status: no general parsing
            addrs = chain.addrs
            rtype, _, sector = _HDR.unpack_from(lo, addrs[0])
            nd = len(lens)
            if rtype == VIRTIO_BLK_T_IN and chain.nreadable == 1:
                length = chain.writable_len - 1
                op = self._read_blocking
            elif rtype == VIRTIO_BLK_T_OUT and chain.nreadable == nd - 1 and not self.ro:
                length = chain.readable_len - 16
                op = self._write_blocking
            else:
                op = None
            if op is not None and self._range_ok(sector, length):
                views = _iovecs(lo, addrs, lens, nd - 1)
                try:
                    op(q.index, views, self.base + sector * SECTOR, length)
                except OSError as e:
                    self.glog.warning("%s: I/O error on %s: %s", self.name, self.opts.path, e)
                    lo[addrs[-1]] = VIRTIO_BLK_S_IOERR
                    return 1
                lo[addrs[-1]] = VIRTIO_BLK_S_OK
                return (length if rtype == VIRTIO_BLK_T_IN else 0) + 1
        req = self._parse(chain)
        status, written = _run_now(self._execute(req.rtype, req.sector, req.out_views,
                                                 req.in_views, io=_call_now))
        req.status_view[0] = status
        return written + 1

    def _read_blocking(self, index: int, views: list[memoryview], offset: int,
                       length: int) -> None:
        # No copy thread here: measured through QEMU, a second copier only took CPU from
        # the guest's vCPU thread (0.85 of qemu-storage-daemon with it, 0.86 without).
        _preadv_all(self.fd, views, offset)

    def _write_blocking(self, index: int, views: list[memoryview], offset: int,
                        length: int) -> None:
        _pwritev_all(self.fd, views, offset, not self.writeback)

    async def _serve(self, q: Virtqueue, nursery: trio.Nursery) -> None:
        # A trio scheduling pass costs about as much as serving a cached 4 KiB read, so the
        # worker yields only when it sleeps for a kick, or between two batches in a row.
        busy = False
        while True:
            chains = q.pop_batch(INLINE_BATCH)
            if not chains:
                busy = False
                await self.wait_kick(q)
                continue
            if busy:
                await trio.lowlevel.checkpoint()
            busy = True
            used: list[tuple[int, int]] = []
            try:
                self._run_batch(q, chains, used, nursery)
            finally:  # a malformed request fails the device, but the ones before it are done
                if used:  # requests handed to the pool signal when they finish
                    q.add_used_batch(used)
                    self.signal(q)

    def _run_batch(self, q: Virtqueue, chains: list[DescriptorChain],
                   used: list[tuple[int, int]], nursery: trio.Nursery) -> None:
        """Serve popped chains in order; completions inline go to ``used``.

        A read or write whose header, data and status byte are separate buffers in the RAM
        at GPA 0 (what Linux sends) skips the general parsing: its data buffers become one
        iovec per guest-physically contiguous run. Reads that continue one another are
        merged into one non-blocking ``preadv`` from the page cache (one system call for a
        sequential stream); the batch's writes go to the thread pool in one hand-off.
        """
        lo_end, lo = q.low_ram
        fast = self.fd >= 0 and lo is not None
        nowait_read = self._nowait_read
        size, sectsz, inline_max = self.size, self.sectsz, INLINE_MAX
        unpack_hdr = _HDR.unpack_from
        # the reads being merged: their buffers, (head, status GPA, length, buffers), range
        g_views: list[memoryview] = []
        g_reqs: list[tuple[int, int, int, list[memoryview]]] = []
        g_start = g_end = -1
        writes: list[tuple[int, memoryview, int, int, list[memoryview]]] = []
        groups: list[_ReadGroup] = []  # read at the end, two at once where they are big
        try:
            for chain in chains:
                lens = chain.lens
                if fast and chain.low and len(lens) >= 3 and lens[0] == 16 and lens[-1] == 1:
                    addrs = chain.addrs
                    rtype, _, sector = unpack_hdr(lo, addrs[0])  # type: ignore[arg-type]
                    offset = sector * SECTOR
                    nd = len(lens)
                    if rtype == VIRTIO_BLK_T_IN and chain.nreadable == 1 and nowait_read:
                        length = chain.writable_len - 1
                        if (length <= inline_max and not offset % sectsz and not length % sectsz
                                and offset + length <= size):
                            if nd == 3:
                                d_addr = addrs[1]
                                views = [lo[d_addr : d_addr + length]]  # type: ignore[index]
                            else:
                                views = _iovecs(lo, addrs, lens, nd - 1)  # type: ignore[arg-type]
                            if (offset == g_end and g_end - g_start + length <= COALESCE_MAX
                                    and len(g_views) + len(views) <= IOV_MAX):
                                g_views += views
                                g_reqs.append((chain.head, addrs[-1], length, views))
                                g_end += length
                                continue
                            if g_views:
                                groups.append((g_views, g_reqs, g_start, g_end))
                            g_views = list(views)
                            g_reqs = [(chain.head, addrs[-1], length, views)]
                            g_start, g_end = offset, offset + length
                            continue
                    elif (rtype == VIRTIO_BLK_T_OUT and chain.nreadable == nd - 1 and not self.ro
                            and len(lens) - 2 <= IOV_MAX):
                        length = chain.readable_len - 16
                        if not offset % sectsz and not length % sectsz and offset + length <= size:
                            s_addr = addrs[-1]
                            views = _iovecs(lo, addrs, lens, nd - 1)  # type: ignore[arg-type]
                            if self._write_inline(views, self.base + offset, length):
                                lo[s_addr] = VIRTIO_BLK_S_OK  # type: ignore[index]
                                used.append((chain.head, 1))
                            else:
                                writes.append((chain.head,
                                               lo[s_addr : s_addr + 1],  # type: ignore[index]
                                               self.base + offset, length, views))
                            continue
                if g_views:
                    groups.append((g_views, g_reqs, g_start, g_end))
                    g_views, g_reqs = [], []
                    g_start = g_end = -1
                req = self._parse(chain)
                if self._try_inline(req):
                    used.append((req.head, (req.length if req.rtype == VIRTIO_BLK_T_IN else 0) + 1))
                else:
                    nursery.start_soon(self._request, q, req)
        finally:  # the reads and writes before a malformed request are still done
            if g_views:
                groups.append((g_views, g_reqs, g_start, g_end))
            if groups:
                self._read_groups(q, groups, used, nursery)
            if writes:
                nursery.start_soon(self._write_batch, q, writes)

    def _write_inline(self, views: list[memoryview], offset: int, length: int) -> bool:
        """A writeback-mode write straight into the page cache (``RWF_NOWAIT``), if the file
        system can do that without waiting; False: the caller uses the thread pool."""
        if not (self._nowait_write and length <= INLINE_MAX and self.writeback):
            return False
        try:
            return _pwritev_nowait(self.fd, views, offset) == length
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # e.g. ext4: never inline
                self._nowait_write = False
            return False

    def _read_groups(self, q: Virtqueue, groups: list[_ReadGroup], used: list[tuple[int, int]],
                     nursery: trio.Nursery) -> None:
        """Each group's read; big ones on two CPUs (two groups at once, or one in two
        halves), since the loop's memcpy is what limits a sequential stream."""
        i = 0
        while i < len(groups):
            a = groups[i]
            big = a[3] - a[2] >= PARALLEL_MIN
            b = groups[i + 1] if i + 1 < len(groups) else None
            if big and b is not None and b[3] - b[2] >= PARALLEL_MIN:
                self._read_pair(q, a, b, used, nursery)
                i += 2
                continue
            if big and len(a[0]) > 1:
                self._read_split(q, a, used, nursery)
            else:
                self._read_group(q, a, used, nursery)
            i += 1

    def _copy_thread(self) -> CopyThread:
        if self._copier is None:
            self._copier = CopyThread(f"{self.name}-copy")
        return self._copier

    def _read_pair(self, q: Virtqueue, a: _ReadGroup, b: _ReadGroup,
                   used: list[tuple[int, int]], nursery: trio.Nursery) -> None:
        copier = self._copy_thread()
        copier.submit(self.fd, a[0], self.base + a[2])
        try:
            self._read_group(q, b, used, nursery)
        finally:  # the thread's read lands before anything else happens
            n = copier.wait()
        self._finish_group(q, a, n, used, nursery)

    def _read_split(self, q: Virtqueue, group: _ReadGroup, used: list[tuple[int, int]],
                    nursery: trio.Nursery) -> None:
        """One group's read as two halves (at a buffer boundary), one on each CPU."""
        views, _, start, end = group
        half = (end - start) // 2
        k, first = 1, len(views[0])
        while k < len(views) - 1 and first + len(views[k]) <= half:
            first += len(views[k])
            k += 1
        copier = self._copy_thread()
        copier.submit(self.fd, views[:k], self.base + start)
        try:
            second = self._nowait(views[k:], self.base + start + first)
        finally:
            got_first = copier.wait()
        whole = got_first == first and second == end - start - first
        self._finish_group(q, group, end - start if whole else -1, used, nursery)

    def _read_group(self, q: Virtqueue, group: _ReadGroup, used: list[tuple[int, int]],
                    nursery: trio.Nursery) -> None:
        """One non-blocking preadv for reads that continue one another (see ``_ReadGroup``);
        whatever the page cache cannot serve at once is retried request by request (inline,
        then threads)."""
        self._finish_group(q, group, self._nowait(group[0], self.base + group[2]), used,
                           nursery)

    def _nowait(self, views: list[memoryview], offset: int) -> int:
        """``preadv`` from the page cache without waiting for the disk: bytes, or -1."""
        try:
            return _preadv_nowait(self.fd, views, offset)
        except BlockingIOError:
            return -1
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # the file system cannot
                self._nowait_read = False
            return -1

    def _finish_group(self, q: Virtqueue, group: _ReadGroup, n: int,
                      used: list[tuple[int, int]], nursery: trio.Nursery) -> None:
        """Complete a group ``n`` bytes of whose read are in guest RAM (-1: failed)."""
        _, reqs, start, end = group
        lo = q.low_ram[1]
        if n == end - start and lo is not None:
            append = used.append
            for head, s_addr, length, _ in reqs:
                lo[s_addr] = VIRTIO_BLK_S_OK
                append((head, length + 1))
            return
        offset = start
        for head, s_addr, length, req_views in reqs:
            req = _Request(head, VIRTIO_BLK_T_IN, offset // SECTOR, [], req_views,
                           q.map_buffer(s_addr, 1), length)
            offset += length
            if len(reqs) > 1 and self._try_inline(req):
                used.append((head, length + 1))
            else:
                nursery.start_soon(self._request, q, req)

    async def _write_batch(self, q: Virtqueue,
                           writes: list[tuple[int, memoryview, int, int, list[memoryview]]]
                           ) -> None:
        """A batch's writes (head, status byte, file offset, length, buffers) in one thread
        hand-off, completed together once on the image (and, writethrough, synced)."""
        statuses, error = await self.in_order(_pwrite_batch, self.fd, writes,
                                              not self.writeback)
        if error is not None:
            self.glog.warning("%s: I/O error on %s: %s", self.name, self.opts.path, error)
        used = []
        for (head, status_view, _, _, _), status in zip(writes, statuses, strict=True):
            status_view[0] = status
            used.append((head, 1))
        q.add_used_batch(used)
        self.signal(q)

    def _parse(self, chain: DescriptorChain) -> _Request:
        if chain.readable_len < _HDR.size:
            raise VirtqueueError(f"{self.name}: request without a 16-byte header")
        if chain.writable_len < 1:
            raise VirtqueueError(f"{self.name}: request without a status byte")
        hdr, out_views = _take_front(chain.readable, _HDR.size)
        in_views, status_view = _take_back(chain.writable)
        rtype, _, sector = _HDR.unpack(hdr)
        return _Request(chain.head, rtype, sector, out_views, in_views, status_view,
                        chain.writable_len - 1 if rtype == VIRTIO_BLK_T_IN else 0)

    def _try_inline(self, req: _Request) -> bool:
        """Serve a request from the page cache on the event loop, skipping the thread hop.

        ``RWF_NOWAIT`` makes the kernel refuse (EAGAIN) instead of waiting for the disk,
        so the loop never blocks; whatever it cannot finish goes to the thread pool,
        which simply redoes the whole request. Writes qualify only in writeback mode
        (writethrough must fdatasync, which always waits).
        """
        rtype = req.rtype
        if self.fd < 0 or (rtype == VIRTIO_BLK_T_IN and not self._nowait_read):
            return False
        if rtype == VIRTIO_BLK_T_IN:
            views, op = req.in_views, _preadv_nowait
        elif rtype == VIRTIO_BLK_T_OUT and self._nowait_write and not self.ro and self.writeback:
            views, op = req.out_views, _pwritev_nowait
        else:
            return False
        length = sum(len(v) for v in views)
        if length > INLINE_MAX or len(views) > IOV_MAX or not self._range_ok(req.sector, length):
            return False
        try:
            n = op(self.fd, views, self.base + req.sector * SECTOR)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # the file system cannot: use threads
                if rtype == VIRTIO_BLK_T_IN:
                    self._nowait_read = False
                else:
                    self._nowait_write = False
            return False
        if n != length:
            return False
        req.status_view[0] = VIRTIO_BLK_S_OK
        return True

    async def _request(self, q: Virtqueue, req: _Request) -> None:
        status, written = await self._execute(req.rtype, req.sector, req.out_views,
                                              req.in_views)
        req.status_view[0] = status
        q.add_used(req.head, written + 1)
        self.signal(q)

    def _range_ok(self, sector: int, length: int) -> bool:
        offset = sector * SECTOR
        return (offset % self.sectsz == 0 and length % self.sectsz == 0
                and offset + length <= self.size)

    async def _execute(self, rtype: int, sector: int, out_views: list[memoryview],
                       in_views: list[memoryview], io: _Io | None = None) -> tuple[int, int]:
        """A request's status and the bytes written to the driver; blocking calls go
        through ``io`` (default: the device's thread pool)."""
        io = io or self.blocking
        try:
            if rtype == VIRTIO_BLK_T_IN:
                length = sum(len(v) for v in in_views)
                if self.fd < 0 or not self._range_ok(sector, length):
                    return VIRTIO_BLK_S_IOERR, 0
                await io(_preadv_all, self.fd, in_views, self.base + sector * SECTOR)
                return VIRTIO_BLK_S_OK, length
            if rtype == VIRTIO_BLK_T_OUT:
                length = sum(len(v) for v in out_views)
                if self.fd < 0 or self.ro or not self._range_ok(sector, length):
                    return VIRTIO_BLK_S_IOERR, 0
                await io(_pwritev_all, self.fd, out_views, self.base + sector * SECTOR,
                         not self.writeback)
                return VIRTIO_BLK_S_OK, 0
            if rtype == VIRTIO_BLK_T_FLUSH:
                if self.fd >= 0 and not self.ro:
                    await io(os.fsync, self.fd)
                return VIRTIO_BLK_S_OK, 0
            if rtype == VIRTIO_BLK_T_GET_ID:
                return VIRTIO_BLK_S_OK, self._write_ident(in_views)
            if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                return await self._discard_or_zero(rtype, out_views, io), 0
            return VIRTIO_BLK_S_UNSUPP, 0
        except OSError as e:
            self.glog.warning("%s: I/O error on %s: %s", self.name, self.opts.path, e)
            return VIRTIO_BLK_S_IOERR, 0

    def _write_ident(self, views: list[memoryview]) -> int:
        data = self.ident.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        done = 0
        for v in views:
            n = min(len(v), len(data) - done)
            v[:n] = data[done : done + n]
            done += n
            if done == len(data):
                break
        return done

    async def _discard_or_zero(self, rtype: int, out_views: list[memoryview], io: _Io) -> int:
        zeroes = rtype == VIRTIO_BLK_T_WRITE_ZEROES
        feature = VIRTIO_BLK_F_WRITE_ZEROES if zeroes else VIRTIO_BLK_F_DISCARD
        if not self.features & feature:
            return VIRTIO_BLK_S_UNSUPP
        total = sum(len(v) for v in out_views)
        nseg = total // _SEG.size
        max_seg = 1 if zeroes else self.opts.max_discard_seg
        if total % _SEG.size or not 1 <= nseg <= max_seg:
            return VIRTIO_BLK_S_IOERR
        data, _ = _take_front(out_views, total)
        max_sectors = self.max_zeroes_sectors if zeroes else self.max_discard_sectors
        segs = []
        for k in range(nseg):
            sector, num, flags = _SEG.unpack_from(data, k * _SEG.size)
            allowed = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if zeroes else 0
            if flags & ~allowed:
                return VIRTIO_BLK_S_UNSUPP
            if self.ro or num > max_sectors or not self._range_ok(sector, num * SECTOR):
                return VIRTIO_BLK_S_IOERR
            align = self.opts.discard_alignment
            if not zeroes and align and sector % align:
                return VIRTIO_BLK_S_IOERR
            segs.append((self.base + sector * SECTOR, num * SECTOR, bool(flags)))
        sync = not self.writeback
        for offset, length, unmap in segs:
            if not length:  # nothing to do (fallocate would refuse a zero length)
                continue
            if zeroes:
                await io(_zero_range, self.fd, offset, length, unmap, sync)
            else:
                await io(_discard, self.fd, offset, length, sync)
        return VIRTIO_BLK_S_OK


def create(options: str, slot: int = 0, func: int = 0) -> VirtioBlk:
    """The ``-s <slot>,virtio-blk,<options>`` device (the transport registers the name)."""
    return VirtioBlk(parse_blk_options(options))
