"""virtio-rnd, the entropy device (virtio 1.2 §5.4): guest buffers filled from getrandom.

The device may return fewer bytes than a buffer holds, so a spent budget (options.py's
rate limit) shortens replies and then waits.
"""

from __future__ import annotations

import os

import trio

from ..buffers import copy_into
from ..device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_ENTROPY,
    PciIds,
    VirtioDevice,
)
from ..queue import Virtqueue
from .options import RndOptions, parse_rnd_options

QUEUE_SIZE = 64
MAX_PER_REQUEST = 64 * 1024  # getrandom() hands out at most 32 MiB; guests ask for little


class VirtioRnd(VirtioDevice):
    device_type = VIRTIO_ID_ENTROPY
    pci_ids = PciIds(legacy_device_id=0x1005, device_type=VIRTIO_ID_ENTROPY,
                     class_code=0x100000)
    name = "virtio-rnd"

    def __init__(self, opts: RndOptions | None = None) -> None:
        super().__init__(1, QUEUE_SIZE, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
                         | VIRTIO_F_RING_INDIRECT_DESC, 0)
        self.opts = opts or RndOptions()
        self._budget = self.opts.max_bytes
        self._window_end = 0.0

    def start_workers(self, nursery: trio.Nursery) -> None:
        q = self.queues[0]
        if q.ready:
            nursery.start_soon(self._serve, q)

    async def _take_budget(self, want: int) -> int:
        if self.opts.max_bytes is None:
            return want
        while True:
            now = trio.current_time()
            if now >= self._window_end:
                self._window_end = now + self.opts.period_ms / 1000
                self._budget = self.opts.max_bytes
            if self._budget:
                n = min(want, self._budget)
                self._budget -= n
                return n
            await trio.sleep_until(self._window_end)

    async def _serve(self, q: Virtqueue) -> None:
        while True:
            chain = q.pop()
            if chain is None:
                await self.wait_kick(q)
                continue
            want = min(chain.writable_len, MAX_PER_REQUEST)
            n = await self._take_budget(want) if want else 0
            data = os.getrandom(n) if n else b""
            copy_into(chain.writable, data)
            q.add_used(chain.head, n)
            self.signal(q)


def parse_options(options: str, slot: int = 0, func: int = 0) -> RndOptions:
    """What ``create`` builds from, without opening the source (the validator's check)."""
    return parse_rnd_options(options)


def create(options: str, slot: int = 0, func: int = 0) -> VirtioRnd:
    """The ``-s <slot>,virtio-rnd[,<options>]`` device."""
    return VirtioRnd(parse_options(options, slot, func))
