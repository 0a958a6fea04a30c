"""MC146818 RTC and CMOS at ports 0x70/0x71 (what acrn-dm's vrtc gives a non-RT VM).

Time starts at the host's clock and then runs on the host's monotonic clock, so a guest
that sets its RTC keeps that offset.  Date and time registers follow register B's format
bits (BCD or binary, 12 or 24 hour).  The CMOS bytes report guest memory as acrn-dm fills
them for firmware: 0x34/0x35 = 64 KiB units above 16 MiB below 4 GiB, 0x5B..0x5D = 64 KiB
units above 4 GiB.  Update-ended, alarm and periodic interrupts set register C's flags
and raise IRQ 8 while an enabled flag is set (SET_HIGH, and SET_LOW once the guest reads
register C, as acrn-dm drives it); ``run`` is the timer task behind them.
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Callable

import trio

from ..irq.services import Line
from ..loopgate import on_loop
from ..memory import KiB, MiB

log = logging.getLogger(__name__)

RTC_INDEX_PORT = 0x70
RTC_DATA_PORT = 0x71
CMOS_SIZE = 128

SEC, MIN, HOUR, DOW, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
LMEM_LSB, LMEM_MSB = 0x34, 0x35
HMEM_LSB, HMEM_SB, HMEM_MSB = 0x5B, 0x5C, 0x5D

REGA_UIP = 0x80
REGA_DIVIDER = 0x70
REGA_DIVIDER_ON = 0x20  # 32.768 kHz time base running
REGA_RATE = 0x0F
REGB_SET = 0x80  # updates halted while the guest sets the time
REGB_PIE = 0x40
REGB_AIE = 0x20
REGB_UIE = 0x10
REGC_IRQF = 0x80
REGC_PF = 0x40
REGC_AF = 0x20
REGC_UF = 0x10
RTC_IRQ = 8
MAX_PERIODIC_HZ = 1024  # faster rates are delivered at this rate
ALARM_SEC, ALARM_MIN, ALARM_HOUR = 0x01, 0x03, 0x05
REGB_BINARY = 0x04
REGB_24H = 0x02
REGD_VRT = 0x80  # valid RAM and time
UIP_WINDOW = 244e-6  # the update cycle's length, before each second boundary

_TIME_REGS = (SEC, MIN, HOUR, DOW, DAY, MONTH, YEAR, CENTURY)


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


class Rtc:
    """The register file behind ports 0x70 (index) and 0x71 (data).

    ``vcpu_safe``: plain state, and the timer task is woken with ``loopgate.on_loop``, so
    accesses are answered on the vCPU thread while the loop sleeps (``loopgate.py``)."""

    vcpu_safe = True

    def __init__(self, lowmem: int, highmem: int,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 irq: Line | None = None) -> None:
        """``irq``: IRQ 8 (active high, level while REG_C.IRQF is set)."""
        self._clock = clock
        self._monotonic = monotonic
        self._irq_line = irq
        self._irq = False
        self._changed = trio.Event()
        self._lowmem = lowmem
        self._highmem = highmem
        self.reset()

    def reset(self) -> None:
        self.cmos = bytearray(CMOS_SIZE)
        self.index = REG_D
        self.cmos[REG_A] = 0x20  # 32.768 kHz time base, no periodic rate
        self.cmos[REG_B] = REGB_24H
        self.cmos[REG_D] = REGD_VRT
        low = max(0, self._lowmem - 16 * MiB) // (64 * KiB)
        low = min(low, 0xFFFF)
        high = min(self._highmem // (64 * KiB), 0xFF_FFFF)
        self.cmos[LMEM_LSB] = low & 0xFF
        self.cmos[LMEM_MSB] = low >> 8
        self.cmos[HMEM_LSB] = high & 0xFF
        self.cmos[HMEM_SB] = (high >> 8) & 0xFF
        self.cmos[HMEM_MSB] = high >> 16
        self._base_rtc = float(int(self._clock()))  # guest-visible seconds at _base_mono
        self._base_mono = self._monotonic()
        self._halted_at: float | None = None
        self._store_time(self._base_rtc)
        self._set_reg_c(0)
        on_loop(self._changed.set)

    # --- time -----------------------------------------------------------------------------
    def now(self) -> float:
        """The guest's RTC time in seconds since the epoch."""
        if self._halted_at is not None:
            return self._halted_at
        return self._base_rtc + (self._monotonic() - self._base_mono)

    def _enc(self, v: int) -> int:
        return v if self.cmos[REG_B] & REGB_BINARY else _bcd(v)

    def _dec(self, v: int) -> int:
        return v if self.cmos[REG_B] & REGB_BINARY else _unbcd(v)

    def _store_time(self, secs: float) -> None:
        t = time.gmtime(int(secs))
        hour = t.tm_hour
        if self.cmos[REG_B] & REGB_24H:
            hour_reg = self._enc(hour)
        else:
            h12 = hour % 12 or 12
            hour_reg = self._enc(h12) | (0x80 if hour >= 12 else 0)
        c = self.cmos
        c[SEC] = self._enc(t.tm_sec)
        c[MIN] = self._enc(t.tm_min)
        c[HOUR] = hour_reg
        c[DOW] = self._enc((t.tm_wday + 1) % 7 + 1)  # 1 = Sunday
        c[DAY] = self._enc(t.tm_mday)
        c[MONTH] = self._enc(t.tm_mon)
        c[YEAR] = self._enc(t.tm_year % 100)
        c[CENTURY] = self._enc(t.tm_year // 100)

    def _load_time(self) -> float | None:
        """The time the guest wrote into the registers, or None if it is not a date."""
        c = self.cmos
        try:
            hour_reg = c[HOUR]
            if self.cmos[REG_B] & REGB_24H:
                hour = self._dec(hour_reg)
            else:
                hour = self._dec(hour_reg & 0x7F) % 12 + (12 if hour_reg & 0x80 else 0)
            year = self._dec(c[CENTURY]) * 100 + self._dec(c[YEAR])
            fields = (year, self._dec(c[MONTH]), self._dec(c[DAY]), hour, self._dec(c[MIN]),
                      self._dec(c[SEC]))
            y, mo, d, h, mi, s = fields
            if not (1970 <= y <= 9999 and 1 <= mo <= 12 and 1 <= d <= 31 and h < 24
                    and mi < 60 and s < 60):
                return None
            return float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))
        except (ValueError, OverflowError):
            return None

    def _set_time(self, secs: float) -> None:
        self._base_rtc = secs
        self._base_mono = self._monotonic()

    # --- bus handlers ---------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 1:
            return (1 << (8 * size)) - 1
        if offset == 0:
            return 0xFF  # the index register is write-only
        return self._read_data()

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            return
        if offset == 0:
            self.index = value & 0x7F  # bit 7 is the NMI mask
        else:
            self._write_data(value & 0xFF)

    def _read_data(self) -> int:
        idx = self.index
        if idx in _TIME_REGS and self._halted_at is None:
            self._store_time(self.now())
        if idx == REG_A:
            frac = self.now() % 1.0
            uip = REGA_UIP if self._halted_at is None and frac >= 1.0 - UIP_WINDOW else 0
            return (self.cmos[REG_A] & 0x7F) | uip
        if idx == REG_C:
            value = self.cmos[REG_C]
            self._set_reg_c(0)
            return value
        return self.cmos[idx]

    def _write_data(self, value: int) -> None:
        idx = self.index
        if idx == REG_A:
            self.cmos[REG_A] = value & 0x7F
            on_loop(self._changed.set)
        elif idx == REG_B:
            self._write_reg_b(value)
            self._set_reg_c(self.cmos[REG_C])  # the enables changed: IRQF may follow
            on_loop(self._changed.set)
        elif idx in (REG_C, REG_D):
            return  # read-only
        elif idx in _TIME_REGS:
            if idx == SEC:
                value &= 0x7F
            if self._halted_at is None:
                self._store_time(self.now())
            self.cmos[idx] = value
            secs = self._load_time()
            if secs is not None:
                if self._halted_at is not None:
                    self._halted_at = secs
                else:
                    self._set_time(secs)
        else:
            self.cmos[idx] = value

    def _write_reg_b(self, value: int) -> None:
        old = self.cmos[REG_B]
        if value & REGB_SET and not old & REGB_SET:
            self._store_time(self.now())
            self._halted_at = self.now()
        self.cmos[REG_B] = value
        if not value & REGB_SET and old & REGB_SET:
            secs = self._load_time()
            self._set_time(secs if secs is not None else (self._halted_at or self.now()))
            self._halted_at = None
        if (old ^ value) & (REGB_BINARY | REGB_24H) and self._halted_at is None:
            self._store_time(self.now())  # the format changed: re-encode the time

    # --- interrupts ---------------------------------------------------------------------
    def _set_reg_c(self, flags: int) -> None:
        flags &= REGC_PF | REGC_AF | REGC_UF
        enabled = self.cmos[REG_B] & (REGB_PIE | REGB_AIE | REGB_UIE)
        irqf = bool(flags & enabled)  # UIE/AIE/PIE sit at the bits of UF/AF/PF
        self.cmos[REG_C] = flags | (REGC_IRQF if irqf else 0)
        if irqf != self._irq:
            self._irq = irqf
            if self._irq_line is not None:
                self._irq_line.set(irqf)

    def _running(self) -> bool:
        return (self.cmos[REG_A] & REGA_DIVIDER) == REGA_DIVIDER_ON and self._halted_at is None

    def periodic_hz(self) -> float | None:
        """The periodic interrupt rate when enabled (32.768 kHz >> (rate - 1))."""
        rate = self.cmos[REG_A] & REGA_RATE
        if not self.cmos[REG_B] & REGB_PIE or not rate or not self._running():
            return None
        if rate <= 2:
            rate += 7  # rates 1 and 2 alias 8 and 9 on a 32.768 kHz time base
        return min(32768 >> (rate - 1), MAX_PERIODIC_HZ)

    def _alarm_matches(self) -> bool:
        c = self.cmos
        return all(c[alarm] >= 0xC0 or c[alarm] == c[field]
                   for alarm, field in ((ALARM_SEC, SEC), (ALARM_MIN, MIN), (ALARM_HOUR, HOUR)))

    def second_passed(self) -> None:
        """An update cycle ended: UF, and AF if the alarm matches the new time."""
        if not self._running():
            return
        self._store_time(self.now())
        flags = self.cmos[REG_C] | REGC_UF
        if self._alarm_matches():
            flags |= REGC_AF
        self._set_reg_c(flags)

    def periodic_tick(self) -> None:
        self._set_reg_c(self.cmos[REG_C] | REGC_PF)

    async def run(self) -> None:
        """The update-ended and periodic timers (they only wake us when due)."""
        next_periodic: float | None = None
        cur_hz: float | None = None
        while True:
            self._changed = trio.Event()
            now = self._monotonic()
            hz = self.periodic_hz()
            if hz != cur_hz or next_periodic is None:
                cur_hz = hz
                next_periodic = None if hz is None else now + 1.0 / hz
            next_update = now + (1.0 - self.now() % 1.0) if self._running() else None
            due = [d for d in (next_update, next_periodic) if d is not None]
            with trio.move_on_after(max(0.0, min(due) - now) if due else 3600.0) as timer:
                await self._changed.wait()
            if not timer.cancelled_caught:
                continue  # the guest changed a register: recompute the deadlines
            now = self._monotonic()
            if next_periodic is not None and cur_hz and now >= next_periodic - 1e-6:
                self.periodic_tick()
                next_periodic += 1.0 / cur_hz
                if next_periodic < now:  # fell behind: ticks coalesce, as lost edges do
                    next_periodic = now + 1.0 / cur_hz
            if next_update is not None and now >= next_update - 1e-6:
                self.second_passed()
