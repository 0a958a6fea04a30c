"""virtio-net (virtio 1.2 §5.1) over a Linux tap device (tap.py).

Frames move between the tap and guest buffers with ``os.readv``/``os.writev`` on guest-RAM
memoryviews; only the 10/12-byte virtio-net header is rewritten on the way, because we
offer no checksum or segmentation offloads and so must hand the driver plain headers
(and the host plain frames) whatever the other side wrote.

rx waits for the tap with ``trio.lowlevel.wait_readable`` (no polling) and, when the
ring is empty, for the driver's kick; with VIRTIO_NET_F_MRG_RXBUF a frame may span
several chains (``num_buffers``). tx drains the ring in batches and interrupts once per
batch.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

import trio

from ..buffers import copy_into
from ..device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    PciIds,
    VirtioDevice,
)
from ..queue import Virtqueue, VirtqueueError
from .options import NetOptions, parse_net_options
from .tap import TapBackend

log = logging.getLogger(__name__)

VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1

QUEUE_SIZE = 1024  # acrn-dm's VIRTIO_NET_RINGSZ
RXQ, TXQ = 0, 1
CONFIG_SIZE = 10  # mac[6], status, max_virtqueue_pairs
HDR_LEN = 12  # virtio_net_hdr with num_buffers (VERSION_1 or MRG_RXBUF)
LEGACY_HDR_LEN = 10
RX_BATCH = 64
TX_BATCH = 256

_ZERO_HDR = bytes(HDR_LEN)


class VirtioNet(VirtioDevice):
    device_type = VIRTIO_ID_NET
    pci_ids = PciIds(legacy_device_id=0x1000, device_type=VIRTIO_ID_NET,
                     class_code=0x020000, windows_subvendor=True)
    name = "virtio-net"

    def __init__(self, opts: NetOptions, tap: TapBackend | None = None) -> None:
        super().__init__(2, QUEUE_SIZE, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
                         | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_NET_F_MAC
                         | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF, CONFIG_SIZE)
        if opts.vhost:
            log.warning("virtio-net: vhost-net is not used by acrn-pydm; "
                        "tap=%s runs in user space", opts.tap)
        self.opts = opts
        self.tap = tap if tap is not None else TapBackend.open(opts.tap)
        self.mac = opts.mac
        self.link_up = True
        self.hdr_len = HDR_LEN
        self.rx_frames = self.tx_frames = self.tx_dropped = 0
        self._build_config()

    def _build_config(self) -> None:
        self.config[0:6] = self.mac
        struct.pack_into("<HH", self.config, 6,
                         VIRTIO_NET_S_LINK_UP if self.link_up else 0, 1)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset >= 0 and offset + len(data) <= 6:  # a legacy driver may set the MAC
            self.config[offset : offset + len(data)] = data

    def on_reset(self) -> None:
        self._build_config()

    def set_link(self, up: bool) -> None:
        """Change the link status the guest sees (and tell it with a config interrupt)."""
        if up != self.link_up:
            self.link_up = up
            struct.pack_into("<H", self.config, 6, VIRTIO_NET_S_LINK_UP if up else 0)
            self.config_changed()

    def close(self) -> None:
        self.tap.close()

    def counters(self) -> dict[str, object]:
        """For the monitor's ``devices``: the MAC the guest reads (each VM must have its
        own on a shared bridge), the link and the frame counts."""
        return {"mac": bytes(self.config[0:6]).hex(":"), "tap": self.tap.name,
                "link_up": self.link_up, "rx_frames": self.rx_frames,
                "tx_frames": self.tx_frames, "tx_dropped": self.tx_dropped}

    # -- workers -----------------------------------------------------------------------

    def on_activate(self) -> None:
        legacy_plain = not self.features & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = LEGACY_HDR_LEN if legacy_plain else HDR_LEN
        self.tap.set_vnet_hdr_len(self.hdr_len)

    def start_workers(self, nursery: trio.Nursery) -> None:
        rx, tx = self.queues
        if rx.ready:
            nursery.start_soon(self._rx, rx)
        if tx.ready:
            nursery.start_soon(self._tx, tx)

    async def _tx(self, q: Virtqueue) -> None:
        hdr_len = self.hdr_len
        header = memoryview(_ZERO_HDR)[:hdr_len]
        fd = self.tap.fd
        while True:
            sent = 0
            while sent < TX_BATCH:
                chain = q.pop()
                if chain is None:
                    break
                self._send(fd, chain.readable, chain.readable_len, header)
                q.add_used(chain.head, 0)
                sent += 1
            if sent:
                self.signal(q)
                await trio.lowlevel.checkpoint()
            else:
                await self.wait_kick(q)

    def _send(self, fd: int, views: list[memoryview], length: int, header: memoryview) -> None:
        hdr_len = len(header)
        if length <= hdr_len:
            self.tx_dropped += 1
            return
        # skip the guest's header: the host gets a clean one (no offloads negotiated)
        out: list[memoryview] = [header]
        skip = hdr_len
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            out.append(v[skip:] if skip else v)
            skip = 0
        try:
            os.writev(fd, out)
            self.tx_frames += 1
        except OSError as e:
            self.tx_dropped += 1
            if e.errno not in (errno.EAGAIN, errno.EIO):
                self.glog.warning("%s: tx to %s: %s", self.name, self.tap.name, e)

    async def _rx(self, q: Virtqueue) -> None:
        fd = self.tap.fd
        while True:
            if not q.has_available():
                await self.wait_kick(q)
                continue
            await trio.lowlevel.wait_readable(fd)
            delivered = 0
            while delivered < RX_BATCH and self._receive(fd, q):
                delivered += 1
            if delivered:
                self.signal(q)

    def _receive(self, fd: int, q: Virtqueue) -> bool:
        """Move one frame from the tap into guest buffers; False if none or no buffers."""
        hdr_len = self.hdr_len
        mergeable = bool(self.features & VIRTIO_NET_F_MRG_RXBUF)
        need = self.tap.mtu + 18 + hdr_len  # Ethernet header, VLAN tag, virtio header
        chains = []
        views: list[memoryview] = []
        lens: list[int] = []
        capacity = 0
        while capacity < need:
            chain = q.pop()
            if chain is None:
                break
            if chain.writable_len == 0:
                raise VirtqueueError(f"{self.name}: rx buffer is not device-writable")
            chains.append(chain)
            views.extend(chain.writable)
            lens.append(chain.writable_len)
            capacity += chain.writable_len
            if not mergeable:
                break
        if not chains:
            return False
        if lens[0] < hdr_len:
            raise VirtqueueError(f"{self.name}: rx buffer smaller than the virtio-net header")
        try:
            n = os.readv(fd, views)
        except OSError as e:
            q.undo_pop(len(chains))
            if e.errno != errno.EAGAIN:
                self.glog.warning("%s: rx from %s: %s", self.name, self.tap.name, e)
            return False
        if n <= hdr_len:
            q.undo_pop(len(chains))
            return n > 0
        used = 0
        remaining = n
        for length in lens:
            if remaining <= 0:
                break
            used += 1
            remaining -= length
        header = bytearray(hdr_len)  # no GUEST_CSUM/GSO negotiated: flags and gso are 0
        if hdr_len == HDR_LEN:
            struct.pack_into("<H", header, 10, used)
        copy_into(views, header)
        q.undo_pop(len(chains) - used)
        remaining = n
        for chain, length in zip(chains[:used], lens, strict=False):
            q.add_used(chain.head, min(length, remaining))
            remaining -= length
        self.rx_frames += 1
        return True


def parse_options(options: str, slot: int = 0, func: int = 0) -> NetOptions:
    """What ``create`` builds from, without opening the tap (the validator's check)."""
    return parse_net_options(options, slot, func)


def create(options: str, slot: int = 0, func: int = 0) -> VirtioNet:
    """The ``-s <slot>,virtio-net,<options>`` device; slot/func seed the default MAC."""
    opts = parse_options(options, slot, func)
    if opts.legacy_form:
        log.warning("virtio-net,%s: the form before acrn-dm 3.0; read as tap=%s", options,
                    opts.tap)
    return VirtioNet(opts)
