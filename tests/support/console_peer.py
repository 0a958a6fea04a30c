"""The host end of a guest's virtio-console port in the QEMU integration tests."""

from __future__ import annotations

import threading
from pathlib import Path

from devicemodel.guestkit.qemu import connect_unix


class ConsolePeer:
    """Connects to the port's Unix socket (retrying while the back end starts), reads the
    guest's first line, then answers with ``answer``; ``close`` returns what it read."""

    def __init__(self, path: Path, answer: str, *, timeout: float, connect_for: float = 0.0
                 ) -> None:
        self.sock = connect_unix(path, connect_for)
        self.sock.settimeout(timeout)
        self.answer = answer.encode() + b"\n"
        self.got = b""
        self.thread = threading.Thread(target=self._talk, daemon=True)
        self.thread.start()

    def _talk(self) -> None:
        try:
            while not self.got.endswith(b"\n"):
                chunk = self.sock.recv(256)
                if not chunk:
                    return
                self.got += chunk
            self.sock.sendall(self.answer)
        except OSError:
            return

    def close(self) -> bytes:
        self.sock.close()
        self.thread.join(5)
        return self.got
