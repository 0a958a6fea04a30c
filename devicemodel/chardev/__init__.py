"""Host ends of character devices, shared by the UART (``-l comN,...``) and
virtio-console's ports: a terminal (stdio, a tty, a pty we create), a file, or a stream
socket (a server with one client at a time, or a client).

Each device keeps its own option syntax and its policy for output nobody takes (the
UART buffers a bounded amount and drops the rest; a console port drops on terminals and
waits for files and sockets); the ends give both the same non-blocking primitives
(``base.HostEnd``), restore what they changed (a raw terminal, a socket path, a pty link)
when closed, and let only one device hold stdio, as acrn-dm does.

- ``base.py``: the ``HostEnd`` interface (an end with nobody on it).
- ``fds.py``: ``open_stdio``, ``open_tty``, ``open_pty``, ``open_file``.
- ``sockets.py``: ``listen_unix``, ``listen_tcp``, ``connect_unix``.
"""

from __future__ import annotations

from .base import HostEnd
from .fds import FdEnd, open_file, open_pty, open_stdio, open_tty, pollable
from .sockets import SocketEnd, connect_unix, listen_tcp, listen_unix

__all__ = ["FdEnd", "HostEnd", "SocketEnd", "connect_unix", "listen_tcp", "listen_unix",
           "open_file", "open_pty", "open_stdio", "open_tty", "pollable"]
