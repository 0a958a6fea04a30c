"""Framing on the vfio-user UNIX socket: 16-byte header, payload, file descriptors.

The client sends a message's fds with its first bytes (SCM_RIGHTS). Every fd received is
owned by the :class:`Message` until a handler takes it; the rest are closed when the
message is done, so a hostile client cannot make us leak descriptors. A message we can
frame but not accept (too large, too many fds) is read to its end and marked, so the
session can answer it with an error reply and carry on in step with the stream.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from dataclasses import dataclass, field

import trio

from ..unixserver import fds_from_ancillary
from .protocol import HEADER, MAX_MESSAGE, MAX_MSG_FDS, Fatal, Header, parse_header

#: room for more fds than we accept, so a few too many are seen (and closed), not cut
_ANC_SIZE = socket.CMSG_SPACE(4 * MAX_MSG_FDS * 4)
_DISCARD_CHUNK = 64 * 1024


class Disconnected(Exception):
    """The client closed the connection between messages."""


@dataclass
class Message:
    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)
    #: (errno, why) when the message was read whole but cannot be served
    refused: tuple[int, str] | None = None

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        for fd in self.take_fds():
            os.close(fd)


class Channel:
    """One client's socket.

    Every guest register access is a message here, so the syscalls go straight to the
    socket (non-blocking) and trio is asked to wait only when nothing is there; one
    checkpoint per message keeps the other tasks running (trio's socket wrapper would
    add three scheduling rounds per message, about half of its cost).
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._raw = socket.socket(fileno=sock.fileno())  # the same fd: detached at close

    async def _recv(self, n: int, fds: list[int], *, first: bool) -> tuple[bytes, bool]:
        """Exactly ``n`` bytes; also whether the kernel cut the fds short (MSG_CTRUNC)."""
        buf = bytearray()
        cut = False
        while len(buf) < n:
            try:
                data, anc, flags, _ = self._raw.recvmsg(n - len(buf), _ANC_SIZE,
                                                        socket.MSG_DONTWAIT)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._raw)
                continue
            fds.extend(fds_from_ancillary(anc))
            cut |= bool(flags & socket.MSG_CTRUNC)
            if not data:
                if first and not buf:
                    raise Disconnected
                raise Fatal("connection closed in the middle of a message")
            buf += data
        return bytes(buf), cut

    async def _discard(self, n: int, fds: list[int]) -> None:
        while n > 0:
            chunk, _ = await self._recv(min(n, _DISCARD_CHUNK), fds, first=False)
            n -= len(chunk)

    async def receive(self) -> Message:
        """The next message. Raises Disconnected at a clean EOF, Fatal if unframeable."""
        await trio.lowlevel.checkpoint()
        fds: list[int] = []
        try:
            raw, cut = await self._recv(HEADER.size, fds, first=True)
            header = parse_header(raw)
            size = header.size - HEADER.size
            refused: tuple[int, str] | None = None
            if header.size > MAX_MESSAGE:
                await self._discard(size, fds)
                payload = b""
                refused = (errno.E2BIG, f"message of {header.size} bytes (max {MAX_MESSAGE})")
            else:
                payload, cut2 = await self._recv(size, fds, first=False) if size else (b"", False)
                cut |= cut2
            if cut or len(fds) > MAX_MSG_FDS:
                refused = (errno.EINVAL, f"more than {MAX_MSG_FDS} file descriptors")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        msg = Message(header, payload, fds, refused)
        if refused is not None:
            msg.close()
        return msg

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._raw.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._raw)
                continue
            view = view[sent:]

    async def send_with_fds(self, data: bytes, fds: list[int]) -> None:
        """For the test client: one message whose fds ride on its first bytes."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = await self.sock.sendmsg([data], anc if fds else [])
        if sent < len(data):
            await self.send(data[sent:])

    def close(self) -> None:
        if self._raw.fileno() >= 0:
            try:
                trio.lowlevel.notify_closing(self._raw)
            except RuntimeError:
                pass  # not inside trio
            self._raw.detach()
        self.sock.close()
