"""Message framing on the vhost-user UNIX socket, with file descriptors (SCM_RIGHTS).

A message is a 12-byte header and a payload; the front end sends the fds with the first
byte of the message, so they arrive with the header. Every fd we receive is owned by the
:class:`Message` until a handler takes it; whatever is left is closed, so a hostile front
end cannot make us leak descriptors.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass, field

import trio

from ..unixserver import fds_from_ancillary
from .protocol import HEADER, MAX_FDS, Header, ProtocolError, parse_header

_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)


class Disconnected(Exception):
    """The peer closed the connection (cleanly, between messages)."""


@dataclass
class Message:
    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def take_fd(self) -> int | None:
        """Take ownership of the first fd (the caller must close it), or None."""
        return self.fds.pop(0) if self.fds else None

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        for fd in self.take_fds():
            os.close(fd)


class Connection:
    """One front end's socket: read requests, write replies."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def _recv(self, n: int, fds: list[int], *, first: bool) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data, ancdata, flags, _ = await self.sock.recvmsg(n - len(buf), _ANC_SIZE)
            got = fds_from_ancillary(ancdata)
            fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("more file descriptors than any message carries")
            if len(fds) > MAX_FDS:
                raise ProtocolError(f"{len(fds)} file descriptors in one message")
            if not data:
                if first and not buf:
                    raise Disconnected
                raise ProtocolError("connection closed in the middle of a message")
            buf += data
        return bytes(buf)

    async def receive(self) -> Message:
        """The next request. Raises Disconnected at a clean EOF, ProtocolError if malformed."""
        fds: list[int] = []
        try:
            header = parse_header(await self._recv(HEADER.size, fds, first=True))
            payload = await self._recv(header.size, fds, first=False) if header.size else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Message(header, payload, fds)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def send_with_fds(self, data: bytes, fds: list[int]) -> None:
        """For the test front end: one message whose fds ride on its first byte."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = await self.sock.sendmsg([data], anc if fds else [])
        if sent < len(data):
            await self.send(data[sent:])

    def close(self) -> None:
        self.sock.close()
