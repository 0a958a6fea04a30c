"""``--debugexit``: a guest write to port 0xF4 powers the VM off (acrn-dm debugexit.c).

Test guests (acrn-unit-test, kvm-unit-tests) end this way and put their verdict in the
value; acrn-dm drops it, we keep it (``Lifecycle.exit_code``) so a test can read it.
Reads answer 0xFFFF as in acrn-dm.  Guests write with OUTB, OUTW or OUTL, so the port
accepts every size at 0xF4 (the range spans 0xF4..0xF7; only 0xF4 acts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

DEBUGEXIT_PORT = 0xF4
DEBUGEXIT_SPAN = 4


class DebugExit:
    def __init__(self, poweroff: Callable[[int], None]) -> None:
        self._poweroff = poweroff
        self.code: int | None = None

    def read(self, offset: int, size: int) -> int:
        return 0xFFFF & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            return
        self.code = value
        log.info("guest wrote %#x to the debug-exit port: powering off", value)
        self._poweroff(value)

    def reset(self) -> None:
        self.code = None
