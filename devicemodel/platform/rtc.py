"""MC146818 RTC and CMOS at ports 0x70/0x71 (what acrn-dm's vrtc gives a non-RT VM).

Time starts at the host's clock and then runs on the host's monotonic clock, so a guest
that sets its RTC keeps that offset.  Date and time registers follow register B's format
bits (BCD or binary, 12 or 24 hour).  The CMOS bytes report guest memory as acrn-dm fills
them for firmware: 0x34/0x35 = 64 KiB units above 16 MiB below 4 GiB, 0x5B..0x5D = 64 KiB
units above 4 GiB.  Alarm, periodic and update-ended interrupts (IRQ 8) are not
generated: the flags in register C stay clear.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable

from ..memory import KiB, MiB

RTC_INDEX_PORT = 0x70
RTC_DATA_PORT = 0x71
CMOS_SIZE = 128

SEC, MIN, HOUR, DOW, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
LMEM_LSB, LMEM_MSB = 0x34, 0x35
HMEM_LSB, HMEM_SB, HMEM_MSB = 0x5B, 0x5C, 0x5D

REGA_UIP = 0x80
REGB_SET = 0x80  # updates halted while the guest sets the time
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
    """The register file behind ports 0x70 (index) and 0x71 (data)."""

    def __init__(self, lowmem: int, highmem: int,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._monotonic = monotonic
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
            if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 60):
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
            self.cmos[REG_C] = 0
            return value
        return self.cmos[idx]

    def _write_data(self, value: int) -> None:
        idx = self.index
        if idx == REG_A:
            self.cmos[REG_A] = value & 0x7F
        elif idx == REG_B:
            self._write_reg_b(value)
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
