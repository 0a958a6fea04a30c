"""virtio-console's options, in acrn-dm's syntax (acrn-facts §4.2), one comma-separated
entry per port::

    virtio-console,[@]stdio|tty|pty|file|socket:<portname>[=<path>][:server|client][,...]

``@`` marks a console port (the guest's hvc). ``tty`` needs the device path, ``file`` the
output file (output only), ``socket`` a unix socket path (``server``, the default,
listens and serves one client at a time; ``client`` connects at start-up). ``pty``
opens a pseudo-terminal, logs its name and, with ``=<path>``, links it there. At most
one port may use stdio.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError

MAX_PORTS = 16  # acrn-dm's VIRTIO_CONSOLE_MAXPORTS
BACKENDS = ("stdio", "tty", "pty", "file", "socket")


@dataclass(frozen=True)
class PortSpec:
    backend: str
    name: str
    path: str | None = None
    console: bool = False
    server: bool = True


@dataclass(frozen=True)
class ConsoleOptions:
    ports: tuple[PortSpec, ...]


def parse_console_options(text: str) -> ConsoleOptions:
    ports: list[PortSpec] = []
    for entry in text.split(",") if text else []:
        console = entry.startswith("@")
        body = entry[1:] if console else entry
        backend, colon, rest = body.partition(":")
        if backend.lower() not in BACKENDS:
            raise ConfigError(f"virtio-console: {entry!r}: backend must be one of "
                              f"{', '.join(BACKENDS)}")
        backend = backend.lower()
        if not colon or not rest:
            raise ConfigError(f"virtio-console: {entry!r}: a port name is required, "
                              f"e.g. {backend}:port0")
        server = True
        if backend == "socket":
            name_path, _, mode = rest.partition(":")
            if mode not in ("", "server", "client"):
                raise ConfigError(f"virtio-console: {entry!r}: socket mode must be "
                                  "server or client")
            server = mode != "client"
        else:
            name_path = rest
        name, eq, path = name_path.partition("=")
        if not name:
            raise ConfigError(f"virtio-console: {entry!r}: empty port name")
        if backend in ("tty", "file", "socket") and not path:
            raise ConfigError(f"virtio-console: {entry!r}: {backend} needs =<path>")
        ports.append(PortSpec(backend, name, path or None, console, server))
    if not ports:
        raise ConfigError("virtio-console: give at least one port, e.g. @stdio:con0")
    if len(ports) > MAX_PORTS:
        raise ConfigError(f"virtio-console: at most {MAX_PORTS} ports")
    if sum(p.backend == "stdio" for p in ports) > 1:
        raise ConfigError("virtio-console: only one port may use stdio")
    names = [p.name for p in ports]
    if len(set(names)) != len(names):
        raise ConfigError("virtio-console: port names must be unique")
    return ConsoleOptions(tuple(ports))
