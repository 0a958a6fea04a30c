"""Host ends on stream sockets: a server we listen on (UNIX path or TCP port) with one
client at a time, or a client that connected at start-up.

A server either keeps its client until it leaves (the next one waits in the backlog) or
lets a new client take over (``takeover``). A client that hangs up is dropped and, for a
server, the next one is accepted; a client end never reconnects. Everything is
non-blocking; a peer that never reads only fills its own socket buffer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
from collections.abc import Awaitable, Callable

import trio

from .base import HostEnd

log = logging.getLogger(__name__)

_QUIET = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)


def _nothing() -> None:
    pass


class SocketEnd(HostEnd):
    """A listening socket and its current client, or one connected client."""

    kind = "socket"

    def __init__(self, description: str, *, listener: socket.socket | None = None,
                 conn: socket.socket | None = None, path: str | None = None,
                 takeover: bool = False) -> None:
        super().__init__(description)
        self.path = path  # a UNIX socket path we created (removed at close)
        self.listener = listener
        self.takeover = takeover
        self.conn: socket.socket | None = None
        self._have_conn = trio.Event()
        self._gone = trio.Event()
        self._changed: Callable[[], None] = _nothing
        if conn is not None:
            self._attach(conn)

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def _attach(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if self.conn is not None:
            self._detach()
        self.conn = conn
        self._gone = trio.Event()
        self._have_conn.set()
        self._changed()

    def _detach(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with contextlib.suppress(RuntimeError):  # outside trio: nobody waits on it
            trio.lowlevel.notify_closing(conn)
        conn.close()
        self._have_conn = trio.Event()
        self._gone.set()
        self._changed()

    async def serve(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        listener = self.listener
        if listener is None:
            await trio.sleep_forever()
        assert listener is not None
        while True:
            if self.conn is not None and not self.takeover:
                await self._gone.wait()  # one client at a time: the next waits its turn
                continue
            await trio.lowlevel.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:
                log.warning("%s: accept failed: %s", self.description, e)
                return
            self._attach(conn)

    async def wait_readable(self) -> None:
        await self._wait_client(trio.lowlevel.wait_readable)

    async def _wait_client(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        """Until there is a client and ``wait`` on its socket returned."""
        while True:
            conn = self.conn
            if conn is None:
                await self._have_conn.wait()
                continue
            try:
                await wait(conn)
            except trio.ClosedResourceError:
                continue  # dropped meanwhile (by the other direction): wait for the next
            if conn is self.conn:
                return

    def read_now(self, limit: int) -> bytes | None:
        conn = self.conn
        if conn is None:
            return None
        try:
            data = conn.recv(limit)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if data:
            return data
        self._detach()  # the client hung up
        return None

    async def wait_writable(self) -> None:
        await self._wait_client(trio.lowlevel.wait_writable)

    def write_now(self, data: bytes | bytearray | memoryview) -> int | None:
        conn = self.conn
        if conn is None:
            return None
        try:
            return conn.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            if e.errno not in _QUIET:
                log.warning("%s: send failed: %s", self.description, e)
            self._detach()
            return None

    def _wait_writable_blocking(self, timeout: float) -> bool:
        conn = self.conn
        if conn is None:
            return False
        with contextlib.suppress(OSError, ValueError):
            select.select([], [conn], [], timeout)
        return True

    def close(self) -> None:
        self._changed = _nothing
        self._detach()
        if self.listener is not None:
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self.listener)
            self.listener.close()
            self.listener = None
            if self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


def listen_unix(path: str, *, backlog: int = 1, takeover: bool = False) -> SocketEnd:
    """A server on a UNIX socket at ``path`` (a stale socket there is replaced; any
    other file is left alone and the bind fails with OSError)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return SocketEnd(f"socket:{path}", listener=sock, path=path, takeover=takeover)


def listen_tcp(port: int, *, backlog: int = 1, takeover: bool = False) -> SocketEnd:
    """A server on TCP ``port`` of every local address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return SocketEnd(f"tcp:{port}", listener=sock, takeover=takeover)


def connect_unix(path: str) -> SocketEnd:
    """A client connected to the UNIX socket at ``path`` now (OSError if nobody listens)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return SocketEnd(f"socket:{path}", conn=sock)
