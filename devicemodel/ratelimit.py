"""Rate-limited logging: a hostile guest must not be able to flood the journal."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Lets ``burst`` messages through per ``interval`` seconds, then counts the rest."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 5.0) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._window = 0.0
        self._count = 0
        self.suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        self._emit(logging.WARNING, msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._emit(logging.ERROR, msg, args)

    def _emit(self, level: int, msg: str, args: tuple[object, ...]) -> None:
        now = time.monotonic()
        if now - self._window >= self.interval:
            if self.suppressed:
                self.logger.log(level, "%d similar messages suppressed", self.suppressed)
            self._window = now
            self._count = 0
            self.suppressed = 0
        if self._count < self.burst:
            self._count += 1
            self.logger.log(level, msg, *args)
        else:
            self.suppressed += 1
