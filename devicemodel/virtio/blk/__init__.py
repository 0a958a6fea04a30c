"""virtio-blk (virtio 1.2 §5.2) over a raw image file or block device.

- ``options.py``: acrn-dm's option string (``BlkOptions``, ``parse_blk_options``).
- ``request.py``: the request format and how one request is served.
- ``device.py``: ``VirtioBlk``, its features and config space, and ``create``.
- ``ring_loop.py`` / ``ring_thread.py``: a queue served from the event loop, or on a
  data-plane thread.
- ``io/``: the block I/O engine (the image, where blocking calls run, the loop's
  non-blocking fast path); it knows nothing of virtio, so other disks can use it.
"""

from __future__ import annotations

from .device import CONFIG_SIZE, QUEUE_SIZE, SEG_MAX, SIZE_MAX, VirtioBlk, create, parse_options
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
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)

__all__ = [
    "CONFIG_SIZE", "QUEUE_SIZE", "SEG_MAX", "SIZE_MAX",
    "VIRTIO_BLK_F_BLK_SIZE", "VIRTIO_BLK_F_CONFIG_WCE", "VIRTIO_BLK_F_DISCARD",
    "VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_F_MQ", "VIRTIO_BLK_F_RO", "VIRTIO_BLK_F_SEG_MAX",
    "VIRTIO_BLK_F_SIZE_MAX", "VIRTIO_BLK_F_TOPOLOGY", "VIRTIO_BLK_F_WRITE_ZEROES",
    "VIRTIO_BLK_ID_BYTES", "VIRTIO_BLK_S_IOERR", "VIRTIO_BLK_S_OK", "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_T_DISCARD", "VIRTIO_BLK_T_FLUSH", "VIRTIO_BLK_T_GET_ID", "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT", "VIRTIO_BLK_T_WRITE_ZEROES", "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP",
    "BlkOptions", "VirtioBlk", "create", "parse_options", "disk_ident", "parse_blk_options",
]
