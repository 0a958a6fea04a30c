"""One process per VM name: an flock on ``<runtime dir>/<name>.lock``.

flock dies with its holder, so a crashed device model leaves a lock file that blocks
nothing; we never trust a lock file's mere existence or the pid written in it. The file
is left in place on exit: unlinking it would race with a starting instance that has opened
it but not yet locked it.

The directory is ``$ACRN_PYDM_RUNTIME_DIR`` if set, else /run/acrn-pydm when we can write
there (root, or systemd's RuntimeDirectory=), else ``$XDG_RUNTIME_DIR/acrn-pydm``.
"""

from __future__ import annotations

import fcntl
import os

from .errors import ConfigError


def runtime_dir() -> str:
    env = os.environ.get("ACRN_PYDM_RUNTIME_DIR")
    if env:
        return env
    system = "/run/acrn-pydm"
    if os.access("/run", os.W_OK) or os.access(system, os.W_OK):
        return system
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "acrn-pydm")
    return system


class InstanceLock:
    """Hold it for the VM's whole life; ``release`` (or process death) frees the name."""

    def __init__(self, name: str, directory: str | None = None) -> None:
        self.name = name
        self.directory = directory or runtime_dir()
        self.path = os.path.join(self.directory, f"{name}.lock")
        self._fd = -1

    def acquire(self) -> None:
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(
                f"cannot create the instance lock {self.path}: {e.strerror}; run as root or "
                "set ACRN_PYDM_RUNTIME_DIR to a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise ConfigError(
                f"VM {self.name!r} is already running{who}: {self.path} is locked; stop that "
                "instance first or give this VM another name"
            ) from None
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"cannot lock {self.path}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isascii() and text.isdigit() else None
