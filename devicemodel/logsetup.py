"""acrn-dm's ``--logger_setting console,level=N;disk,level=N;kmsg,level=N`` → a log level.

acrn-dm levels: 1 error, 2 warning, 3 notice, 4 info, 5 debug (default 4).
"""

from __future__ import annotations

import logging

from .config import ConfigError

_LEVELS = {1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO, 4: logging.INFO,
           5: logging.DEBUG}


def level_from_setting(text: str) -> int:
    """The most verbose level any logger asks for (we log to one stream)."""
    best = None
    for part in filter(None, text.split(";")):
        name, _, rest = part.partition(",")
        if name not in ("console", "disk", "kmsg"):
            raise ConfigError(f"--logger_setting {text}: unknown logger {name!r}")
        for kv in filter(None, rest.split(",")):
            k, _, v = kv.partition("=")
            if k == "level":
                if not v.isdigit() or not 1 <= int(v) <= 5:
                    raise ConfigError(f"--logger_setting {text}: level must be 1..5")
                lvl = _LEVELS[int(v)]
                best = lvl if best is None else min(best, lvl)
            elif k not in ("enable",):
                raise ConfigError(f"--logger_setting {text}: unknown key {k!r}")
    return logging.INFO if best is None else best
