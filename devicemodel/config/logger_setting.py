"""acrn-dm's ``--logger_setting`` value: which loggers, at which levels.

Part of the VM description, so both front ends check it while parsing; logsetup.py, which
installs the handlers at start, reads the same parse from here.
"""

from __future__ import annotations

from ..errors import ConfigError

LOGGERS = ("console", "disk", "kmsg")
MAX_LEVEL = 5  # 1 error, 2 warning, 3 notice, 4 info, 5 debug
#: acrn-dm reads the level as an unsigned 32-bit number (a level above 5 writes everything)
LEVEL_LIMIT = 0xFFFF_FFFF


def parse_logger_setting(text: str) -> dict[str, int]:
    """``console,level=4;kmsg,level=3`` → {"console": 4, "kmsg": 3}; one-line errors."""
    levels: dict[str, int] = {}
    for part in text.split(";"):
        if not part:
            continue
        name, _, rest = part.partition(",")
        if name not in LOGGERS:
            raise ConfigError(f"--logger_setting {text}: unknown logger {name!r}; "
                              f"use {', '.join(LOGGERS)}")
        key, eq, value = rest.partition("=")
        if key != "level" or not eq or not (value.isascii() and value.isdigit()) or \
                int(value) > LEVEL_LIMIT:
            raise ConfigError(f"--logger_setting {text}: write {name},level=N with N a number "
                              "(1 error .. 5 debug; above 5 is debug too)")
        levels[name] = min(int(value), MAX_LEVEL)
    if not levels:
        raise ConfigError(f"--logger_setting {text!r}: empty; write e.g. console,level=4")
    return levels


__all__ = ["LEVEL_LIMIT", "LOGGERS", "MAX_LEVEL", "parse_logger_setting"]
