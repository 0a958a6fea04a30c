"""The back end's process lifetime: a listening (or inherited) socket, one front end at a
time, the device's task, and a clean end on SIGTERM (vhost-user.rst back-end conventions).
"""

from __future__ import annotations

import logging

import trio

from ..unixserver import serve_peers
from ..virtio.device import VirtioDevice
from .backend import VhostUserBackend
from .connection import Connection

log = logging.getLogger(__name__)


async def serve(device: VirtioDevice, *, socket_path: str | None = None, fd: int | None = None,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``device`` until SIGTERM/SIGINT (or, on an inherited connected fd, until the
    front end hangs up). A front end that disconnects may reconnect: it finds the device
    reset and its memory unmapped."""
    backend = VhostUserBackend(device)

    async def serve_one(conn: trio.socket.SocketType) -> None:
        log.info("%s: front end connected", device.name)
        await backend.serve(Connection(conn))
        log.info("%s: front end disconnected", device.name)

    await serve_peers(device.name, socket_path=socket_path, fd=fd, run=device.run,
                      serve_one=serve_one, close=device.close, task_status=task_status)
