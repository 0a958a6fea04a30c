"""A minimal vhost-user front end: what QEMU does, in a few calls, for tests and tools.

It shares a memfd-backed ``GuestMemory`` with the back end, programs rings that a
``MockDriver`` lays out in that memory, and passes kick/call eventfds. This lets tests
drive a device over the real socket protocol where QEMU cannot (QEMU 7.2 has no
vhost-user console), and check what the back end does with malformed messages.
"""

from __future__ import annotations

import os
import socket as pysocket
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ..memory import GuestMemory
from . import protocol as p
from .connection import Connection
from .protocol import Req

#: Where our fake front end pretends guest RAM is mapped in its address space.
UVA_BASE = 0x7F00_0000_0000


@dataclass
class RingSetup:
    """One ring the front end will start: index, size, guest addresses."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    base: int = 0


class Frontend:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self.err: dict[int, int] = {}

    @classmethod
    async def connect(cls, path: str) -> Frontend:
        sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        await sock.connect(path)
        return cls(Connection(sock))

    async def read_reply(self, request: int) -> bytes:
        head = b""
        while len(head) < p.HEADER.size:
            chunk = await self.conn.sock.recv(p.HEADER.size - len(head))
            if not chunk:
                raise ConnectionError("back end closed the connection")
            head += chunk
        req, flags, size = p.HEADER.unpack(head)
        if req != request or not flags & p.FLAG_REPLY:
            raise ConnectionError(f"unexpected reply {req} flags {flags:#x} to {request}")
        body = b""
        while len(body) < size:
            chunk = await self.conn.sock.recv(size - len(body))
            if not chunk:
                raise ConnectionError("back end closed the connection mid-reply")
            body += chunk
        return body

    async def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
                   *, need_reply: bool = False) -> None:
        data = p.encode(request, payload, reply=False, need_reply=need_reply)
        await self.conn.send_with_fds(data, list(fds))

    async def call_u64(self, request: int) -> int:
        await self.send(request)
        return p.U64.unpack(await self.read_reply(request))[0]

    async def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with need_reply and return the back end's status (0 = success)."""
        await self.send(request, payload, fds, need_reply=True)
        return p.U64.unpack(await self.read_reply(request))[0]

    async def negotiate(self, want_features: int | None = None) -> int:
        """GET/SET_FEATURES and protocol features (REPLY_ACK, MQ, CONFIG if offered)."""
        offered = await self.call_u64(Req.GET_FEATURES)
        features = offered if want_features is None else offered & want_features
        if offered & p.F_PROTOCOL_FEATURES:
            proto = await self.call_u64(Req.GET_PROTOCOL_FEATURES)
            await self.send(Req.SET_PROTOCOL_FEATURES, p.U64.pack(proto))
            features |= p.F_PROTOCOL_FEATURES
        await self.send(Req.SET_OWNER)
        await self.send(Req.SET_FEATURES, p.U64.pack(features))
        return features

    async def set_mem_table(self, mem: GuestMemory) -> int:
        payload = p.MEM_HEADER.pack(len(mem.regions), 0)
        fds = []
        for r in mem.regions:
            payload += p.MEM_REGION.pack(r.gpa, r.size, UVA_BASE + r.gpa, 0)
            fds.append(r.fd)
        return await self.ack(Req.SET_MEM_TABLE, payload, fds)

    async def start_ring(self, ring: RingSetup, *, enable: bool = True) -> None:
        i = ring.index
        await self.send(Req.SET_VRING_NUM, p.VRING_STATE.pack(i, ring.size))
        await self.send(Req.SET_VRING_BASE, p.VRING_STATE.pack(i, ring.base))
        await self.send(Req.SET_VRING_ADDR, p.VRING_ADDR.pack(
            i, 0, UVA_BASE + ring.desc, UVA_BASE + ring.used, UVA_BASE + ring.avail, 0))
        self.kick[i] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call[i] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        await self.send(Req.SET_VRING_KICK, p.U64.pack(i), [self.kick[i]])
        await self.send(Req.SET_VRING_CALL, p.U64.pack(i), [self.call[i]])
        if enable:
            await self.send(Req.SET_VRING_ENABLE, p.VRING_STATE.pack(i, 1))

    async def stop_ring(self, index: int) -> int:
        """GET_VRING_BASE: the back end stops the ring and says where it was."""
        await self.send(Req.GET_VRING_BASE, p.VRING_STATE.pack(index, 0))
        _, num = p.VRING_STATE.unpack(await self.read_reply(Req.GET_VRING_BASE))
        return num

    def kick_ring(self, index: int) -> None:
        os.eventfd_write(self.kick[index], 1)

    async def wait_call(self, index: int, timeout: float = 5.0) -> None:
        fd = self.call[index]
        with trio.fail_after(timeout):
            while True:
                try:
                    os.eventfd_read(fd)
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)

    async def get_config(self, offset: int, size: int) -> bytes:
        await self.send(Req.GET_CONFIG, p.CONFIG_HEADER.pack(offset, size, 0) + bytes(size))
        body = await self.read_reply(Req.GET_CONFIG)
        return body[p.CONFIG_HEADER.size:]

    def close(self) -> None:
        for fds in (self.kick, self.call, self.err):
            for fd in fds.values():
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
            fds.clear()
        self.conn.close()
