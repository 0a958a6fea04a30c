"""virtio-blk (virtio 1.2 §5.2) over a raw image file or block device.

The device offers its features and config space, and serves each queue one of two ways:
from the event loop (ring_loop.py: the page cache's data on the loop itself, the rest on
threads), or, when the transport hands over the queue's kick eventfd (vhost-user), on a
data-plane thread of its own with blocking I/O (ring_thread.py). Both submit to the
image through the engine in io/, which knows nothing of virtio.

Data is sacred: the default is writethrough (fdatasync after every write), a flush is an
fsync, and writeback is used only if asked for (``writeback``) and the driver can flush.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import trio

from ..dataplane import Dataplane
from ..device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    PciIds,
    VirtioDevice,
)
from ..queue import Virtqueue
from .io import SECTOR, BlockIo, DirectIo, DiskImage, NowaitIo, ThreadIo
from .lane import run_lane
from .options import BlkOptions, disk_ident, parse_blk_options
from .request import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Limits,
    Request,
    execute,
    write_ident,
)
from .ring_loop import LoopServer
from .ring_thread import serve_blocking

QUEUE_SIZE = 256
#: Linux's biggest request is SEG_MAX × SIZE_MAX = 504 KiB, so a 1 MiB read arrives as
#: three requests (as with qemu-storage-daemon's limits): the device copies one while the
#: driver still builds or completes another (ring_thread signals each big one as it is
#: done). With 254 × 1 MiB the guest sent one ~1 MiB request and waited for all of it:
#: 0.64–0.82 of qemu-storage-daemon's sequential reads against 0.94–1.25 (bench/vhost_blk.py).
SEG_MAX = 126  # (≤ QUEUE_SIZE - 2: header and status take two descriptors of a direct chain)
SIZE_MAX = 4096  # one page per segment: the split does not depend on how pages merge
CONFIG_SIZE = 60  # through write_zeroes_may_unmap and its padding
CFG_WRITEBACK = 32
_CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x")


class VirtioBlk(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    pci_ids = PciIds(legacy_device_id=0x1001, device_type=VIRTIO_ID_BLOCK,
                     class_code=0x010000, windows_subvendor=True)
    name = "virtio-blk"

    def __init__(self, opts: BlkOptions, *, threads: int = 16) -> None:
        self.opts = opts
        self.image: DiskImage | None = None
        if opts.path is not None:
            self.image = DiskImage.open(
                opts.path, ro=opts.ro, sector_size=opts.sectorsize,
                range_start=opts.range_start, range_size=opts.range_size, who=self.name)
        try:
            self._setup(opts, threads)
        except BaseException:
            self.close()
            raise

    def _setup(self, opts: BlkOptions, threads: int) -> None:
        image = self.image
        self.ro = opts.ro or (image is not None and image.ro)
        self.size = image.size if image is not None else 0
        self.capacity = self.size // SECTOR
        self.ident = disk_ident(opts.text)
        features = (VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC
                    | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
                    | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY | VIRTIO_BLK_F_CONFIG_WCE)
        if self.ro:
            features |= VIRTIO_BLK_F_RO
        elif image is not None:
            features |= VIRTIO_BLK_F_WRITE_ZEROES
            if opts.discard:
                features |= VIRTIO_BLK_F_DISCARD
        if opts.mq > 1:
            features |= VIRTIO_BLK_F_MQ
        super().__init__(opts.mq, QUEUE_SIZE, features, CONFIG_SIZE, threads=threads)
        self.limits = Limits(
            max_discard_sectors=min(opts.max_discard_sectors or self.capacity, 0xFFFF_FFFF),
            max_discard_seg=opts.max_discard_seg,
            discard_alignment=opts.discard_alignment,
            max_zeroes_sectors=min(self.capacity, 0xFFFF_FFFF))
        # where the image's I/O runs: the loop (page cache only), the thread pool (many
        # in flight), the device's ordered I/O thread (batched writes), a data-plane thread
        self.nowait = NowaitIo(image, self.name) if image is not None else None
        self.pool = ThreadIo(image, self.blocking) if image is not None else None
        self.ordered = ThreadIo(image, self.in_order) if image is not None else None
        self.direct = DirectIo(image) if image is not None else None
        self._loop = LoopServer(self)
        self._build_config()

    def _build_config(self) -> None:
        phys_exp = (self.opts.physical_sectorsize // self.opts.sectorsize).bit_length() - 1
        lim = self.limits
        _CONFIG.pack_into(
            self.config, 0,
            self.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,  # geometry
            self.opts.sectorsize,
            phys_exp, 0, 0, 0,  # topology: alignment offset, min/opt io size
            1 if self.opts.writeback else 0, 0, self.num_queues,
            lim.max_discard_sectors, lim.max_discard_seg, lim.discard_alignment,
            lim.max_zeroes_sectors, 1, 1,
        )

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == CFG_WRITEBACK and len(data) == 1:
            self.config[CFG_WRITEBACK] = 1 if data[0] else 0

    def on_reset(self) -> None:
        self.config[CFG_WRITEBACK] = 1 if self.opts.writeback else 0

    def close(self) -> None:
        self.stop_dataplanes()  # a data-plane thread ends with the request it is serving
        self.stop_io_thread()  # writes still queued land before the image closes
        nowait = getattr(self, "nowait", None)
        if nowait is not None:
            nowait.close()
        if self.image is not None:
            self.image.close()

    @property
    def writeback(self) -> bool:
        """The effective cache mode: writeback needs a driver that can flush (§5.2.6.2)."""
        if self.features & VIRTIO_BLK_F_CONFIG_WCE:
            return bool(self.config[CFG_WRITEBACK])
        return bool(self.features & VIRTIO_BLK_F_FLUSH) and self.opts.writeback

    # -- serving -----------------------------------------------------------------------

    def start_workers(self, nursery: trio.Nursery) -> None:
        for q in self.queues:
            if q.ready and not self.start_dataplane(q, nursery, self.serve_blocking, self.lane):
                nursery.start_soon(self._loop.serve, q, nursery)

    def serve_blocking(self, q: Virtqueue) -> bool:
        """One batch of ``q`` on the calling (data-plane) thread; False if it was empty."""
        return serve_blocking(self, q)

    def lane(self, dp: Dataplane, signal: Callable[[], None]) -> bool:
        """The data-plane thread's loop for ``dp.q`` (``lane.py``); False if it does
        not apply (then the general loop serves the queue)."""
        return run_lane(dp, self, signal)

    async def execute(self, req: Request, io: BlockIo | None) -> tuple[int, int]:
        """A request's status and the bytes written to the driver (the general path);
        ``io`` is where its blocking calls run (None: the thread pool)."""
        if self.image is None:
            return _without_medium(req, self.ident)
        assert self.pool is not None
        try:
            return await execute(req, self.image, io or self.pool, sync=not self.writeback,
                                 features=self.features, limits=self.limits,
                                 ident=self.ident)
        except OSError as e:
            self.io_error(e)
            return VIRTIO_BLK_S_IOERR, 0

    def io_error(self, error: OSError) -> None:
        self.glog.warning("%s: I/O error on %s: %s", self.name, self.opts.path, error)


def _without_medium(req: Request, ident: bytes) -> tuple[int, int]:
    """``nodisk``: no data to move; a flush has nothing to do."""
    if req.rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
        return VIRTIO_BLK_S_IOERR, 0
    if req.rtype == VIRTIO_BLK_T_FLUSH:
        return VIRTIO_BLK_S_OK, 0
    if req.rtype == VIRTIO_BLK_T_GET_ID:
        return VIRTIO_BLK_S_OK, write_ident(req.in_views, ident)
    return VIRTIO_BLK_S_UNSUPP, 0


def parse_options(options: str, slot: int = 0, func: int = 0) -> BlkOptions:
    """What ``create`` builds from, without opening anything (the validator's check)."""
    return parse_blk_options(options)


def create(options: str, slot: int = 0, func: int = 0) -> VirtioBlk:
    """The ``-s <slot>,virtio-blk,<options>`` device (the transport registers the name)."""
    return VirtioBlk(parse_options(options, slot, func))
