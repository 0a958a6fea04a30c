"""virtio-console's ports: the host end of each (chardev's, shared with the UART) and
the state the driver's control messages set.

Terminals never stall the guest: output a pty/tty/stdio reader does not take is dropped
(counted), while files and connected sockets get every byte (the port's transmit queue
waits for them, the loop never does). Output to a socket nobody is connected to is
dropped. Input waits for guest buffers, so a fast sender is paced by the guest.
"""

from __future__ import annotations

import logging

from ...chardev import (
    HostEnd,
    connect_unix,
    listen_unix,
    open_file,
    open_pty,
    open_stdio,
    open_tty,
)
from ...errors import ConfigError
from ..device import Kick
from .options import PortSpec

log = logging.getLogger(__name__)

READ_CHUNK = 4096


class PortBackend:
    """The host side of one port: bytes in and out, and whether a peer is there."""

    def __init__(self, end: HostEnd | None = None) -> None:
        self.end = end if end is not None else HostEnd()
        self.dropped = 0

    @property
    def connected(self) -> bool:
        return self.end.connected

    @property
    def pty_name(self) -> str | None:
        return getattr(self.end, "path", None) if self.end.kind == "pty" else None

    async def receive(self) -> bytes:
        """The next input bytes; waits for input (and, for sockets, for a peer)."""
        return await self.end.read(READ_CHUNK)

    async def send(self, data: memoryview) -> None:
        """Output bytes: all of them, or dropped on a full terminal or without a peer."""
        end = self.end
        while data:
            n = end.write_now(data)
            if n is None:
                return  # nobody takes output
            if not n:
                if end.terminal:
                    self.dropped += len(data)
                    return
                await end.wait_writable()
                continue
            data = data[n:]

    async def serve(self, changed: Kick) -> None:
        """Background work (accepting clients); sets ``changed`` when ``connected`` flips."""
        await self.end.serve(changed.set)

    def close(self) -> None:
        self.end.close()


def open_port(spec: PortSpec) -> PortBackend:
    """Open the host side of a port (ConfigError names the port on failure)."""
    try:
        if spec.backend == "stdio":
            return PortBackend(open_stdio())
        if spec.backend == "tty":
            assert spec.path is not None
            return PortBackend(open_tty(spec.path))
        if spec.backend == "pty":
            end = open_pty(spec.path)
            log.warning("virtio-console: port %s is on %s", spec.name, end.path)
            return PortBackend(end)
        if spec.backend == "file":
            assert spec.path is not None
            return PortBackend(open_file(spec.path, 0o640))
        assert spec.path is not None
        if spec.server:  # a new client takes the port over from the last one
            return PortBackend(listen_unix(spec.path, backlog=4, takeover=True))
        return PortBackend(connect_unix(spec.path))
    except OSError as e:
        what = f"{spec.backend} {spec.path}" if spec.path else spec.backend
        raise ConfigError(f"virtio-console: port {spec.name} ({what}): "
                          f"{e.strerror or e}") from None


class Port:
    """One port as the driver sees it: its queues and what the control queue said."""

    def __init__(self, pid: int, spec: PortSpec, backend: PortBackend) -> None:
        self.id = pid
        self.spec = spec
        self.backend = backend
        self.guest_ready = False
        self.guest_open = False
        self.host_open_sent: bool | None = None

    @property
    def queues(self) -> tuple[int, int]:
        return (0, 1) if self.id == 0 else (2 * self.id + 2, 2 * self.id + 3)
