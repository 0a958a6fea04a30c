"""The virtio-blk request format (virtio 1.2 §5.2.6) and how a request is served.

A request is a descriptor chain: a 16-byte header the driver wrote (type, reserved,
sector), the data buffers (device-readable for a write, device-writable for a read), and
a status byte the device writes last. :func:`parse` takes any chain apart (the ring
workers have faster paths for the shapes Linux sends); :func:`execute` serves one request
on the image through any ``BlockIo``. Only a driver that breaks the format (no header,
no status byte) raises: that stops the device. Host I/O errors are OSError, which the
device turns into VIRTIO_BLK_S_IOERR for that request alone.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..buffers import copy_into
from ..queue import DescriptorChain, VirtqueueError
from .io import SECTOR, BlockIo, DiskImage

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

HDR = struct.Struct("<IIQ")  # type, reserved/ioprio, sector
SEG = struct.Struct("<QII")  # discard / write zeroes segment: sector, num_sectors, flags


@dataclass(slots=True)
class Request:
    head: int
    rtype: int
    sector: int
    out_views: list[memoryview]
    in_views: list[memoryview]
    status_view: memoryview
    length: int = 0  # bytes to read, for a read


@dataclass(frozen=True)
class Limits:
    """What the device's config space promises for discard and write zeroes."""

    max_discard_sectors: int
    max_discard_seg: int
    discard_alignment: int
    max_zeroes_sectors: int


def parse(chain: DescriptorChain) -> Request:
    """Split any chain into header, data and status (VirtqueueError if it has none)."""
    if chain.readable_len < HDR.size:
        raise VirtqueueError("virtio-blk: request without a 16-byte header")
    if chain.writable_len < 1:
        raise VirtqueueError("virtio-blk: request without a status byte")
    hdr, out_views = take_front(chain.readable, HDR.size)
    in_views, status_view = take_back(chain.writable)
    rtype, _, sector = HDR.unpack(hdr)
    return Request(chain.head, rtype, sector, out_views, in_views, status_view,
                   chain.writable_len - 1 if rtype == VIRTIO_BLK_T_IN else 0)


def take_front(views: list[memoryview], n: int) -> tuple[bytes, list[memoryview]]:
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


def take_back(views: list[memoryview]) -> tuple[list[memoryview], memoryview]:
    """Split the last byte (the status) off a writable buffer list."""
    rest = [v for v in views if len(v)]
    last = rest.pop()
    if len(last) > 1:
        rest.append(last[:-1])
    return rest, last[-1:]


def iovecs(lo: memoryview, addrs: Sequence[int], lens: Sequence[int],
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


async def execute(req: Request, image: DiskImage | None, io: BlockIo, *, sync: bool,
                  features: int, limits: Limits, ident: bytes) -> tuple[int, int]:
    """Serve one request: its status and the bytes written to the driver's buffers.
    ``sync``: writes are durable before they complete (writethrough)."""
    rtype = req.rtype
    if rtype == VIRTIO_BLK_T_IN:
        length = sum(len(v) for v in req.in_views)
        if image is None or not image.in_range(req.sector * SECTOR, length):
            return VIRTIO_BLK_S_IOERR, 0
        await io.read(req.in_views, req.sector * SECTOR)
        return VIRTIO_BLK_S_OK, length
    if rtype == VIRTIO_BLK_T_OUT:
        length = sum(len(v) for v in req.out_views)
        if image is None or image.ro or not image.in_range(req.sector * SECTOR, length):
            return VIRTIO_BLK_S_IOERR, 0
        await io.write(req.out_views, req.sector * SECTOR, sync)
        return VIRTIO_BLK_S_OK, 0
    if rtype == VIRTIO_BLK_T_FLUSH:
        if image is not None and not image.ro:
            await io.flush()
        return VIRTIO_BLK_S_OK, 0
    if rtype == VIRTIO_BLK_T_GET_ID:
        return VIRTIO_BLK_S_OK, write_ident(req.in_views, ident)
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and image is not None:
        return await _discard_or_zero(rtype, req.out_views, image, io, sync, features,
                                      limits), 0
    return VIRTIO_BLK_S_UNSUPP, 0


def write_ident(views: list[memoryview], ident: bytes) -> int:
    """GET_ID: the serial, zero-padded to 20 bytes (as much as the buffers hold)."""
    return copy_into(views, ident.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))


async def _discard_or_zero(rtype: int, out_views: list[memoryview], image: DiskImage,
                           io: BlockIo, sync: bool, features: int, limits: Limits) -> int:
    """Check every segment first (§5.2.6.2), then apply them in order."""
    zeroes = rtype == VIRTIO_BLK_T_WRITE_ZEROES
    if not features & (VIRTIO_BLK_F_WRITE_ZEROES if zeroes else VIRTIO_BLK_F_DISCARD):
        return VIRTIO_BLK_S_UNSUPP
    total = sum(len(v) for v in out_views)
    nseg = total // SEG.size
    if total % SEG.size or not 1 <= nseg <= (1 if zeroes else limits.max_discard_seg):
        return VIRTIO_BLK_S_IOERR
    data, _ = take_front(out_views, total)
    max_sectors = limits.max_zeroes_sectors if zeroes else limits.max_discard_sectors
    allowed = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if zeroes else 0
    align = 0 if zeroes else limits.discard_alignment
    segs = []
    for k in range(nseg):
        sector, num, flags = SEG.unpack_from(data, k * SEG.size)
        if flags & ~allowed:
            return VIRTIO_BLK_S_UNSUPP
        if image.ro or num > max_sectors or not image.in_range(sector * SECTOR, num * SECTOR):
            return VIRTIO_BLK_S_IOERR
        if align and sector % align:
            return VIRTIO_BLK_S_IOERR
        segs.append((sector * SECTOR, num * SECTOR, bool(flags)))
    for offset, length, unmap in segs:
        if not length:  # nothing to do (fallocate would refuse a zero length)
            continue
        if zeroes:
            await io.write_zeroes(offset, length, unmap, sync)
        else:
            await io.discard(offset, length, sync)
    return VIRTIO_BLK_S_OK
