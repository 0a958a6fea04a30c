"""virtio-blk on the mock transport: a device, a mock driver for its queue, and requests."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from devicemodel.memory import GuestMemory
from devicemodel.virtio.blk import VirtioBlk, parse_blk_options
from devicemodel.virtio.mock import MockDriver, RecordingInterrupt, wait_used


@dataclass
class Rig:
    dev: VirtioBlk
    drv: MockDriver
    irq: RecordingInterrupt

    def request(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                indirect: bool = False) -> int:
        hdr = struct.pack("<IIQ", rtype, 0, sector)
        readable = [hdr] + ([out] if out else [])
        writable = ([in_len] if in_len else []) + [1]
        head = self.drv.add_chain(readable, writable, indirect=indirect)
        self.dev.queue_notify(0)
        return head

    def status(self, head: int) -> int:
        return self.drv.written(head)[-1]

    async def do(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                 indirect: bool = False) -> tuple[int, bytes, int]:
        head = self.request(rtype, sector, out, in_len, indirect)
        ((h, length),) = await wait_used(self.drv, 1)
        assert h == head
        data = self.drv.written(head)
        return data[-1], data[:in_len], length


@asynccontextmanager
async def rig(mem: GuestMemory, options: str, features: int | None = None,
              base: int = 0x100000, data_size: int = 4 << 20) -> AsyncIterator[Rig]:
    dev = VirtioBlk(parse_blk_options(options))
    drv = MockDriver(mem, base, 256, data_size=data_size)
    irq = RecordingInterrupt()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run)
            feats = dev.device_features if features is None else features
            dev.activate(feats & dev.device_features, [drv.queue()], irq)
            yield Rig(dev, drv, irq)
            nursery.cancel_scope.cancel()
    finally:
        dev.close()
