"""A vfio-user client in Python (what QEMU's vfio-user-pci does), and a served device on the
other end of a socketpair, for the component tests.

``Client`` sends one command and waits for its reply; ``VfioUserError`` carries an error
reply's errno. ``ClientRam`` is guest memory on a memfd the client maps to the server with
DMA_MAP. ``ModernVirtio`` drives a modern virtio function the way Linux's virtio_pci does,
over REGION_READ/WRITE, with MSI-X vectors as eventfds handed over by SET_IRQS (the client
owns the MSI-X table, as QEMU does).
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from devicemodel.memory import MemoryMap, RamRegion
from devicemodel.pci import caps as pcaps
from devicemodel.vfio_user import protocol as p
from devicemodel.vfio_user.connection import Channel
from devicemodel.vfio_user.device import ServedDevice
from devicemodel.vfio_user.server import serve_client
from devicemodel.vfio_user.session import Session
from devicemodel.virtio.mock import MockDriver

RW = p.DMA_READ_FLAG | p.DMA_WRITE_FLAG
QEMU_CAPS = {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096,
             "max_dma_maps": 65535, "migration": {"pgsize": 4096, "max_bitmap_size": 1 << 27},
             "write_multiple": True}


class VfioUserError(Exception):
    def __init__(self, command: int, err: int) -> None:
        super().__init__(f"command {command}: error {err} ({os.strerror(err)})")
        self.errno = err


@dataclass
class Reply:
    header: p.Header
    payload: bytes


class Client:
    """One connection to a server; commands one at a time."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.channel = Channel(sock)
        self._id = 0

    def close(self) -> None:
        self.channel.close()

    async def send(self, cmd: int, payload: bytes = b"", fds: list[int] | None = None,
                   flags: int = 0) -> int:
        """Send one command; ``fds`` go with it and are closed here (pass dups)."""
        self._id = (self._id + 1) & 0xFFFF
        data = p.command(cmd, payload, msg_id=self._id, flags=flags)
        try:
            if fds:
                await self.channel.send_with_fds(data, fds)
            else:
                await self.channel.send(data)
        finally:
            for fd in fds or ():
                os.close(fd)
        return self._id

    async def reply(self) -> Reply:
        msg = await self.channel.receive()
        msg.close()
        return Reply(msg.header, msg.payload)

    async def call(self, cmd: int, payload: bytes = b"", fds: list[int] | None = None,
                   flags: int = 0) -> bytes:
        """Send, wait for the reply to it, raise VfioUserError for an error reply."""
        msg_id = await self.send(cmd, payload, fds, flags)
        r = await self.reply()
        assert r.header.id == msg_id and r.header.command == cmd, r.header
        assert r.header.kind == p.TYPE_REPLY, r.header
        if r.header.flags & p.ERROR:
            raise VfioUserError(cmd, r.header.error)
        return r.payload

    # --- commands ------------------------------------------------------------------------
    async def version(self, caps: dict[str, object] | None = None, minor: int = 0
                      ) -> p.Version:
        caps = QEMU_CAPS if caps is None else caps
        payload = await self.call(p.Cmd.VERSION, p.version_payload(0, minor, caps))
        assert payload.endswith(b"\0"), payload
        return p.parse_version(payload)

    async def dma_map(self, address: int, size: int, fd: int | None = None, offset: int = 0,
                      flags: int = RW) -> None:
        await self.call(p.Cmd.DMA_MAP, p.dma_map_payload(flags, offset, address, size),
                        [fd] if fd is not None else None)

    async def dma_unmap(self, address: int, size: int, flags: int = 0) -> bytes:
        return await self.call(p.Cmd.DMA_UNMAP, p.dma_unmap_payload(24, flags, address, size))

    async def device_info(self) -> tuple[int, int, int]:
        payload = await self.call(p.Cmd.DEVICE_GET_INFO, p.device_info_payload(0, 0, 0))
        _, flags, regions, irqs = struct.unpack("<IIII", payload)
        return flags, regions, irqs

    async def region_info(self, index: int) -> tuple[int, int]:
        payload = await self.call(p.Cmd.DEVICE_GET_REGION_INFO,
                                  p.region_info.build({"argsz": 32, "flags": 0, "index": index,
                                                       "cap_offset": 0, "size": 0,
                                                       "offset": 0}))
        info = p.region_info.parse(payload)
        assert info.index == index
        return info.flags, info.size

    async def irq_info(self, index: int) -> tuple[int, int]:
        payload = await self.call(p.Cmd.DEVICE_GET_IRQ_INFO,
                                  p.irq_info.build({"argsz": 16, "flags": 0, "index": index,
                                                    "count": 0}))
        info = p.irq_info.parse(payload)
        return info.flags, info.count

    async def set_irqs(self, index: int, flags: int, start: int, count: int,
                       fds: list[int] | None = None, data: bytes = b"") -> None:
        await self.call(p.Cmd.DEVICE_SET_IRQS, p.irq_set_payload(flags, index, start, count,
                                                                 data), fds)

    async def read(self, region: int, offset: int, count: int) -> bytes:
        payload = await self.call(p.Cmd.REGION_READ, p.region_access_payload(offset, region,
                                                                            count))
        off, reg, n = p.REGION_ACCESS.unpack_from(payload)
        assert (off, reg, n) == (offset, region, count)
        return payload[p.REGION_ACCESS.size :]

    async def write(self, region: int, offset: int, data: bytes, *, posted: bool = False
                    ) -> None:
        payload = p.region_access_payload(offset, region, len(data), data)
        if posted:  # QEMU's posted writes: no reply comes
            await self.send(p.Cmd.REGION_WRITE, payload, flags=p.NO_REPLY)
        else:
            await self.call(p.Cmd.REGION_WRITE, payload)

    async def read_int(self, region: int, offset: int, size: int) -> int:
        return int.from_bytes(await self.read(region, offset, size), "little")

    async def write_int(self, region: int, offset: int, size: int, value: int) -> None:
        await self.write(region, offset, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))

    async def cfg_read(self, offset: int, size: int) -> int:
        return await self.read_int(p.CONFIG_REGION, offset, size)

    async def cfg_write(self, offset: int, size: int, value: int) -> None:
        await self.write_int(p.CONFIG_REGION, offset, size, value)

    async def reset(self) -> None:
        await self.call(p.Cmd.DEVICE_RESET)


@asynccontextmanager
async def connected(served: ServedDevice, *, negotiate: bool = True
                    ) -> AsyncIterator[tuple[Client, list[Session]]]:
    """A client talking to ``served`` over a socketpair; the session list gets the server
    side's Session once it ended (the client closing ends it)."""
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ended: list[Session] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(served.run)

        async def server_side() -> None:
            ended.append(await serve_client(served, b))

        nursery.start_soon(server_side)
        client = Client(a)
        try:
            if negotiate:
                await client.version()
            yield client, ended
        finally:
            client.close()
            with trio.fail_after(10):
                while not ended:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()


class ClientRam(MemoryMap):
    """The client's guest memory: one memfd at ``gpa``, shared with the server by fd."""

    def __init__(self, size: int = 4 << 20, gpa: int = 0) -> None:
        super().__init__()
        self.fd = os.memfd_create("vfio-user-client-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.gpa = gpa
        self.size = size
        self.add(RamRegion(gpa, size, self.mm, self.fd))

    async def map_to(self, client: Client) -> None:
        await client.dma_map(self.gpa, self.size, os.dup(self.fd))

    def close(self) -> None:
        for v in self._views:
            v.release()
        self.mm.close()
        os.close(self.fd)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def eventfd_count(fd: int) -> int:
    """Read (and clear) an eventfd's counter; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


async def wait_eventfd(fd: int, timeout: float = 5.0) -> int:
    with trio.fail_after(timeout):
        while True:
            n = eventfd_count(fd)
            if n:
                return n
            await trio.sleep(0.001)


# --- a modern virtio driver over the client ----------------------------------------------
COMMON_STATUS, COMMON_DF, COMMON_DFSELECT, COMMON_GF, COMMON_GFSELECT = 20, 4, 0, 12, 8
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOFF, Q_DESC, Q_AVAIL, Q_USED = 22, 24, 26, 28, 30, 32, 40, 48
COMMON_MSIX = 16
F_VERSION_1 = 1 << 32


@dataclass
class ModernVirtio:
    """Linux's virtio_pci_modern steps, through REGION_READ/WRITE; MSI-X through SET_IRQS."""

    client: Client
    ram: ClientRam
    caps: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # type -> bar, off, mult
    vectors: list[int] = field(default_factory=list)

    @classmethod
    async def one_queue(cls, client: Client, ram: ClientRam,
                        ring: int) -> tuple[ModernVirtio, MockDriver]:
        """Map ``ram``, then probe and start the function as Linux does with two MSI-X
        vectors and queue 0 (16 entries at ``ring``, vector 1): the driver and the queue."""
        await ram.map_to(client)
        drv = cls(client, ram)
        await drv.probe()
        await drv.init(nvectors=2)
        q = await drv.setup_queue(0, ring, 16, vector=1)
        await drv.driver_ok()
        return drv, q

    async def probe(self) -> None:
        cfg = await self.client.read(p.CONFIG_REGION, 0, 256)
        for cap in pcaps.walk(cfg):
            if cap.cap_id == pcaps.CAP_ID_VENDOR:
                cfg_type, bar = cfg[cap.offset + 3], cfg[cap.offset + 4]
                off = int.from_bytes(cfg[cap.offset + 8 : cap.offset + 12], "little")
                mult = int.from_bytes(cfg[cap.offset + 16 : cap.offset + 20], "little")
                self.caps.setdefault(cfg_type, (bar, off, mult))

    async def common_read(self, off: int, size: int) -> int:
        bar, base, _ = self.caps[pcaps.VIRTIO_PCI_CAP_COMMON_CFG]
        return await self.client.read_int(bar, base + off, size)

    async def common_write(self, off: int, size: int, value: int) -> None:
        bar, base, _ = self.caps[pcaps.VIRTIO_PCI_CAP_COMMON_CFG]
        await self.client.write_int(bar, base + off, size, value)

    async def init(self, nvectors: int) -> int:
        """Reset, features, MSI-X: enable in config, eventfds for ``nvectors`` vectors."""
        await self.common_write(COMMON_STATUS, 1, 0)
        with trio.fail_after(5):
            while await self.common_read(COMMON_STATUS, 1):
                await trio.sleep(0.001)
        await self.common_write(COMMON_STATUS, 1, 1 | 2)
        features = 0
        for sel in (0, 1):
            await self.common_write(COMMON_DFSELECT, 4, sel)
            features |= await self.common_read(COMMON_DF, 4) << (32 * sel)
        accepted = features & (F_VERSION_1 | 0xFFFF_FFFF) & ~(1 << 29)  # no EVENT_IDX
        for sel in (0, 1):
            await self.common_write(COMMON_GFSELECT, 4, sel)
            await self.common_write(COMMON_GF, 4, (accepted >> (32 * sel)) & 0xFFFF_FFFF)
        await self.common_write(COMMON_STATUS, 1, 1 | 2 | 8)
        assert await self.common_read(COMMON_STATUS, 1) & 8, "FEATURES_OK refused"
        cap = pcaps.find(await self.client.read(p.CONFIG_REGION, 0, 256), pcaps.CAP_ID_MSIX)
        assert cap is not None
        # QEMU's order: MSI-X on in config, then one eventfd per vector via SET_IRQS
        await self.client.cfg_write(cap.offset + 2, 2, pcaps.MSIX_CTRL_ENABLE)
        self.vectors = [eventfd() for _ in range(nvectors)]
        await self.client.set_irqs(p.MSIX_IRQ, p.SET_DATA_EVENTFD | p.SET_ACTION_TRIGGER, 0,
                                   nvectors, [os.dup(fd) for fd in self.vectors])
        return accepted

    async def setup_queue(self, index: int, base: int, size: int, vector: int) -> MockDriver:
        drv = MockDriver(self.ram, base, size, index=index, data_size=64 << 10)
        await self.common_write(Q_SELECT, 2, index)
        await self.common_write(Q_SIZE, 2, size)
        for off, addr in ((Q_DESC, drv.desc_addr), (Q_AVAIL, drv.avail_addr),
                          (Q_USED, drv.used_addr)):
            await self.common_write(off, 4, addr & 0xFFFF_FFFF)
            await self.common_write(off + 4, 4, addr >> 32)
        await self.common_write(Q_MSIX, 2, vector)
        assert await self.common_read(Q_MSIX, 2) == vector
        await self.common_write(Q_ENABLE, 2, 1)
        return drv

    async def driver_ok(self) -> None:
        await self.common_write(COMMON_STATUS, 1, 1 | 2 | 8 | 4)

    async def kick(self, index: int) -> None:
        bar, base, mult = self.caps[pcaps.VIRTIO_PCI_CAP_NOTIFY_CFG]
        await self.common_write(Q_SELECT, 2, index)
        noff = await self.common_read(Q_NOFF, 2)
        await self.client.write_int(bar, base + noff * mult, 2, index)

    def close(self) -> None:
        for fd in self.vectors:
            os.close(fd)
