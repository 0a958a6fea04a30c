"""Host ends of a UART: ``stdio``, ``pty``, ``file:<path>``, ``socket:<path>`` (a Unix
socket we listen on), ``tcp:<port>`` and a tty path (acrn-dm's two), or nothing.

The ends are chardev's (shared with virtio-console); this is the UART's side of them, as
trio tasks: a reader that takes from the host only as many bytes as the UART's receive
FIFO has room for (so input waits in the host buffer instead of being overrun), and a
writer that drains a bounded output buffer without ever blocking the event loop. Output
beyond the bound is dropped and counted: a guest that prints faster than anyone reads
must not grow our memory. A socket serves one client at a time; output made while
nobody is connected waits in the buffer. On stdio, Ctrl-A x powers the VM off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

from ..chardev import HostEnd, listen_tcp, listen_unix, open_file, open_pty, open_stdio, open_tty
from ..errors import ConfigError
from ..loopgate import on_loop

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 64 * 1024
_CHUNK = 4096
CTRL_A = 0x01
FLUSH_S = 0.5  # how long power-off waits for a slow reader to take the last output


class UartBackend:
    """A UART's host end: its bounded output buffer and the reader/writer tasks."""

    def __init__(self, end: HostEnd | None = None, limit: int = OUTPUT_LIMIT) -> None:
        self.end = end if end is not None else HostEnd()
        self.limit = limit
        self.dropped = 0
        self.written = 0
        self._out = bytearray()
        self._out_event = trio.Event()
        self._space_event = trio.Event()
        self._room: Callable[[], int] = lambda: 0
        self._deliver: Callable[[bytes], int] = lambda data: 0
        self._ctrl_a = False
        self.on_quit: Callable[[], None] | None = None

    @property
    def kind(self) -> str:
        return self.end.kind

    @property
    def description(self) -> str:
        return self.end.description

    @property
    def path(self) -> str | None:
        """The pty's or tty's device path."""
        return getattr(self.end, "path", None)

    # --- wiring to the UART --------------------------------------------------------------
    def connect(self, room: Callable[[], int], deliver: Callable[[bytes], int]) -> None:
        self._room = room
        self._deliver = deliver

    def space_changed(self) -> None:
        """The guest took bytes from the FIFO (a port handler: on the loop, or on a
        request thread behind the loop gate: the reader task is woken on the loop)."""
        if not self._space_event.is_set():
            on_loop(self._space_event.set)

    def send(self, byte: int) -> None:
        """One byte from the guest (a port handler, on the loop or behind the loop gate:
        never blocks; the writer task is woken on the loop)."""
        if len(self._out) >= self.limit:
            self.dropped += 1
            return
        self._out.append(byte)
        if not self._out_event.is_set():
            on_loop(self._out_event.set)

    # --- tasks ----------------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.end.serve, lambda: self._out_event.set())
            nursery.start_soon(self._writer)
            nursery.start_soon(self._reader)

    async def _reader(self) -> None:
        end = self.end
        while True:
            if self._room() <= 0:
                self._space_event = trio.Event()
                if self._room() <= 0:
                    await self._space_event.wait()
                continue
            await end.wait_readable()
            room = self._room()  # the guest may have changed FIFO mode meanwhile
            if room <= 0:
                continue
            data = end.read_now(room)
            if data:
                self._take(data)

    def _take(self, data: bytes) -> None:
        if self.end.kind == "stdio":
            data = self._ctrl_a_x(data)
        if data:
            self._deliver(data)

    def _ctrl_a_x(self, data: bytes) -> bytes:
        """Ctrl-A x quits, as in acrn-dm; Ctrl-A anything else passes that byte on."""
        keep = bytearray()
        for b in data:
            if self._ctrl_a:
                self._ctrl_a = False
                if b == ord("x") and self.on_quit is not None:
                    self.on_quit()
                    return b""
                keep.append(b)
            elif b == CTRL_A:
                self._ctrl_a = True
            else:
                keep.append(b)
        return bytes(keep)

    async def _writer(self) -> None:
        end = self.end
        while True:
            if not self._out:
                self._out_event = trio.Event()
                await self._out_event.wait()
                continue
            await end.wait_writable()
            n = end.write_now(self._out[:_CHUNK])
            if n:
                self.written += n
                del self._out[:n]

    # --- teardown -------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is buffered, waiting at most FLUSH_S (used at power-off, so the
        guest's last words reach the log)."""
        if self._out:
            n = self.end.drain(self._out, FLUSH_S)
            self.written += n
            del self._out[:n]

    def close(self) -> None:
        self.flush()
        self.end.close()


class NullBackend(UartBackend):
    """``com1`` without a backend: the UART exists, its output goes nowhere."""

    def send(self, byte: int) -> None:
        self.written += 1


def parse_backend(spec: str) -> tuple[str, str]:
    """An ``-l comN,<spec>`` backend as (kind, argument), opening nothing: kind is one of
    null, stdio, pty, file, socket, tcp, tty. ConfigError (one line) for a bad spec; the
    validator (vmcheck.py) calls this, ``open_backend`` then opens what it names."""
    if spec in ("", "stdio", "pty"):
        return (spec or "null"), ""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("file", "socket"):
        if not rest:
            raise ConfigError(f"-l {kind}:<path>: the path is missing")
        return kind, rest
    if sep and kind == "tcp":
        try:
            port = int(rest, 10)
        except ValueError:
            port = -1
        if not 0 < port < 65536:
            raise ConfigError(f"-l tcp:{rest}: expected a TCP port number 1..65535")
        return kind, str(port)
    if spec.startswith("/"):
        return "tty", spec
    raise ConfigError(
        f"-l backend {spec!r}: use stdio, pty, file:<path>, socket:<path>, tcp:<port> "
        "or a tty path"
    )


def open_backend(spec: str, limit: int = OUTPUT_LIMIT) -> UartBackend:
    """The backend for an ``-l comN,<spec>`` option."""
    kind, arg = parse_backend(spec)
    if kind == "null":
        return NullBackend(limit=limit)
    if kind == "stdio":
        return UartBackend(open_stdio(), limit)
    if kind == "pty":
        end = open_pty()
        log.info("UART connected to %s", end.path)
        return UartBackend(end, limit)
    if kind == "file":
        try:
            return UartBackend(open_file(arg), limit)
        except OSError as e:
            raise ConfigError(f"-l file:{arg}: cannot open: {e.strerror}") from None
    if kind == "socket":
        try:
            return UartBackend(listen_unix(arg), limit)
        except OSError as e:
            raise ConfigError(f"-l socket:{arg}: cannot listen: {e.strerror}") from None
    if kind == "tcp":
        try:
            return UartBackend(listen_tcp(int(arg)), limit)
        except OSError as e:
            raise ConfigError(f"-l tcp:{arg}: cannot listen: {e.strerror}") from None
    return UartBackend(_open_tty(arg), limit)


def _open_tty(path: str) -> HostEnd:
    try:
        end = open_tty(path)
    except OSError as e:
        raise ConfigError(f"-l {path}: cannot open: {e.strerror}") from None
    if end.out_fd is None or not os.isatty(end.out_fd):
        end.close()
        raise ConfigError(f"-l {path}: not a tty; use file:{path} for a log file")
    return end
