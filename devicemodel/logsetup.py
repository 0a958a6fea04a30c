"""Logging as acrn-dm does it (``--logger_setting``), readable by journald.

acrn-dm has three loggers, set with ``--logger_setting console,level=N;disk,level=N;kmsg,level=N``
(1 error, 2 warning, 3 notice, 4 info, 5 debug; a message is written when its level is at
most the logger's). console is on at level 4 by default; disk (files under
/var/log/acrn-dm/) and kmsg (/dev/kmsg) are off until the setting names them.

Under systemd (``JOURNAL_STREAM`` names our stderr) console lines carry a ``<N>`` syslog
priority prefix, so journald files each line at the right priority without our own
timestamp (it adds one).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import TextIO

from .config.logger_setting import LOGGERS, parse_logger_setting

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

DEFAULT_LEVELS = {"console": 4}
DISK_LOG_DIR = "/var/log/acrn-dm"
DISK_LOG_SIZE = 2 * 1024 * 1024  # acrn-dm: LOG_SIZE_LIMIT
DISK_LOG_FILES = 8  # acrn-dm: LOG_FILES_COUNT

#: acrn-dm level → the lowest Python level still written
_THRESHOLD = {0: logging.CRITICAL + 10, 1: logging.ERROR, 2: logging.WARNING, 3: NOTICE,
              4: logging.INFO, 5: logging.DEBUG}


def journal_stream_is(stream: TextIO) -> bool:
    """True when systemd connected ``stream`` to the journal (JOURNAL_STREAM=dev:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (value.isascii() and dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= NOTICE:
        return 5
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<prio>name: message`` for journald; tracebacks stay on the same record."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = syslog_priority(record.levelno)
        # every physical line gets the prefix, or journald files continuations at INFO
        return "\n".join(f"<{prio}>{line}" for line in text.split("\n"))


class KmsgHandler(logging.Handler):
    """Writes records to /dev/kmsg with their syslog priority, as acrn-dm's kmsg logger."""

    def __init__(self, path: str = "/dev/kmsg") -> None:
        super().__init__()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = f"<{syslog_priority(record.levelno)}>acrn-pydm: {self.format(record)}\n"
            os.write(self._fd, msg.encode(errors="replace")[:1024])
        except OSError:
            pass  # a full or vanished kmsg must never stop the VM

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


def setup_logging(setting: str | None = None, *, vm_name: str = "acrn-pydm",
                  stream: TextIO | None = None) -> list[str]:
    """Install the handlers the setting asks for; returns problems to report (not fatal)."""
    levels = dict(DEFAULT_LEVELS)
    if setting:
        levels.update(parse_logger_setting(setting))
    stream = stream or sys.stderr
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    problems: list[str] = []
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(stream)
    if journal_stream_is(stream):
        console.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        console.setFormatter(logging.Formatter("acrn-pydm[%(name)s] %(levelname)s: %(message)s"))
    console.setLevel(_THRESHOLD[levels.get("console", 0)])
    handlers.append(console)
    if levels.get("disk"):
        directory = os.environ.get("ACRN_PYDM_LOG_DIR", DISK_LOG_DIR)
        try:
            os.makedirs(directory, exist_ok=True)
            disk = logging.handlers.RotatingFileHandler(
                os.path.join(directory, f"{vm_name}.log"), maxBytes=DISK_LOG_SIZE,
                backupCount=DISK_LOG_FILES - 1)
        except OSError as e:
            problems.append(f"disk logger disabled: {directory}: {e.strerror}")
        else:
            disk.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s"))
            disk.setLevel(_THRESHOLD[levels["disk"]])
            handlers.append(disk)
    if levels.get("kmsg"):
        try:
            kmsg = KmsgHandler()
        except OSError as e:
            problems.append(f"kmsg logger disabled: /dev/kmsg: {e.strerror}")
        else:
            kmsg.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            kmsg.setLevel(_THRESHOLD[levels["kmsg"]])
            handlers.append(kmsg)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(min(h.level for h in handlers))
    return problems


def level_from_setting(text: str) -> int:
    """The most verbose Python level any configured logger asks for."""
    levels = dict(DEFAULT_LEVELS)
    levels.update(parse_logger_setting(text))
    return min(_THRESHOLD[v] for v in levels.values())


__all__ = [
    "LOGGERS", "NOTICE", "JournalFormatter", "KmsgHandler", "journal_stream_is",
    "level_from_setting", "parse_logger_setting", "setup_logging", "syslog_priority",
]
