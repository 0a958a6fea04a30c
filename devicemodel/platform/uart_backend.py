"""Host ends of a UART: ``stdio``, ``pty``, ``file:<path>``, ``socket:<path>`` (a Unix
socket we listen on), ``tcp:<port>`` and a tty path (acrn-dm's two), or nothing.

Each backend runs as trio tasks: a reader that takes from the host only as many bytes as
the UART's receive FIFO has room for (so input waits in the host buffer instead of being
overrun), and a writer that drains a bounded output buffer without ever blocking the
event loop.  Output beyond the bound is dropped and counted: a guest that prints faster
than anyone reads must not grow our memory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import termios
import tty
from collections.abc import Callable

import trio

from ..errors import ConfigError

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 64 * 1024
_CHUNK = 4096
CTRL_A = 0x01

_stdio_owner: object | None = None


class UartBackend:
    """Common machinery: the output buffer, the reader/writer loops over fds."""

    kind = "none"

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.dropped = 0
        self.written = 0
        self._out = bytearray()
        self._out_event = trio.Event()
        self._space_event = trio.Event()
        self.in_fd: int | None = None
        self.out_fd: int | None = None
        self._out_regular = False
        self._room: Callable[[], int] = lambda: 0
        self._deliver: Callable[[bytes], int] = lambda data: 0
        self.on_quit: Callable[[], None] | None = None
        self.description = self.kind

    # --- wiring to the UART --------------------------------------------------------------
    def connect(self, room: Callable[[], int], deliver: Callable[[bytes], int]) -> None:
        self._room = room
        self._deliver = deliver

    def space_changed(self) -> None:
        self._space_event.set()

    def send(self, byte: int) -> None:
        """One byte from the guest (called from a port handler: never blocks)."""
        if len(self._out) >= self.limit:
            self.dropped += 1
            return
        self._out.append(byte)
        self._out_event.set()

    # --- tasks ----------------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            nursery.start_soon(self._reader)

    async def _reader(self) -> None:
        while True:
            fd = self.in_fd
            if fd is None:
                return
            room = self._room()
            if room <= 0:
                self._space_event = trio.Event()
                if self._room() <= 0:
                    await self._space_event.wait()
                continue
            try:
                await trio.lowlevel.wait_readable(fd)
                room = self._room()  # the guest may have changed FIFO mode meanwhile
                if room <= 0 or fd != self.in_fd:
                    continue
                data = os.read(fd, room)
            except BlockingIOError:
                continue
            except (OSError, ValueError) as e:
                if not await self._input_lost(fd, e):
                    return
                continue
            if not data:
                if not await self._input_lost(fd, None):
                    return
                continue
            self._take(data)

    def _take(self, data: bytes) -> None:
        self._deliver(data)

    async def _input_lost(self, fd: int, error: Exception | None) -> bool:
        """The input fd hit EOF or an error; True to keep reading (a new fd may come)."""
        if error is not None:
            log.debug("uart %s: input stopped: %s", self.description, error)
        self.in_fd = None
        return False

    async def _writer(self) -> None:
        while True:
            if not self._out or self.out_fd is None:
                self._out_event = trio.Event()
                await self._out_event.wait()
                continue
            fd = self.out_fd
            try:
                if not self._out_regular:
                    await trio.lowlevel.wait_writable(fd)
                n = os.write(fd, self._out[:_CHUNK])
            except BlockingIOError:
                continue
            except (OSError, ValueError) as e:
                self._output_lost(fd, e)
                continue
            self.written += n
            del self._out[:n]

    def _output_lost(self, fd: int, error: Exception) -> None:
        log.warning("uart %s: output stopped: %s", self.description, error)
        self.out_fd = None
        self._out.clear()

    # --- teardown -------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is buffered without waiting (used at power-off, so the guest's last
        words reach the log)."""
        fd = self.out_fd
        tries = 0
        while self._out and fd is not None and tries < 64:
            tries += 1
            try:
                n = os.write(fd, self._out[:_CHUNK])
            except BlockingIOError:
                _wait_fd_writable(fd, 0.05)
                continue
            except OSError:
                break
            self.written += n
            del self._out[:n]

    def close(self) -> None:
        self.flush()


def _wait_fd_writable(fd: int, timeout: float) -> None:
    import select

    with contextlib.suppress(OSError, ValueError):
        select.select([], [fd], [], timeout)


def _pollable(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


class NullBackend(UartBackend):
    """``com1`` without a backend: the UART exists, its output goes nowhere."""

    kind = "none"

    def send(self, byte: int) -> None:
        self.written += 1


class StdioBackend(UartBackend):
    """The process's stdin/stdout.  A terminal is put in raw mode (restored on close);
    Ctrl-A x powers the VM off, as in acrn-dm."""

    kind = "stdio"

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        global _stdio_owner
        if _stdio_owner is not None:
            raise ConfigError("stdio is already used by another device; give one of them "
                              "a pty, file: or socket: backend")
        super().__init__(limit)
        _stdio_owner = self
        self._saved_tty: list | None = None
        self._ctrl_a = False
        self.out_fd = 1
        self._out_regular = not _pollable(1)
        if _pollable(0):
            self.in_fd = 0
            if os.isatty(0):
                try:
                    self._saved_tty = termios.tcgetattr(0)
                    tty.setraw(0, termios.TCSANOW)
                except termios.error:
                    self._saved_tty = None

    def _take(self, data: bytes) -> None:
        keep = bytearray()
        for b in data:
            if self._ctrl_a:
                self._ctrl_a = False
                if b == ord("x") and self.on_quit is not None:
                    self.on_quit()
                    return
                keep.append(b)
            elif b == CTRL_A:
                self._ctrl_a = True
            else:
                keep.append(b)
        if keep:
            self._deliver(bytes(keep))

    def close(self) -> None:
        global _stdio_owner
        self.flush()
        if self._saved_tty is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(0, termios.TCSANOW, self._saved_tty)
            self._saved_tty = None
        if _stdio_owner is self:
            _stdio_owner = None


class FileBackend(UartBackend):
    """``file:<path>``: output appended to a file; no input."""

    kind = "file"

    def __init__(self, path: str, limit: int = OUTPUT_LIMIT) -> None:
        super().__init__(limit)
        try:
            self.out_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                  0o644)
        except OSError as e:
            raise ConfigError(f"-l file:{path}: cannot open: {e.strerror}") from None
        self._out_regular = not _pollable(self.out_fd)
        self.path = path
        self.description = f"file:{path}"

    def close(self) -> None:
        self.flush()
        if self.out_fd is not None:
            os.close(self.out_fd)
            self.out_fd = None


class TtyBackend(UartBackend):
    """A pty we create (``pty``) or a tty device path (acrn-dm's tty backend)."""

    kind = "pty"

    def __init__(self, path: str | None = None, limit: int = OUTPUT_LIMIT) -> None:
        super().__init__(limit)
        self._slave: int | None = None
        if path is None:
            master, slave = os.openpty()
            os.set_inheritable(master, False)
            os.set_inheritable(slave, False)
            tty.setraw(slave, termios.TCSANOW)
            # we keep the slave open so the master never reads EIO/HUP while nobody is
            # attached; output then waits in the pty until its buffer is full
            self._slave = slave
            fd = master
            self.path = os.ttyname(slave)
            self.description = f"pty {self.path}"
            log.info("UART connected to %s", self.path)
        else:
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise ConfigError(f"-l {path}: cannot open: {e.strerror}") from None
            if not os.isatty(fd):
                os.close(fd)
                raise ConfigError(f"-l {path}: not a tty; use file:{path} for a log file")
            with contextlib.suppress(termios.error):
                tty.setraw(fd, termios.TCSANOW)
            self.kind = "tty"
            self.path = path
            self.description = path
        os.set_blocking(fd, False)
        self.in_fd = self.out_fd = self._fd = fd

    def close(self) -> None:
        self.flush()
        for fd in (self._fd, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._slave = None
        self.in_fd = self.out_fd = None


class SocketBackend(UartBackend):
    """``socket:<path>`` (Unix) or ``tcp:<port>``: we listen; one client at a time gets
    the console.  Output made while nobody is connected waits in the bounded buffer."""

    kind = "socket"

    def __init__(self, address: str | int, limit: int = OUTPUT_LIMIT) -> None:
        super().__init__(limit)
        self._path: str | None = None
        if isinstance(address, int):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            target: object = ("", address)
            self.description = f"tcp:{address}"
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(address).st_mode):
                    os.unlink(address)  # a stale socket from an earlier run
            target = address
            self._path = address
            self.description = f"socket:{address}"
        try:
            sock.bind(target)
            sock.listen(1)
        except OSError as e:
            sock.close()
            raise ConfigError(f"-l {self.description}: cannot listen: {e.strerror}") from None
        sock.setblocking(False)
        self._listener = sock
        self._client: socket.socket | None = None
        self._client_gone = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            while True:
                await trio.lowlevel.wait_readable(self._listener)
                try:
                    client, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    log.warning("uart %s: accept failed: %s", self.description, e)
                    return
                client.setblocking(False)
                self._client = client
                self.in_fd = self.out_fd = client.fileno()
                self._out_event.set()
                self._client_gone = trio.Event()
                await self._reader()
                self._drop_client()

    async def _input_lost(self, fd: int, error: Exception | None) -> bool:
        return False  # the client hung up: back to accepting

    def _output_lost(self, fd: int, error: Exception) -> None:
        if error is not None and getattr(error, "errno", None) not in (
            errno.EPIPE, errno.ECONNRESET, errno.EBADF
        ):
            log.warning("uart %s: send failed: %s", self.description, error)
        self.out_fd = None  # the reader sees the hang-up and drops the client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
        self.in_fd = self.out_fd = None

    def close(self) -> None:
        if self._client is not None:
            self._client.setblocking(True)
            self._client.settimeout(0.5)
            with contextlib.suppress(OSError):
                self._client.sendall(bytes(self._out))
            self._out.clear()
        self._drop_client()
        self._listener.close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)


def open_backend(spec: str, limit: int = OUTPUT_LIMIT) -> UartBackend:
    """The backend for an ``-l comN,<spec>`` option."""
    if spec == "":
        return NullBackend(limit)
    if spec == "stdio":
        return StdioBackend(limit)
    if spec == "pty":
        return TtyBackend(None, limit)
    kind, sep, rest = spec.partition(":")
    if sep and kind == "file":
        if not rest:
            raise ConfigError("-l file:<path>: the path is missing")
        return FileBackend(rest, limit)
    if sep and kind == "socket":
        if not rest:
            raise ConfigError("-l socket:<path>: the path is missing")
        return SocketBackend(rest, limit)
    if sep and kind == "tcp":
        try:
            port = int(rest, 10)
        except ValueError:
            port = -1
        if not 0 < port < 65536:
            raise ConfigError(f"-l tcp:{rest}: expected a TCP port number 1..65535")
        return SocketBackend(port, limit)
    if spec.startswith("/"):
        return TtyBackend(spec, limit)
    raise ConfigError(
        f"-l backend {spec!r}: use stdio, pty, file:<path>, socket:<path>, tcp:<port> "
        "or a tty path"
    )
