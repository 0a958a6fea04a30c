"""The back end's process lifetime: a listening (or inherited) socket, one front end at a
time, the device's task, and a clean end on SIGTERM (vhost-user.rst back-end conventions).
"""

from __future__ import annotations

import logging
import os
import signal
import socket as pysocket
import stat
from contextlib import suppress

import trio

from ..virtio.device import VirtioDevice
from .backend import VhostUserBackend
from .connection import Connection

log = logging.getLogger(__name__)


def _is_listening(sock: trio.socket.SocketType) -> bool:
    return bool(sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_ACCEPTCONN))


async def listen_unix(path: str) -> trio.socket.SocketType:
    """A listening socket at ``path``; a stale socket file left by a dead back end is replaced."""
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


async def serve(device: VirtioDevice, *, socket_path: str | None = None, fd: int | None = None,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``device`` until SIGTERM/SIGINT (or, on an inherited connected fd, until the
    front end hangs up). A front end that disconnects may reconnect: it finds the device
    reset and its memory unmapped."""
    if (socket_path is None) == (fd is None):
        raise ValueError("give exactly one of socket_path and fd")
    if fd is not None:
        sock = trio.socket.fromfd(fd, pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        os.close(fd)
    else:
        assert socket_path is not None
        sock = await listen_unix(socket_path)
    backend = VhostUserBackend(device)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("%s: %s, exiting", device.name, signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                await nursery.start(device.run)
                task_status.started()
                if _is_listening(sock):
                    while True:
                        conn, _ = await sock.accept()
                        log.info("%s: front end connected", device.name)
                        try:
                            await backend.serve(Connection(conn))
                        finally:
                            conn.close()
                        log.info("%s: front end disconnected", device.name)
                else:
                    await backend.serve(Connection(sock))
                    nursery.cancel_scope.cancel()
    finally:
        sock.close()
        device.close()
        if socket_path is not None:
            with suppress(OSError):
                os.unlink(socket_path)
