"""A device served by the vhost-user back end on a UNIX socket, and our Python front end
on the other side (what QEMU does at device start: negotiate, share memory, start rings)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from devicemodel.memory import GuestMemory, MiB
from devicemodel.vhost_user.frontend import Frontend, RingSetup
from devicemodel.vhost_user.server import serve
from devicemodel.virtio.device import VIRTIO_F_RING_EVENT_IDX, VirtioDevice
from devicemodel.virtio.mock import MockDriver

RING_BASE = 0x10_0000
#: The mock driver leaves used_event at 0; without EVENT_IDX every used buffer interrupts.
NO_EVENT_IDX = ~VIRTIO_F_RING_EVENT_IDX


@asynccontextmanager
async def served(device: VirtioDevice, path: Path) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(device, socket_path=str(path),
                                                      task_status=task_status))
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def frontend(path: Path) -> AsyncIterator[Frontend]:
    fe = await Frontend.connect(str(path))
    try:
        yield fe
    finally:
        fe.close()


async def start(fe: Frontend, mem: GuestMemory, size: int = 64, index: int = 0,
                base: int = RING_BASE, *, enable: bool = True) -> MockDriver:
    drv = MockDriver(mem, base, size, index=index)
    assert await fe.set_mem_table(mem) == 0
    await fe.start_ring(RingSetup(index, size, drv.desc_addr, drv.avail_addr, drv.used_addr),
                        enable=enable)
    return drv


def disk_image(tmp_path: Path, size: int = 1 * MiB) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(size))
    return img
