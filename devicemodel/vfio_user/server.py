"""The server's process lifetime: a listening (or inherited) socket, one client at a time,
the device's tasks, and a clean end on SIGTERM/SIGINT.

A client that disconnects leaves the device as it was (the protocol's rule: its memory
and eventfds are dropped, the device state is kept) and the next client is accepted.
"""

from __future__ import annotations

import logging
import os
import signal
import socket as pysocket
from contextlib import suppress

import trio

from ..vhost_user.server import listen_unix
from .connection import Channel
from .device import ServedDevice
from .session import Session

log = logging.getLogger(__name__)


def _is_listening(sock: trio.socket.SocketType) -> bool:
    return bool(sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_ACCEPTCONN))


async def serve(served: ServedDevice, *, socket_path: str | None = None, fd: int | None = None,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``served`` until SIGTERM/SIGINT/SIGHUP (or, on an inherited connected fd,
    until that client hangs up). The device is closed on the way out."""
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
        served.close()
        raise
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("%s: %s, exiting", served.name, signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                await nursery.start(served.run)
                task_status.started()
                if _is_listening(sock):
                    while True:
                        conn, _ = await sock.accept()
                        await serve_client(served, conn)
                else:
                    await serve_client(served, sock)
                    nursery.cancel_scope.cancel()
    finally:
        sock.close()
        served.close()
        if socket_path is not None:
            with suppress(OSError):
                os.unlink(socket_path)


async def serve_client(served: ServedDevice, conn: trio.socket.SocketType) -> Session:
    """One client, start to end; the connection is closed afterwards."""
    log.info("%s: client connected", served.name)
    channel = Channel(conn)
    session = Session(served, channel)
    try:
        await session.serve()
    finally:
        channel.close()
    log.info("%s: client disconnected (%d commands, %d refused)", served.name,
             session.handled, session.errors)
    return session
