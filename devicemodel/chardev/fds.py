"""Host ends on file descriptors: the process's stdio, a tty, a pty we create, a file.

Our own descriptors are non-blocking. stdin and stdout are shared with the rest of the
process (the logger writes to stderr, often the same terminal), so they keep their mode
and are used only once ``poll`` says they are ready, stdout a pipe buffer's worth at a
time: a reader that never reads cannot block the loop. Input is taken only from what
can be polled (a terminal, pipe or socket; never a regular file or /dev/null). A terminal
we put in raw mode is restored when the end closes; only one end may hold stdio.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import stat
import termios
import tty

import trio

from ..errors import ConfigError
from .base import HostEnd

log = logging.getLogger(__name__)

PIPE_BUF = select.PIPE_BUF  # a write this small to a ready pipe or terminal never blocks

_stdio_owner: object | None = None


def pollable(fd: int) -> bool:
    """Whether ``fd`` can be waited on: a pipe, socket or terminal."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


def _ready(fd: int, write: bool) -> bool:
    try:
        r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(w if write else r)


class FdEnd(HostEnd):
    """Input and output on descriptors (the same one for a terminal; either may be
    absent), with what ``close`` must undo."""

    def __init__(self, kind: str, description: str, in_fd: int | None, out_fd: int | None,
                 *, shared: bool = False, owned: tuple[int, ...] = (),
                 saved_tty: list | None = None, link: str | None = None,
                 path: str | None = None) -> None:
        super().__init__(description)
        self.kind = kind
        self.path = path  # a pty's or tty's device path
        self.in_fd = in_fd if in_fd is not None and pollable(in_fd) else None
        self.out_fd = out_fd
        self._out_pollable = out_fd is not None and pollable(out_fd)
        self._shared = shared  # stdio: blocking, shared with the process
        self._owned = owned
        self._saved_tty = saved_tty  # stdin's terminal mode before raw
        self._link = link

    async def wait_readable(self) -> None:
        fd = self.in_fd
        if fd is None:
            await trio.sleep_forever()
        assert fd is not None
        await trio.lowlevel.wait_readable(fd)

    def read_now(self, limit: int) -> bytes | None:
        fd = self.in_fd
        if fd is None or (self._shared and not _ready(fd, False)):
            return None
        try:
            data = os.read(fd, limit)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:  # e.g. EIO: a pty whose other side is gone
            return self._input_lost(e)
        return data if data else self._input_lost(None)

    def _input_lost(self, error: OSError | None) -> None:
        log.debug("%s: input stopped: %s", self.description, error or "end of file")
        self.in_fd = None

    async def wait_writable(self) -> None:
        fd = self.out_fd
        if fd is None:
            await trio.sleep_forever()
        assert fd is not None
        if self._out_pollable:
            await trio.lowlevel.wait_writable(fd)
        else:
            await trio.lowlevel.checkpoint()  # a regular file is always writable

    def write_now(self, data: bytes | bytearray | memoryview) -> int | None:
        fd = self.out_fd
        if fd is None:
            return None
        if self._shared and self._out_pollable:
            if not _ready(fd, True):
                return 0
            data = data[:PIPE_BUF]
        try:
            return os.write(fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            log.warning("%s: output stopped: %s", self.description, e)
            self.out_fd = None
            return None

    def _wait_writable_blocking(self, timeout: float) -> bool:
        fd = self.out_fd
        if fd is None:
            return False
        with contextlib.suppress(OSError, ValueError):
            select.select([], [fd], [], timeout)
        return True

    def close(self) -> None:
        global _stdio_owner
        if self._saved_tty is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(0, termios.TCSANOW, self._saved_tty)
            self._saved_tty = None
        if _stdio_owner is self:
            _stdio_owner = None
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned = ()
        self.in_fd = self.out_fd = None
        if self._link is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._link)
            self._link = None


def open_stdio() -> FdEnd:
    """stdin (if it can be polled) and stdout; a terminal on stdin goes raw until close.
    ConfigError if another end holds stdio already."""
    global _stdio_owner
    if _stdio_owner is not None:
        raise ConfigError("stdio is already used by another device; give one of them a "
                          "pty, file or socket backend")
    saved = None
    if pollable(0) and os.isatty(0):
        try:
            saved = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSANOW)
        except termios.error:
            saved = None
    end = FdEnd("stdio", "stdio", 0, 1, shared=True, saved_tty=saved)
    _stdio_owner = end
    return end


def open_tty(path: str) -> FdEnd:
    """A terminal device (raw mode), or anything else that path names (OSError)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    if os.isatty(fd):
        with contextlib.suppress(termios.error):
            tty.setraw(fd, termios.TCSANOW)
    return FdEnd("tty", path, fd, fd, owned=(fd,), path=path)


def open_pty(link: str | None = None) -> FdEnd:
    """A new pseudo-terminal (its name in ``path``), symlinked at ``link`` if given.

    We keep the slave side open too, so the master never reads EIO while nobody is
    attached; output then waits in the pty until its buffer is full."""
    master, slave = os.openpty()
    try:
        os.set_inheritable(master, False)
        os.set_inheritable(slave, False)
        tty.setraw(slave, termios.TCSANOW)
        os.set_blocking(master, False)
        name = os.ttyname(slave)
        if link:
            if os.path.islink(link):
                os.unlink(link)  # a stale link from an earlier run
            os.symlink(name, link)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return FdEnd("pty", f"pty {name}", master, master, owned=(master, slave),
                 link=link or None, path=name)


def open_file(path: str, mode: int = 0o644) -> FdEnd:
    """Output appended to ``path`` (created if missing); no input. A FIFO without a
    reader is refused (ENXIO) instead of blocking the open."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                     | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise OSError(e.errno, "a FIFO nobody reads (start its reader first)") from None
        raise
    return FdEnd("file", f"file:{path}", None, fd, owned=(fd,), path=path)
