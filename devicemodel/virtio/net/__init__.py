"""virtio-net (virtio 1.2 §5.1) over a Linux tap device.

- ``options.py``: acrn-dm's option string (``NetOptions``, ``parse_net_options``) and
  its default MAC.
- ``tap.py``: ``TapBackend``, the host end.
- ``device.py``: ``VirtioNet`` (rx/tx workers, config space) and ``create``.
"""

from __future__ import annotations

from .device import (
    CONFIG_SIZE,
    HDR_LEN,
    LEGACY_HDR_LEN,
    QUEUE_SIZE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    VirtioNet,
    create,
    parse_options,
)
from .options import NetOptions, derive_mac, parse_mac, parse_net_options
from .tap import TapBackend

__all__ = [
    "CONFIG_SIZE", "HDR_LEN", "LEGACY_HDR_LEN", "QUEUE_SIZE", "VIRTIO_NET_F_MAC",
    "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_NET_F_STATUS", "VIRTIO_NET_S_LINK_UP", "NetOptions",
    "TapBackend", "VirtioNet", "create", "derive_mac", "parse_mac", "parse_net_options",
    "parse_options",
]
