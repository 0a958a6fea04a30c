"""sd_notify(3) without libsystemd: one datagram per state change to ``$NOTIFY_SOCKET``.

A name that starts with ``@`` is in the abstract namespace (the ``@`` stands for a NUL).
Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the caller never checks.

The watchdog (``WatchdogSec=``) is honoured through ``WATCHDOG_USEC``: a trio task pings
at half the interval, so a wedged event loop stops the pings and systemd restarts us.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET") or None
        self.address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        else:
            log.warning("NOTIFY_SOCKET %r is neither a path nor @abstract; not notifying",
                        address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (``notify(READY=1, STATUS="running")``)."""
        if self._sock is None or self.address is None:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            self._sock.sendto(text.encode(), self.address)
        except OSError as e:
            # a gone or full socket must not stop the VM; systemd will notice by itself
            log.debug("sd_notify %s failed: %s", text.split("\n")[0], e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> bool:
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not (usec.isascii() and usec.isdigit()) or int(usec) == 0:
        return None
    if pid and (not (pid.isascii() and pid.isdigit()) or int(pid) != os.getpid()):
        return None  # the watchdog is meant for another process
    return int(usec) / 2_000_000


async def watchdog(notifier: Notifier, interval: float) -> None:
    """Ping from the event loop itself: only a loop that runs can keep us alive."""
    while True:
        notifier.notify(WATCHDOG=1)
        await trio.sleep(interval)
