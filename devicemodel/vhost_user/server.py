"""The back end's process lifetime: a listening (or inherited) socket, one front end at a
time, the device's task, and a clean end on SIGTERM (vhost-user.rst back-end conventions);
SIGUSR2 logs the rings' state.
"""

from __future__ import annotations

import logging
import signal
import threading

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

    async with trio.open_nursery() as nursery:
        if threading.current_thread() is threading.main_thread():  # (signals need it)
            nursery.start_soon(_report_on_signal, backend)
        await serve_peers(device.name, socket_path=socket_path, fd=fd, run=device.run,
                          serve_one=serve_one, close=device.close, task_status=task_status)
        nursery.cancel_scope.cancel()


async def _report_on_signal(backend: VhostUserBackend) -> None:
    """SIGUSR2 logs every ring's state (``ring_report``): a stalled guest can then be
    told apart from a lost kick or interrupt without stopping anything."""
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        async for _ in signals:
            for line in backend.ring_report():
                log.info("%s", line)
