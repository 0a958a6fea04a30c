"""File descriptors a peer hands us (vhost-user's kick, call and err fds): checked once,
then read and written only in ways that cannot block.

Why: a front end that hands over a *blocking* call eventfd whose counter it has saturated
(2^64-2), or a full pipe, used to freeze a back end for good at the first interrupt, and
with the write done through ``ctypes.PyDLL`` (which keeps the GIL) even SIGTERM could not
end it. A peer must not be able to make us wait.

* ``adopt`` accepts only what the protocol means (an eventfd; a pipe or a socket, which
  some front ends use instead) and sets O_NONBLOCK. A regular file, a device node or a
  directory is refused: O_NONBLOCK means nothing there, and a file on a FUSE mount the
  peer serves can block any read or write for as long as the peer likes.
* SCM_RIGHTS hands us the peer's own open file description, so O_NONBLOCK is shared and
  the peer may clear it again behind our back. Reads therefore use ``preadv2(RWF_NOWAIT)``,
  non-blocking per call whatever the flags say (eventfds, pipes and sockets support it).
  Linux has no such flag for an eventfd *write*; a write that might block is bounded
  instead by a one-shot timer of the writing thread (``_WriteGuard``), whose signal ends a
  blocked write with EINTR after ``WRITE_LIMIT_S``. The write keeps the GIL (``PyDLL``, as
  before: a released GIL costs the event loop up to a switch interval to win back when
  I/O threads are busy), and the timer needs no GIL to fire.
  Arming and disarming the timer are two system calls that cost more than the write
  itself (≈3 µs of a 4 KiB request's ≈50 µs, measured on a data-plane thread). A thread
  whose blocking calls all restart after a signal (Python's own os/select calls do,
  PEP 475) may call :func:`relax_guard`: its timer is then only re-armed when less than
  half of ``WRITE_LIMIT_S`` is left, and never disarmed, so a stream of signals costs
  one timer call per ``WRITE_LIMIT_S / 2``; the price is one spurious no-op signal once
  the stream stops, which such a thread's calls simply restart after.
* A signal we cannot write is dropped: EAGAIN on an eventfd means its counter is full, so
  the peer already has a wake-up pending; on a pipe or socket, unread bytes say the same.
  Nothing is retried, and what is dropped is counted (callers log it rate-limited).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import stat
import threading
import time
from enum import Enum

log = logging.getLogger(__name__)

#: How long a write may stay blocked (only a peer that cleared O_NONBLOCK again and
#: filled its fd can make it block at all) before the guard timer ends it.
WRITE_LIMIT_S = 0.05
#: The guard timer's signal: a real-time signal nobody else in the process uses.
GUARD_SIGNAL = signal.SIGRTMIN + 6


class PeerFdError(Exception):
    """A descriptor we refuse; the message says what it is and what was expected."""


class Sent(Enum):
    """What became of one signal write."""

    SENT = "sent"
    PENDING = "pending"  # the fd is full: the peer already has a wake-up waiting
    BLOCKED = "blocked"  # the peer made the write block; the guard timer ended it
    FAILED = "failed"  # any other error (the peer closed its end, ...)


def fd_kind(fd: int) -> str:
    """What ``fd`` is: "eventfd", "fifo", "socket", or another word for what we refuse."""
    st = os.fstat(fd)
    mode = st.st_mode
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc (a sandbox): an anonymous inode is taken for an eventfd
        return "eventfd" if stat.S_IFMT(mode) == 0 else "unknown file type"
    if link == "anon_inode:[eventfd]":
        return "eventfd"
    return link.removeprefix("anon_inode:").strip("[]") or "unknown file type"


ACCEPTED = ("eventfd", "fifo", "socket")


def adopt(fd: int, what: str) -> str:
    """Check a descriptor the peer sent as ``what`` and make it non-blocking; returns its
    kind. Raises PeerFdError (the caller still owns and closes ``fd``)."""
    try:
        kind = fd_kind(fd)
    except OSError as e:
        raise PeerFdError(f"{what}: cannot inspect the fd: {e.strerror}") from None
    if kind not in ACCEPTED:
        raise PeerFdError(f"{what}: the fd is not an eventfd, pipe or socket (it is: {kind})")
    try:
        os.set_blocking(fd, False)
    except OSError as e:
        raise PeerFdError(f"{what}: cannot make the fd non-blocking: {e.strerror}") from None
    return kind


# --- reading ------------------------------------------------------------------------------

KICK = 1  # something arrived (or the fd reads as ready)
NOTHING = 0  # nothing there (another reader took it, or a spurious wake-up)
CLOSED = -1  # end of file or an error: the peer's end is gone, stop watching


def read_nowait(fd: int, buf: bytearray) -> int | None:
    """One read into ``buf`` that never waits, whatever the fd's flags say: the byte count
    (0 at end of file), or None when nothing is there. Other errors raise OSError."""
    try:
        return os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    n = _guarded_read(fd, buf)  # an older kernel without RWF_NOWAIT for this kind of fd
    if n is not None and n < 0:
        raise OSError(errno.EIO, "read failed")
    return n


def read_kick(fd: int) -> int:
    """Consume what a kick fd holds without ever blocking: KICK, NOTHING or CLOSED.

    Any amount counts as a kick (a pipe may hold a partial 8-byte value)."""
    try:
        n = read_nowait(fd, bytearray(8))
    except OSError:
        return CLOSED
    if n is None:
        return NOTHING
    return KICK if n > 0 else CLOSED


def _guarded_read(fd: int, buf: bytearray) -> int | None:
    addr = (ctypes.c_char * len(buf)).from_buffer(buf)
    with _GUARD:
        n = _libc.read(fd, addr, len(buf))
    if n >= 0:
        return int(n)
    e = ctypes.get_errno()
    if e in (errno.EAGAIN, errno.EINTR):
        return None
    return -1


# --- writing ------------------------------------------------------------------------------

# write(2) through PyDLL keeps the GIL (see the module docstring).
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.write.restype = ctypes.c_ssize_t
_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.read.restype = ctypes.c_ssize_t
_ONE = ctypes.c_uint64(1)
_ONE_PTR = ctypes.addressof(_ONE)
# The relaxed writer's calls, with ctypes arguments made once instead of converted per
# call (argtypes conversion costs more than the write system call).
_hot = ctypes.PyDLL(None, use_errno=True)
_hot_write = _hot.write
_hot_write.restype = ctypes.c_ssize_t
_hot_settime = _hot.timer_settime
_ONE_VP = ctypes.c_void_p(_ONE_PTR)
_EIGHT = ctypes.c_size_t(8)


def signal_fd(fd: int) -> Sent:
    """Add 1 to a peer's eventfd (or write the same 8 bytes to its pipe or socket)."""
    relaxed = getattr(_GUARD.local, "relaxed", None)
    if relaxed is not None:
        n = relaxed.write(fd)
    else:
        with _GUARD:
            n = _libc.write(fd, _ONE_PTR, 8)
    if n >= 0:
        return Sent.SENT
    e = ctypes.get_errno()
    if e == errno.EAGAIN:
        return Sent.PENDING
    if e == errno.EINTR:
        return Sent.BLOCKED
    return Sent.FAILED


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):
    """struct sigevent with SIGEV_THREAD_ID's thread id (64 bytes on Linux)."""

    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int), ("sigev_tid", ctypes.c_int),
                ("_pad", ctypes.c_byte * 44)]


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction (x86-64 and aarch64 layout)."""

    _fields_ = [("sa_handler", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


_CLOCK_MONOTONIC = 1
_SIGEV_THREAD_ID = 4
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


class _WriteGuard:
    """``with _GUARD:`` arms a one-shot timer of the calling thread for WRITE_LIMIT_S and
    disarms it after: a write the peer made blocking ends with EINTR instead of never.

    The timer's handler (installed with ``sigaction`` without SA_RESTART, so the blocked
    system call fails rather than restarts) does nothing. Each thread gets its own timer,
    deleted when the thread ends. Where timers or the handler are not available (a
    seccomp filter), writes go unguarded and O_NONBLOCK is the only protection."""

    def __init__(self) -> None:
        self.local = threading.local()  # .timer, .current; .relaxed (relax_guard)
        self._lock = threading.Lock()
        self._installed: bool | None = None
        self._noop = _HANDLER(lambda signum: None)  # kept alive for the process
        self.arm = _Itimerspec(it_value=_Timespec(0, int(WRITE_LIMIT_S * 1e9)))
        self._disarm = _Itimerspec()
        self.fired = 0  # writes the guard had to end (for tests and counters)

    def _install(self) -> bool:
        with self._lock:
            if self._installed is None:
                act = _Sigaction()
                act.sa_handler = ctypes.cast(self._noop, ctypes.c_void_p).value
                act.sa_flags = 0
                ok = _libc.sigaction(GUARD_SIGNAL, ctypes.byref(act), None) == 0
                if not ok:
                    log.info("peer fd writes are not time-bounded: sigaction: %s",
                             os.strerror(ctypes.get_errno()))
                self._installed = ok
            return self._installed

    def _timer(self) -> int | None:
        timer = getattr(self.local, "timer", False)
        if timer is False:
            timer = _ThreadTimer.create() if self._install() else None
            self.local.timer = timer
        return timer.id if timer is not None else None

    def __enter__(self) -> None:
        tid = self._timer()
        self.local.current = tid
        if tid is not None:
            _libc.timer_settime(ctypes.c_void_p(tid), 0, ctypes.byref(self.arm), None)

    def __exit__(self, *exc: object) -> None:
        tid = self.local.current
        if tid is not None:
            old = _Itimerspec()
            _libc.timer_settime(ctypes.c_void_p(tid), 0, ctypes.byref(self._disarm),
                                ctypes.byref(old))
            if not old.it_value.tv_sec and not old.it_value.tv_nsec:
                self.fired += 1  # it had expired: the write was blocked that long


class _RelaxedWriter:
    """The writes of a thread under :func:`relax_guard`: the timer is armed for
    ``WRITE_LIMIT_S`` when less than half of that is left before it fires, never disarmed.
    A write it ends returns EINTR (``Sent.BLOCKED``), counted in ``_GUARD.fired``."""

    __slots__ = ("_handle", "_until", "_arm")

    def __init__(self, timer: _ThreadTimer) -> None:
        self._handle = ctypes.c_void_p(timer.id)
        self._until = 0.0  # when the armed timer fires (monotonic seconds)
        self._arm = ctypes.byref(_GUARD.arm)

    def write(self, fd: int) -> int:
        now = time.monotonic()
        if self._until - now < WRITE_LIMIT_S / 2:
            _hot_settime(self._handle, 0, self._arm, None)
            self._until = now + WRITE_LIMIT_S  # it fires no earlier than this
        n: int = _hot_write(fd, _ONE_VP, _EIGHT)
        if n < 0 and ctypes.get_errno() == errno.EINTR:
            _GUARD.fired += 1
        return n


def relax_guard() -> None:
    """Let the calling thread's signal writes skip disarming the guard timer (see the
    module docstring). Only for a thread all of whose blocking calls restart on EINTR
    (Python's os, select and socket calls; not ``fcntl.ioctl`` or other ctypes calls):
    it gets one no-op signal ``WRITE_LIMIT_S`` after its last write. No-op where the
    guard is unavailable."""
    tid = _GUARD._timer()
    if tid is not None and getattr(_GUARD.local, "relaxed", None) is None:
        _GUARD.local.relaxed = _RelaxedWriter(_GUARD.local.timer)


class _ThreadTimer:
    """One POSIX timer that signals one thread; deleted with the thread's locals."""

    def __init__(self, timer_id: int) -> None:
        self.id = timer_id

    @classmethod
    def create(cls) -> _ThreadTimer | None:
        ev = _Sigevent(sigev_signo=GUARD_SIGNAL, sigev_notify=_SIGEV_THREAD_ID,
                       sigev_tid=threading.get_native_id())
        timer = ctypes.c_void_p()
        if _libc.timer_create(_CLOCK_MONOTONIC, ctypes.byref(ev), ctypes.byref(timer)) != 0:
            log.info("peer fd writes are not time-bounded in %s: timer_create: %s",
                     threading.current_thread().name, os.strerror(ctypes.get_errno()))
            return None
        return cls(timer.value or 0)

    def __del__(self) -> None:
        libc = _libc  # None when the interpreter is already tearing the module down
        if libc is not None:
            libc.timer_delete(ctypes.c_void_p(self.id))


_libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.timer_create.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                ctypes.c_void_p]
_libc.timer_delete.argtypes = [ctypes.c_void_p]
_GUARD = _WriteGuard()


def guard_fired() -> int:
    """How many writes the guard timer has ended in this process."""
    return _GUARD.fired


__all__ = ["ACCEPTED", "CLOSED", "KICK", "NOTHING", "PeerFdError", "Sent", "adopt",
           "fd_kind", "guard_fired", "read_kick", "read_nowait", "relax_guard", "signal_fd"]
