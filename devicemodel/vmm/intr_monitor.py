"""``--intr_monitor``: the interrupt storm monitor of acrn-dm's monitor.c, as a task.

Every probe period it asks the hypervisor (VM_INTR_MONITOR, GET_DATA) for the count of
each passthrough interrupt the guest got; when an interrupt's count grew by more than
threshold × period since the last probe, it asks the hypervisor to delay that VM's
passthrough interrupt injections by ``delay`` ms (DELAY_INT), waits ``duration`` ms,
cancels the delay (DELAY_INT 0), and looks again two seconds later. The request is one
page, ``struct acrn_intr_monitor``, which the hypervisor fills in.
"""

from __future__ import annotations

import logging
import mmap

import trio

from ..config.rt_options import IntrMonitor
from ..hsm import abi
from ..hsm.base import Hypervisor, HypervisorError

log = logging.getLogger(__name__)

CHECK_AGAIN = 2.0  # acrn-dm's TIME_TO_CHECK_AGAIN, seconds
PAIRS = abi.MAX_PTDEV_NUM * 2


class StormMonitor:
    def __init__(self, hv: Hypervisor, setting: IntrMonitor) -> None:
        self.hv = hv
        self.setting = setting
        self.page = mmap.mmap(-1, mmap.PAGESIZE)
        #: storms handled: (irq, delta)
        self.storms: list[tuple[int, int]] = []

    def _ask(self, cmd: int, buffer: list[int]) -> list[int]:
        data = abi.acrn_intr_monitor.build(
            dict(cmd=cmd, buf_cnt=PAIRS, buffer=buffer + [0] * (PAIRS - len(buffer))))
        self.page[:len(data)] = data
        self.hv.intr_monitor(self.page)
        got = abi.acrn_intr_monitor.parse(self.page[:abi.acrn_intr_monitor.sizeof()])
        return list(got.buffer[:min(got.buf_cnt, PAIRS)])

    async def run(self) -> None:
        s = self.setting
        threshold = s.threshold * s.period
        await trio.sleep(s.period)
        try:
            last = self._ask(abi.INTR_CMD_GET_DATA, [])
        except HypervisorError as e:
            log.warning("--intr_monitor: the hypervisor gives no interrupt data (%s); "
                        "interrupt storms are not watched", e)
            return
        while True:
            await trio.sleep(s.period)
            try:
                now = self._ask(abi.INTR_CMD_GET_DATA, [])
            except HypervisorError as e:
                log.error("--intr_monitor: getting interrupt data failed: %s", e)
                return
            storm = _storm(last, now, threshold)
            if storm is None:
                last = now
                continue
            irq, delta = storm
            self.storms.append(storm)
            log.info("interrupt storm: irq %d, %d interrupts in %d s; delaying injections "
                     "by %d ms for %d ms", irq, delta, s.period, s.delay_ms, s.duration_ms)
            self._ask(abi.INTR_CMD_DELAY_INT, [s.delay_ms])
            await trio.sleep(s.duration_ms / 1000)
            self._ask(abi.INTR_CMD_DELAY_INT, [0])
            await trio.sleep(CHECK_AGAIN)
            last = self._ask(abi.INTR_CMD_GET_DATA, [])

    def close(self) -> None:
        self.page.close()


def _storm(before: list[int], after: list[int], threshold: int) -> tuple[int, int] | None:
    """The first (irq, delta) whose count grew past ``threshold``; pairs whose irq changed
    or whose count went down are skipped, as in acrn-dm."""
    for i in range(0, min(len(before), len(after)) - 1, 2):
        if before[i] != after[i] or after[i + 1] < before[i + 1]:
            continue
        delta = after[i + 1] - before[i + 1]
        if delta > threshold:
            return after[i], delta
    return None


__all__ = ["StormMonitor"]
