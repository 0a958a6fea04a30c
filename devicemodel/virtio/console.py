"""virtio-console (virtio 1.2 §5.3) with acrn-dm's port backends and the multiport control queue.

Options, in acrn-dm's syntax (acrn-facts §4.2), one comma-separated entry per port::

    virtio-console,[@]stdio|tty|pty|file|socket:<portname>[=<path>][:server|client][,...]

``@`` marks a console port (the guest's hvc). ``tty`` needs the device path, ``file`` the
output file (output only), ``socket`` a unix socket path (``server``, the default,
listens and serves one client at a time; ``client`` connects at start-up). ``pty``
opens a pseudo-terminal, logs its name and, with ``=<path>``, links it there. At most
one port may use stdio.

Queues: port 0 uses 0 (rx) and 1 (tx), the control queues are 2 (device → driver) and
3 (driver → device), port n ≥ 1 uses 2n+2 and 2n+3. ``max_nr_ports`` is the number of
configured ports. Without VIRTIO_CONSOLE_F_MULTIPORT only port 0 exists.

Terminals never stall the guest: output a pty/tty/stdio reader does not take is dropped
(counted), while files and connected sockets get every byte. Input waits for guest
buffers, so a fast sender is paced by the guest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import termios
import tty
from collections import deque
from dataclasses import dataclass

import trio

from ..errors import ConfigError
from .device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_CONSOLE,
    Kick,
    PciIds,
    VirtioDevice,
)
from .queue import Virtqueue

log = logging.getLogger(__name__)

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1

# control events (§5.3.6.2)
VIRTIO_CONSOLE_DEVICE_READY = 0
VIRTIO_CONSOLE_DEVICE_ADD = 1
VIRTIO_CONSOLE_DEVICE_REMOVE = 2
VIRTIO_CONSOLE_PORT_READY = 3
VIRTIO_CONSOLE_CONSOLE_PORT = 4
VIRTIO_CONSOLE_RESIZE = 5
VIRTIO_CONSOLE_PORT_OPEN = 6
VIRTIO_CONSOLE_PORT_NAME = 7

QUEUE_SIZE = 64  # acrn-dm's VIRTIO_CONSOLE_RINGSZ
MAX_PORTS = 16  # acrn-dm's VIRTIO_CONSOLE_MAXPORTS
CONFIG_SIZE = 12  # cols, rows, max_nr_ports, emerg_wr
CTRL_RX, CTRL_TX = 2, 3
READ_CHUNK = 4096
MAX_PENDING_CONTROL = 4 * MAX_PORTS + 16
BACKENDS = ("stdio", "tty", "pty", "file", "socket")

_CTRL = struct.Struct("<IHH")  # id, event, value


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


# -- host-side backends --------------------------------------------------------------


class PortBackend:
    """The host side of one port: bytes in and out, and whether a peer is there."""

    connected = True

    async def receive(self) -> bytes:
        """The next input bytes; waits for input (and, for sockets, for a peer)."""
        await trio.sleep_forever()
        return b""

    async def send(self, data: memoryview) -> None:
        """Output bytes; dropped if nobody is there to take them."""

    async def serve(self, changed: Kick) -> None:
        """Background work (accepting clients); sets ``changed`` when ``connected`` flips."""
        await trio.sleep_forever()

    def close(self) -> None:
        pass


class FdBackend(PortBackend):
    """stdio, tty, pty and file ports: non-blocking fds; terminals drop what they can't take."""

    def __init__(self, rfd: int | None, wfd: int, *, drop_when_full: bool,
                 owned: tuple[int, ...] = (),
                 restore: tuple[int, list | None, bool] | None = None,
                 link: str | None = None) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.drop_when_full = drop_when_full
        self.owned = owned
        self.restore = restore
        self.link = link
        self.dropped = 0

    async def receive(self) -> bytes:
        if self.rfd is None:
            await trio.sleep_forever()
        assert self.rfd is not None
        while True:
            await trio.lowlevel.wait_readable(self.rfd)
            try:
                data = os.read(self.rfd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                data = b""  # pty without a reader on the other side
            if data:
                return data
            self.rfd = None  # end of input (e.g. stdin is /dev/null): stop reading
            await trio.sleep_forever()

    async def send(self, data: memoryview) -> None:
        while data:
            try:
                n = os.write(self.wfd, data)
            except BlockingIOError:
                if self.drop_when_full:
                    self.dropped += len(data)
                    return
                await trio.lowlevel.wait_writable(self.wfd)
                continue
            data = data[n:]

    def close(self) -> None:
        if self.restore is not None:
            fd, attrs, was_blocking = self.restore
            with contextlib.suppress(OSError):
                if attrs is not None:
                    termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
                os.set_blocking(fd, was_blocking)
            self.restore = None
        for fd in self.owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.owned = ()
        if self.link is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.link)
            self.link = None


class SocketBackend(PortBackend):
    """A unix stream socket: a server with one client at a time, or a client."""

    def __init__(self, path: str, server: bool) -> None:
        self.path = path
        self.server = server
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self._changed: Kick | None = None
        self._have_conn = trio.Event()
        if server:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.bind(path)
                s.listen(4)
            except OSError as e:
                s.close()
                raise ConfigError(f"virtio-console: socket {path}: {e.strerror}") from None
            s.setblocking(False)
            self.listener = s
        else:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                c.connect(path)
            except OSError as e:
                c.close()
                raise ConfigError(f"virtio-console: socket {path}: {e.strerror}") from None
            c.setblocking(False)
            self._attach(c)

    @property
    def connected(self) -> bool:  # type: ignore[override]
        return self.conn is not None

    def _attach(self, conn: socket.socket) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = conn
        self._have_conn.set()
        if self._changed is not None:
            self._changed.set()

    def _detach(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self._have_conn = trio.Event()
            if self._changed is not None:
                self._changed.set()

    async def serve(self, changed: Kick) -> None:
        self._changed = changed
        if self.listener is None:
            await trio.sleep_forever()
        assert self.listener is not None
        while True:
            await trio.lowlevel.wait_readable(self.listener)
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            self._attach(conn)

    async def receive(self) -> bytes:
        while True:
            conn = self.conn
            if conn is None:
                await self._have_conn.wait()
                continue
            await trio.lowlevel.wait_readable(conn)
            if conn is not self.conn:
                continue
            try:
                data = conn.recv(READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                return data
            self._detach()
            if not self.server:
                await trio.sleep_forever()  # a client does not reconnect

    async def send(self, data: memoryview) -> None:
        while data and self.conn is not None:
            conn = self.conn
            try:
                n = conn.send(data)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(conn)
                continue
            except OSError:
                self._detach()
                return
            data = data[n:]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _raw_terminal(fd: int) -> tuple[int, list | None, bool]:
    """Make ``fd`` a raw, non-blocking input; returns what ``close`` needs to restore it."""
    was_blocking = os.get_blocking(fd)
    attrs = None
    if os.isatty(fd):
        attrs = termios.tcgetattr(fd)
        tty.setraw(fd, termios.TCSANOW)
    os.set_blocking(fd, False)
    return fd, attrs, was_blocking


def open_backend(spec: PortSpec) -> PortBackend:
    """Open the host side of a port (ConfigError names the port on failure)."""
    try:
        if spec.backend == "stdio":
            # stdout stays blocking, as in acrn-dm: other code in the process prints too
            return FdBackend(0, 1, drop_when_full=True, restore=_raw_terminal(0))
        if spec.backend == "tty":
            assert spec.path is not None
            fd = os.open(spec.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            if os.isatty(fd):
                tty.setraw(fd, termios.TCSANOW)
            return FdBackend(fd, fd, drop_when_full=True, owned=(fd,))
        if spec.backend == "pty":
            master, slave = os.openpty()
            tty.setraw(slave, termios.TCSANOW)
            os.set_blocking(master, False)
            os.set_inheritable(master, False)
            os.set_inheritable(slave, False)
            name = os.ttyname(slave)
            link = None
            if spec.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spec.path)
                os.symlink(name, spec.path)
                link = spec.path
            log.warning("virtio-console: port %s is on %s", spec.name, name)
            # keeping the slave open stops EIO on the master while no one is attached
            be = FdBackend(master, master, drop_when_full=True, owned=(master, slave), link=link)
            be.pty_name = name  # type: ignore[attr-defined]
            return be
        if spec.backend == "file":
            assert spec.path is not None
            fd = os.open(spec.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            return FdBackend(None, fd, drop_when_full=False, owned=(fd,))
        assert spec.path is not None
        return SocketBackend(spec.path, spec.server)
    except OSError as e:
        raise ConfigError(f"virtio-console: port {spec.name} ({spec.backend}): "
                          f"{e.strerror or e}") from None


# -- the device ------------------------------------------------------------------------


class Port:
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


def _copy_into(views: list[memoryview], data: memoryview) -> int:
    done = 0
    for v in views:
        n = min(len(v), len(data) - done)
        v[:n] = data[done : done + n]
        done += n
        if done == len(data):
            break
    return done


class VirtioConsole(VirtioDevice):
    device_type = VIRTIO_ID_CONSOLE
    pci_ids = PciIds(legacy_device_id=0x1003, device_type=VIRTIO_ID_CONSOLE,
                     class_code=0x078000)
    name = "virtio-console"

    def __init__(self, opts: ConsoleOptions,
                 backends: list[PortBackend] | None = None) -> None:
        n = len(opts.ports)
        super().__init__(2 * n + 2, QUEUE_SIZE, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
                         | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_CONSOLE_F_MULTIPORT,
                         CONFIG_SIZE)
        struct.pack_into("<HHII", self.config, 0, 0, 0, n, 0)
        opened: list[PortBackend] = []
        try:
            for spec in opts.ports if backends is None else []:
                opened.append(open_backend(spec))
        except BaseException:
            for b in opened:
                b.close()
            raise
        self.ports = [Port(i, s, b) for i, (s, b) in
                      enumerate(zip(opts.ports, backends or opened, strict=True))]
        self._ctrl_out: deque[bytes] = deque()
        self._ctrl_kick = Kick()

    def close(self) -> None:
        for p in self.ports:
            p.backend.close()

    def on_reset(self) -> None:
        self._ctrl_out.clear()
        for p in self.ports:
            p.guest_ready = p.guest_open = False
            p.host_open_sent = None

    @property
    def multiport(self) -> bool:
        return bool(self.features & VIRTIO_CONSOLE_F_MULTIPORT)

    def start_workers(self, nursery: trio.Nursery) -> None:
        qs = self.queues
        self._ctrl_out.clear()
        self._ctrl_kick = Kick()
        ports = self.ports if self.multiport else self.ports[:1]
        for p in ports:
            rx, tx = (qs[i] for i in p.queues)
            if rx.ready:
                nursery.start_soon(self._port_rx, p, rx)
            if tx.ready:
                nursery.start_soon(self._port_tx, p, tx)
            nursery.start_soon(self._watch_host, p)
        if self.multiport:
            if qs[CTRL_RX].ready:
                nursery.start_soon(self._ctrl_rx, qs[CTRL_RX])
            if qs[CTRL_TX].ready:
                nursery.start_soon(self._ctrl_tx, qs[CTRL_TX])

    # data ------------------------------------------------------------------------------

    async def _port_rx(self, port: Port, q: Virtqueue) -> None:
        while True:
            data = memoryview(await port.backend.receive())
            while data:
                chain = q.pop()
                if chain is None:
                    await self.wait_kick(q)
                    continue
                n = _copy_into(chain.writable, data)
                q.add_used(chain.head, n)
                data = data[n:]
            self.signal(q)

    async def _port_tx(self, port: Port, q: Virtqueue) -> None:
        while True:
            chain = q.pop()
            if chain is None:
                await self.wait_kick(q)
                continue
            for v in chain.readable:
                await port.backend.send(v)
            q.add_used(chain.head, 0)
            self.signal(q)

    async def _watch_host(self, port: Port) -> None:
        changed = Kick()
        async with trio.open_nursery() as n:
            n.start_soon(port.backend.serve, changed)
            while True:
                await changed.wait()
                self._send_host_open(port)

    # control ---------------------------------------------------------------------------

    def _control(self, pid: int, event: int, value: int, extra: bytes = b"") -> None:
        if len(self._ctrl_out) >= MAX_PENDING_CONTROL:
            self.glog.warning("%s: driver does not read control messages; dropping", self.name)
            return  # a driver that asks and never reads must not grow our memory
        self._ctrl_out.append(_CTRL.pack(pid, event, value) + extra)
        self._ctrl_kick.set()

    def _send_host_open(self, port: Port) -> None:
        if not self.multiport or not port.guest_ready:
            return
        state = port.backend.connected
        if state != port.host_open_sent:
            port.host_open_sent = state
            self._control(port.id, VIRTIO_CONSOLE_PORT_OPEN, int(state))

    async def _ctrl_rx(self, q: Virtqueue) -> None:
        while True:
            if not self._ctrl_out:
                await self._ctrl_kick.wait()
                continue
            chain = q.pop()
            if chain is None:
                await self.wait_kick(q)
                continue
            msg = self._ctrl_out.popleft()
            n = _copy_into(chain.writable, memoryview(msg))
            q.add_used(chain.head, n)
            self.signal(q)

    async def _ctrl_tx(self, q: Virtqueue) -> None:
        while True:
            chain = q.pop()
            if chain is None:
                await self.wait_kick(q)
                continue
            msg = b"".join(bytes(v) for v in chain.readable[:4])[: _CTRL.size]
            q.add_used(chain.head, 0)
            self.signal(q)
            if len(msg) < _CTRL.size:
                self.glog.warning("%s: short control message", self.name)
                continue
            self._handle_control(*_CTRL.unpack(msg))

    def _handle_control(self, pid: int, event: int, value: int) -> None:
        if event == VIRTIO_CONSOLE_DEVICE_READY:
            if value == 1:
                for p in self.ports:
                    self._control(p.id, VIRTIO_CONSOLE_DEVICE_ADD, 1)
            return
        if not 0 <= pid < len(self.ports):
            self.glog.warning("%s: control event %d for unknown port %d", self.name, event, pid)
            return
        port = self.ports[pid]
        if event == VIRTIO_CONSOLE_PORT_READY:
            if value != 1:
                return
            port.guest_ready = True
            if port.spec.console:
                self._control(pid, VIRTIO_CONSOLE_CONSOLE_PORT, 1)
            self._control(pid, VIRTIO_CONSOLE_PORT_NAME, 1, port.spec.name.encode())
            port.host_open_sent = None
            self._send_host_open(port)
        elif event == VIRTIO_CONSOLE_PORT_OPEN:
            port.guest_open = bool(value)


def create(options: str, slot: int = 0, func: int = 0) -> VirtioConsole:
    """The ``-s <slot>,virtio-console,<options>`` device."""
    return VirtioConsole(parse_console_options(options))
