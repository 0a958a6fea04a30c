"""Issue 18's attack classes, shared by the vhost-user and vfio-user fuzz targets.

A front end (or vfio-user client) hands over descriptors of its choosing where an eventfd
belongs, clears O_NONBLOCK again on what it handed over (it shares the open file
description with the back end), and truncates the memory it shared. ``draw`` picks the
attacks of one session from a stream of the seed of their own, so the messages a seed
expands to stay what they were; ``make_fd`` builds a descriptor, ``kick`` kicks through
one as far as it can be kicked, never blocking the harness.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from dataclasses import dataclass, field

#: what a hostile peer hands over where an eventfd belongs
HOSTILE_FDS = ("saturated", "blocking-saturated", "full-pipe", "pipe-read", "hungup-pipe",
               "socket", "file", "devnull")
EVENTFD_MAX = 2**64 - 2


@dataclass
class Hostile:
    """The attacks of one session: message index -> the descriptor kind replacing its
    eventfds; indexes after which O_NONBLOCK is cleared on every fd sent so far; (index,
    new size) of a truncation of the shared memory before that message, if any."""

    fd_kinds: dict[int, str] = field(default_factory=dict)
    toggle_after: set[int] = field(default_factory=set)
    shrink: tuple[int, int] | None = None


NO_HOSTILE = Hostile()


def draw(seed: int, n: int, shm_size: int) -> Hostile:
    """The attacks for a session of ``n`` messages (one session in four is plain)."""
    rnd = random.Random(seed ^ 0x1818_1818_1818_1818)
    h = Hostile()
    if rnd.randrange(4) == 0 or n == 0:
        return h
    for i in range(n):
        if rnd.randrange(3) == 0:
            h.fd_kinds[i] = rnd.choice(HOSTILE_FDS)
    if rnd.randrange(8) == 0:
        h.toggle_after.add(rnd.randrange(n))
    if rnd.randrange(5) == 0:
        h.shrink = (rnd.randrange(n + 1), rnd.choice([0, 0, 4096, shm_size // 2]))
    return h


def make_fd(kind: str, held: list[int], file_path: str) -> int:
    """A descriptor of ``kind`` ("event" is a plain blocking eventfd); it and any other
    end go on ``held`` (the caller closes them when the session ends)."""
    if kind in ("event", "saturated", "blocking-saturated"):
        fd = os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if kind == "saturated" else 0))
        if kind != "event":
            os.eventfd_write(fd, EVENTFD_MAX)
        held.append(fd)
        return fd
    if kind in ("full-pipe", "pipe-read", "hungup-pipe"):
        r, w = os.pipe2(os.O_CLOEXEC)
        if kind == "full-pipe":
            os.set_blocking(w, False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(w, bytes(65536))
            os.set_blocking(w, True)
        if kind == "hungup-pipe":
            os.close(w)
            held.append(r)
            return r
        held += [r, w]
        return w if kind == "full-pipe" else r
    if kind == "socket":
        a, b = socket.socketpair()
        fds = [a.detach(), b.detach()]
        held += fds
        return fds[0]
    fd = os.open(file_path if kind == "file" else os.devnull, os.O_RDWR | os.O_CLOEXEC)
    held.append(fd)
    return fd


def kick(fd: int, kind: str, held: list[int]) -> None:
    """Kick through a kick fd of ``kind`` as far as it can be kicked (never blocking)."""
    if kind == "event":
        with contextlib.suppress(OSError):
            os.eventfd_write(fd, 1)
    elif kind in ("pipe-read", "socket"):  # its other end was held right after it
        other = held[held.index(fd) + 1]
        with contextlib.suppress(OSError):
            os.set_blocking(other, False)
            os.write(other, b"k")


def clear_nonblock(fds: list[int]) -> None:
    """What a peer can do to the descriptors it handed over: O_NONBLOCK off again."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_blocking(fd, True)


__all__ = ["EVENTFD_MAX", "HOSTILE_FDS", "NO_HOSTILE", "Hostile", "clear_nonblock", "draw",
           "kick", "make_fd"]
