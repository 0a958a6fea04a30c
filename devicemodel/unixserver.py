"""One device served to peers over a Unix socket, one peer at a time, until a signal: the
process lifetime vhost-user back ends and vfio-user servers share.

The socket is either one we listen on (a stale socket file left by a dead server is
replaced; a peer that leaves is followed by the next one) or an inherited fd (a listening
socket handed over, served the same way, or a connected one: the process ends when that
peer hangs up). SIGTERM, SIGINT and SIGHUP end it cleanly; the device is closed and the
socket file removed on every way out.
"""

from __future__ import annotations

import array
import logging
import os
import signal
import socket as pysocket
import stat
from collections.abc import Awaitable, Callable
from contextlib import suppress

import trio

log = logging.getLogger(__name__)


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried (ours to close from now on)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == pysocket.SOL_SOCKET and kind == pysocket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


async def listen_unix(path: str) -> trio.socket.SocketType:
    """A listening socket at ``path``; a stale socket file left by a dead server is replaced."""
    with suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def _is_listening(sock: trio.socket.SocketType) -> bool:
    return bool(sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_ACCEPTCONN))


async def serve_peers(name: str, *, socket_path: str | None, fd: int | None,
                      run: Callable[..., Awaitable[None]],
                      serve_one: Callable[[trio.socket.SocketType], Awaitable[object]],
                      close: Callable[[], None],
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Start the device's task ``run`` (a ``nursery.start`` target), then hand each peer's
    connection to ``serve_one`` (closed afterwards) until a signal; ``close`` the device
    on the way out, also when the socket cannot be opened."""
    if (socket_path is None) == (fd is None):
        raise ValueError("give exactly one of socket_path and fd")
    try:
        if fd is not None:
            sock = trio.socket.fromfd(fd, pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            os.close(fd)
        else:
            assert socket_path is not None
            sock = await listen_unix(socket_path)
    except BaseException:
        close()
        raise
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("%s: %s, exiting", name, signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                await nursery.start(run)
                task_status.started()
                if _is_listening(sock):
                    while True:
                        conn, _ = await sock.accept()
                        try:
                            await serve_one(conn)
                        finally:
                            conn.close()
                else:
                    await serve_one(sock)
                    nursery.cancel_scope.cancel()
    finally:
        sock.close()
        close()
        if socket_path is not None:
            with suppress(OSError):
                os.unlink(socket_path)
