"""Errors every layer may raise, at the bottom of the import graph so nothing imports up.

``ConfigError`` is the user's mistake (command line, VM file, device options): its message
is the whole story on one line, which the front ends print as it is.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in the VM description: the message is the whole story, on one line
    (control characters from the user's input are shown escaped)."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """``text`` with control characters escaped, so a message stays one printable line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


__all__ = ["ConfigError", "one_line"]
