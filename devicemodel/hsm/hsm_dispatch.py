"""The HSM's half of a request (acrn-facts §1.5 step 2, §2.1), for backends that play HSM.

A software backend that posts guest accesses into the request page must do what the HSM
kernel module does before the device model sees a slot: keep the cached CF8 value and
answer CF8 itself, turn a CFC..CFF access into a PCICFG request in place (or complete it
in the kernel when the enable bit is clear), let an ioeventfd swallow a matching write,
and complete everything at once while the VM is being cleared.  ``HsmDispatcher`` does
exactly that on one slot; the caller owns the slot and its wake-up.

It is called from vCPU threads: the registration list is replaced, never mutated, so a
thread iterating an old tuple is safe without a lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import abi

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
_CONFIG_PORTS = frozenset((PCI_CONFIG_ADDRESS, *range(PCI_CONFIG_DATA, PCI_CONFIG_DATA + 4)))

_U32 = abi.SLOT_U32
_U64 = abi.SLOT_U64
_PROCESSED = abi.SLOT_PROCESSED_OFF
_VALUE = abi.SLOT_VALUE_OFF
_TYPE = abi.SLOT_TYPE_OFF
_BDFR = abi.SLOT_PCI_BDFR_OFF
_COMPLETE = abi.IOREQ_STATE_COMPLETE
_PIO = abi.IOREQ_TYPE_PORTIO
_WRITE = abi.IOREQ_DIR_WRITE


@dataclass(frozen=True)
class IoEventFdReg:
    """One ioeventfd registration, as ACRN's in-kernel ioeventfd client keeps it."""

    fd: int
    address: int
    length: int
    pio: bool
    datamatch: int | None


def cf8_to_pcicfg(cf8: int, port: int) -> tuple[int, int, int, int]:
    """(bus, dev, func, reg) for an access to ``port`` (0xCFC..0xCFF) with CF8 = ``cf8``."""
    bus = (cf8 >> 16) & 0xFF
    dev = (cf8 >> 11) & 0x1F
    func = (cf8 >> 8) & 0x7
    reg = (cf8 & 0xFC) + ((cf8 >> 16) & 0xF00) + (port - PCI_CONFIG_DATA)
    return bus, dev, func, reg


class HsmDispatcher:
    """Per-VM HSM state: the cached PCI config address, ioeventfds, the clearing flag."""

    def __init__(self) -> None:
        self.pci_conf_addr = 0
        self.clearing = False
        self._ioeventfds: tuple[IoEventFdReg, ...] = ()
        #: the same, indexed for the hot path (replaced with the tuple): writes by
        #: (pio, address); every (pio, byte) some registration covers, for reads
        self._writes: dict[tuple[bool, int], tuple[IoEventFdReg, ...]] = {}
        self._covered: frozenset[tuple[bool, int]] = frozenset()
        #: every port and MMIO address ``dispatch`` may claim while not clearing: a
        #: request thread skips the call for any other (nearly every request)
        self.claimed_pio: frozenset[int] = _CONFIG_PORTS
        self.claimed_mmio: frozenset[int] = frozenset()

    # --- ioeventfd registrations ----------------------------------------------------------
    @property
    def ioeventfds(self) -> tuple[IoEventFdReg, ...]:
        return self._ioeventfds

    def find_ioeventfd(self, reg: IoEventFdReg) -> IoEventFdReg | None:
        """The registration with the same (fd, address, type, data), if any."""
        for r in self._ioeventfds:
            if (r.fd, r.address, r.pio, r.datamatch) == (
                reg.fd, reg.address, reg.pio, reg.datamatch
            ):
                return r
        return None

    def add_ioeventfd(self, reg: IoEventFdReg) -> None:
        self._replace((*self._ioeventfds, reg))

    def remove_ioeventfd(self, reg: IoEventFdReg) -> None:
        self._replace(tuple(r for r in self._ioeventfds if r is not reg))

    def _replace(self, regs: tuple[IoEventFdReg, ...]) -> None:
        writes: dict[tuple[bool, int], tuple[IoEventFdReg, ...]] = {}
        for r in regs:
            writes[(r.pio, r.address)] = (*writes.get((r.pio, r.address), ()), r)
        # the indexes first: a vCPU thread reading them with the old tuple is still right
        self._writes = writes
        self._covered = frozenset((r.pio, a) for r in regs
                                  for a in range(r.address, r.address + r.length))
        self.claimed_pio = _CONFIG_PORTS | {a for pio, a in self._covered if pio}
        self.claimed_mmio = frozenset(a for pio, a in self._covered if not pio)
        self._ioeventfds = regs

    def reset(self) -> None:
        """RESET_VM: forget the cached CF8 (registrations stay, as in the HSM)."""
        self.pci_conf_addr = 0

    # --- one slot ---------------------------------------------------------------------------
    def dispatch(self, page: memoryview, off: int, rtype: int, direction: int, address: int,
                 size: int, value: int) -> bool:
        """Handle the PENDING slot at ``off`` the way the HSM would.

        Returns True when the request was completed here (state COMPLETE, value written for
        reads); False when it must go to the device model (possibly rewritten to PCICFG).
        Never True for an address outside ``claimed_pio``/``claimed_mmio`` unless
        ``clearing``.
        """
        if self.clearing:
            _U32.pack_into(page, off + _PROCESSED, _COMPLETE)
            return True
        pio = rtype == _PIO
        if pio and address == PCI_CONFIG_ADDRESS and size == 4:
            if direction == _WRITE:
                self.pci_conf_addr = value & 0xFFFF_FFFF
            else:
                _U32.pack_into(page, off + _VALUE, self.pci_conf_addr)
            _U32.pack_into(page, off + _PROCESSED, _COMPLETE)
            return True
        if pio and PCI_CONFIG_DATA <= address <= PCI_CONFIG_DATA + 3:
            cf8 = self.pci_conf_addr
            if not cf8 & 0x8000_0000:
                if direction == abi.IOREQ_DIR_READ:
                    _U32.pack_into(page, off + _VALUE, 0xFFFF_FFFF)
                _U32.pack_into(page, off + _PROCESSED, _COMPLETE)
                return True
            _U32.pack_into(page, off + _TYPE, abi.IOREQ_TYPE_PCICFG)
            for i, v in enumerate(cf8_to_pcicfg(cf8, address)):
                _U32.pack_into(page, off + _BDFR + 4 * i, v)
            return False
        if direction == _WRITE:
            for r in self._writes.get((pio, address), ()):
                if r.length >= size and (r.datamatch is None or r.datamatch == value):
                    try:
                        os.eventfd_write(r.fd, 1)
                    except OSError:
                        pass
                    _U32.pack_into(page, off + _PROCESSED, _COMPLETE)
                    return True
        elif (pio, address) in self._covered:
            for r in self._ioeventfds:
                if r.pio == pio and r.address <= address and address + size <= r.address + r.length:
                    _U64.pack_into(page, off + _VALUE, 0)
                    _U32.pack_into(page, off + _PROCESSED, _COMPLETE)
                    return True
        return False
