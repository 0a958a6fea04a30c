"""The interface every host end offers, and what an end without a peer does.

A host end is where a guest's serial or console port meets the host: a terminal, a file,
a socket. The event loop drives it without ever blocking: ``wait_readable`` /
``read_now`` for input, ``wait_writable`` / ``write_now`` for output, each ``*_now`` call
one non-blocking system call. What to do with output nobody takes (buffer it, drop it,
wait) is the device's policy, not the end's; an end only says how much it took.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio


class HostEnd:
    """An open host end. This base is an end with nobody on it: no input, and output
    that goes nowhere."""

    #: what the end is: none, stdio, tty, pty, file, socket
    kind = "none"

    def __init__(self, description: str = "none") -> None:
        self.description = description

    @property
    def connected(self) -> bool:
        """Whether a peer is there (a socket's client; always True for the others)."""
        return True

    @property
    def terminal(self) -> bool:
        """A terminal (stdio, tty, pty): someone may be reading it, or nobody."""
        return self.kind in ("stdio", "tty", "pty")

    async def wait_readable(self) -> None:
        """Until input may be there (forever if there is none, or no more)."""
        await trio.sleep_forever()

    def read_now(self, limit: int) -> bytes | None:
        """Up to ``limit`` bytes of input, or None if there are none right now."""
        return None

    async def read(self, limit: int) -> bytes:
        """The next input bytes (waits for them)."""
        while True:
            await self.wait_readable()
            data = self.read_now(limit)
            if data:
                return data

    async def wait_writable(self) -> None:
        """Until ``write_now`` may take bytes (forever if output has nowhere to go)."""
        await trio.sleep_forever()

    def write_now(self, data: bytes | bytearray | memoryview) -> int | None:
        """How many bytes of ``data`` were taken now (0: full for the moment), or None:
        nobody takes output (no peer, or output failed)."""
        return len(data)

    def drain(self, data: bytes | bytearray | memoryview, timeout: float) -> int:
        """Write what can be written within ``timeout`` seconds, blocking (for the last
        words at power-off, when the loop is gone): bytes written."""
        done, deadline = 0, time.monotonic() + timeout
        view = memoryview(data)
        while done < len(view):
            n = self.write_now(view[done:])
            if n is None:
                break
            done += n
            left = deadline - time.monotonic()
            if not n and (left <= 0 or not self._wait_writable_blocking(left)):
                break
        return done

    async def serve(self, changed: Callable[[], None]) -> None:
        """Background work (accepting clients); calls ``changed`` when ``connected``
        flips. Runs until cancelled."""
        await trio.sleep_forever()

    def close(self) -> None:
        """Release what the end holds and undo what opening it changed."""

    def _wait_writable_blocking(self, timeout: float) -> bool:
        return False
