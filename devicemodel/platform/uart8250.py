"""A 16550A UART: the register file a Linux 8250 driver probes, with a real 16-byte FIFO.

The register model is synchronous (port handlers answer while the vCPU waits, on the
vCPU's own thread when the loop sleeps: ``vcpu_safe``, ``loopgate.py``); the host
side (stdio, a pty, a file, a Unix or TCP socket: ``devicemodel.chardev``'s host ends,
shared with virtio-console) is served by trio tasks in ``uart_backend``.  Transmission
is instantaneous, so THRE and TEMT always read set, as in acrn-dm; reception is paced by
the FIFO: the backend reader only takes as many bytes from the host as the FIFO has room
for, so nothing typed is ever lost to an overrun.

Interrupts: an ISA UART drives an edge-triggered line.  We model its INTR output as a
level (any enabled reason pending) and send the hypervisor a rising pulse on every 0→1
transition of that level, which is what the edge-triggered vIOAPIC/PIC pin sees on real
hardware.  (acrn-dm pulses on every register access while a reason is pending; Linux's
interrupt loop drains all reasons, so one edge per transition suffices.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

# register offsets
REG_DATA = 0  # RBR (read) / THR (write); DLL with DLAB
REG_IER = 1  # DLM with DLAB
REG_IIR = 2  # IIR (read) / FCR (write)
REG_LCR = 3
REG_MCR = 4
REG_LSR = 5
REG_MSR = 6
REG_SCR = 7

IER_ERDAI = 0x01  # received data available
IER_ETHREI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EMSI = 0x08  # modem status

IIR_NOPEND = 0x01
IIR_MSR = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_CTI = 0x0C  # character timeout
IIR_FIFO_BITS = 0xC0

FCR_ENABLE = 0x01
FCR_RX_RESET = 0x02
FCR_TX_RESET = 0x04
FCR_DMA = 0x08
FCR_TRIGGER = 0xC0

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTA = 0x0F

FIFO_SIZE = 16
RX_TRIGGER_LEVELS = (1, 4, 8, 14)
DEFAULT_DIVISOR = 12  # 1.8432 MHz / 16 / 9600 baud

#: the legacy COM ports (acrn-dm uart_core.c: base, ISA IRQ)
COM_PORTS: dict[str, tuple[int, int]] = {
    "com1": (0x3F8, 4),
    "com2": (0x2F8, 3),
    "com3": (0x3E8, 6),
    "com4": (0x2E8, 7),
    "com5": (0x9000, 10),
}
UART_IO_SIZE = 8


def _modem_status(mcr: int) -> int:
    """MSR's status bits: loopback mirrors MCR; otherwise carrier and DSR always on,
    so a guest tty open never waits for a modem (acrn-dm does the same)."""
    if mcr & MCR_LOOP:
        msr = 0
        if mcr & MCR_RTS:
            msr |= MSR_CTS
        if mcr & MCR_DTR:
            msr |= MSR_DSR
        if mcr & MCR_OUT1:
            msr |= MSR_RI
        if mcr & MCR_OUT2:
            msr |= MSR_DCD
        return msr
    return MSR_DCD | MSR_DSR


class Uart8250:
    """The register file of one 16550A.  ``pulse`` raises the IRQ edge; ``transmit``
    takes each byte the guest sends (outside loopback).

    ``vcpu_safe``: the registers are plain state and the callbacks are safe off the loop
    (the backend wakes its tasks with ``loopgate.on_loop``), so a guest's port accesses
    are answered on the vCPU thread while the loop sleeps (``loopgate.py``)."""

    vcpu_safe = True

    def __init__(
        self,
        name: str,
        pulse: Callable[[], None],
        transmit: Callable[[int], None],
    ) -> None:
        self.name = name
        self._pulse = pulse
        self._transmit = transmit
        self._rx: deque[int] = deque()
        self.rx_space_changed: Callable[[], None] = lambda: None
        self.interrupts = 0
        self._line = False
        self.reset()

    # --- state ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on state (also the VM reset state)."""
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.fcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = _modem_status(0)
        self.scr = 0
        self.dll = DEFAULT_DIVISOR & 0xFF
        self.dlm = DEFAULT_DIVISOR >> 8
        self._rx.clear()
        self._thre_pending = False
        self._line = False
        self.rx_space_changed()

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & FCR_ENABLE)

    @property
    def rx_capacity(self) -> int:
        """Bytes the receive side holds: the FIFO, or one holding register in 16450 mode."""
        return FIFO_SIZE if self.fifo_enabled else 1

    def rx_space(self) -> int:
        """How many bytes the backend may deliver now (none in loopback: the line is
        disconnected from the outside then)."""
        if self.mcr & MCR_LOOP:
            return 0
        return max(0, self.rx_capacity - len(self._rx))

    @property
    def divisor(self) -> int:
        return self.dll | (self.dlm << 8)

    def receive(self, data: bytes) -> int:
        """Bytes from the host into the receive FIFO; returns how many were taken."""
        n = min(len(data), self.rx_space())
        if n:
            self._rx.extend(data[:n])
            self._update_irq()
        return n

    # --- interrupt logic ------------------------------------------------------------------
    def _rx_trigger(self) -> int:
        if not self.fifo_enabled:
            return 1
        return RX_TRIGGER_LEVELS[(self.fcr & FCR_TRIGGER) >> 6]

    def _reason(self) -> int:
        ier = self.ier
        if self.lsr & LSR_OE and ier & IER_ELSI:
            return IIR_RLS
        if self._rx and ier & IER_ERDAI:
            # below the trigger level a real 16550A raises the timeout interrupt after
            # four character times; the host gives us no more bytes meanwhile, so say so now
            return IIR_RDA if len(self._rx) >= self._rx_trigger() else IIR_CTI
        if self._thre_pending and ier & IER_ETHREI:
            return IIR_THRE
        if self.msr & MSR_DELTA and ier & IER_EMSI:
            return IIR_MSR
        return IIR_NOPEND

    def _update_irq(self) -> None:
        level = self._reason() != IIR_NOPEND
        if level and not self._line:
            self.interrupts += 1
            self._pulse()
        self._line = level

    # --- bus handler ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size == 1:
            return self._read8(offset)
        if size == 2 and offset < UART_IO_SIZE - 1:
            lo = self._read8(offset)
            return lo | (self._read8(offset + 1) << 8)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1:
            self._write8(offset, value & 0xFF)
        elif size == 2 and offset < UART_IO_SIZE - 1:
            self._write8(offset, value & 0xFF)
            self._write8(offset + 1, (value >> 8) & 0xFF)

    def _read8(self, offset: int) -> int:
        if self.lcr & LCR_DLAB and offset in (REG_DATA, REG_IER):
            return self.dll if offset == REG_DATA else self.dlm
        if offset == REG_DATA:
            value = 0
            if self._rx:
                value = self._rx.popleft()
                self.rx_space_changed()
        elif offset == REG_IER:
            value = self.ier
        elif offset == REG_IIR:
            reason = self._reason()
            if reason == IIR_THRE:
                self._thre_pending = False  # reading IIR acknowledges THRE
            value = reason | (IIR_FIFO_BITS if self.fifo_enabled else 0)
        elif offset == REG_LCR:
            value = self.lcr
        elif offset == REG_MCR:
            value = self.mcr
        elif offset == REG_LSR:
            value = self.lsr | LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
            self.lsr &= ~LSR_OE
        elif offset == REG_MSR:
            value = self.msr
            self.msr &= ~MSR_DELTA
        elif offset == REG_SCR:
            value = self.scr
        else:
            value = 0xFF
        self._update_irq()
        return value

    def _write8(self, offset: int, value: int) -> None:
        if self.lcr & LCR_DLAB and offset in (REG_DATA, REG_IER):
            if offset == REG_DATA:
                self.dll = value
            else:
                self.dlm = value
            return
        if offset == REG_DATA:
            # THR is full for an instant: INTR may fall, so the THRE that follows makes a
            # fresh edge, as it does on the chip
            self._thre_pending = False
            self._update_irq()
            if self.mcr & MCR_LOOP:
                if len(self._rx) < self.rx_capacity:
                    self._rx.append(value)
                else:
                    self.lsr |= LSR_OE
            else:
                self._transmit(value)
            self._thre_pending = True  # the byte left at once
        elif offset == REG_IER:
            if not self.ier & IER_ETHREI and value & IER_ETHREI:
                self._thre_pending = True
            self.ier = value & 0x0F
        elif offset == REG_IIR:
            self._write_fcr(value)
        elif offset == REG_LCR:
            self.lcr = value
        elif offset == REG_MCR:
            self._write_mcr(value)
        elif offset == REG_SCR:
            self.scr = value
        # LSR and MSR are read-only
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        if (self.fcr ^ value) & FCR_ENABLE:
            self._rx.clear()  # switching between 16450 and FIFO mode empties the FIFO
            self.rx_space_changed()
        if not value & FCR_ENABLE:
            self.fcr = 0
            return
        if value & FCR_RX_RESET:
            self._rx.clear()
            self.rx_space_changed()
        self.fcr = value & (FCR_ENABLE | FCR_DMA | FCR_TRIGGER)

    def _write_mcr(self, value: int) -> None:
        was_loop = self.mcr & MCR_LOOP
        self.mcr = value & 0x1F
        new = _modem_status(self.mcr)
        old = self.msr
        delta = 0
        if (new ^ old) & MSR_CTS:
            delta |= MSR_DCTS
        if (new ^ old) & MSR_DSR:
            delta |= MSR_DDSR
        if (new ^ old) & MSR_DCD:
            delta |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:
            delta |= MSR_TERI
        self.msr = (old & MSR_DELTA) | delta | new
        if was_loop != (self.mcr & MCR_LOOP):
            self.rx_space_changed()
