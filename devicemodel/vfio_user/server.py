"""The server's process lifetime: a listening (or inherited) socket, one client at a time,
the device's tasks, and a clean end on SIGTERM/SIGINT.

A client that disconnects leaves the device as it was (the protocol's rule: its memory
and eventfds are dropped, the device state is kept) and the next client is accepted.
"""

from __future__ import annotations

import logging

import trio

from ..unixserver import serve_peers
from .connection import Channel
from .device import ServedDevice
from .session import Session

log = logging.getLogger(__name__)


async def serve(served: ServedDevice, *, socket_path: str | None = None, fd: int | None = None,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``served`` until SIGTERM/SIGINT/SIGHUP (or, on an inherited connected fd,
    until that client hangs up). The device is closed on the way out."""
    await serve_peers(served.name, socket_path=socket_path, fd=fd, run=served.run,
                      serve_one=lambda conn: serve_client(served, conn), close=served.close,
                      task_status=task_status)


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
