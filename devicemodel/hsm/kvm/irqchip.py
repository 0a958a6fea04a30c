"""KVM's in-kernel interrupt controllers (PIC, IOAPIC, LAPIC) and PIT, seen through ACRN's
interrupt calls: the GSI routing table, SET_IRQLINE's pin levels, MSI injection, and
the power-on state RESET_VM goes back to.
"""

from __future__ import annotations

import errno
import logging
import struct

from .. import abi
from ..base import HypervisorError
from . import uapi as k
from .syscall import ioctl

log = logging.getLogger(__name__)

#: ACRN's vIOAPIC pin count (acrn-facts §1.3): the GSIs SET_IRQLINE accepts
VIOAPIC_PINS = 48
#: GSIs 0-15 are the ISA IRQs (PIC and IOAPIC); PCI INTx lines start at 16
LEGACY_GSIS = 16
#: first GSI given to MSI routes (0..23 are the PIC/IOAPIC pins)
FIRST_MSI_GSI = k.KVM_IOAPIC_NUM_PINS
#: how many MSI routes (one per irqfd) the table holds at most
MAX_MSI_ROUTES = 4096
#: an IOAPIC RTE as reset leaves it (masked, everything else 0): never programmed
_RTE_POWER_ON = 1 << 16
#: GSI_* op → the pin levels it drives, in order
_IRQLINE_LEVELS = {
    abi.GSI_SET_HIGH: (1,),
    abi.GSI_SET_LOW: (0,),
    abi.GSI_RAISING_PULSE: (1, 0),
    abi.GSI_FALLING_PULSE: (0, 1),
}
_RTE = struct.Struct("<Q")


def _ioapic_pin(gsi: int) -> int:
    """The IOAPIC pin a GSI drives: the MADT overrides ISA IRQ0 to pin 2 (see set_routing)."""
    return 2 if gsi == 0 else gsi


class Irqchip:
    """The VM's in-kernel irqchip and PIT, and the GSI routing table KVM keeps for them."""

    def __init__(self, vm_fd: int) -> None:
        self._vm_fd = vm_fd
        #: MSI routes by GSI: (address, data)
        self._msi_routes: dict[int, tuple[int, int]] = {}
        self._power_on: list[k.KvmIrqchip] = []
        self._pit_power_on: k.KvmPitState2 | None = None
        self._undeliverable: set[int] = set()

    def create(self) -> None:
        """KVM_CREATE_IRQCHIP, the routing table, then the PIT (its GSI 0 must already
        reach IOAPIC pin 2, as the MADT says)."""
        ioctl(self._vm_fd, k.KVM_CREATE_IRQCHIP, None, "KVM_CREATE_IRQCHIP")
        self._set_routing()
        pit = k.KvmPitConfig()
        pit.flags = k.KVM_PIT_SPEAKER_DUMMY
        ioctl(self._vm_fd, k.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")

    # --- power-on state ---------------------------------------------------------------
    def save_power_on(self) -> None:
        """Remember the PIC, IOAPIC and PIT state for ``restore_power_on``."""
        for chip_id in (k.KVM_IRQCHIP_PIC_MASTER, k.KVM_IRQCHIP_PIC_SLAVE,
                        k.KVM_IRQCHIP_IOAPIC):
            chip = k.KvmIrqchip()
            chip.chip_id = chip_id
            ioctl(self._vm_fd, k.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
            self._power_on.append(chip)
        self._pit_power_on = k.KvmPitState2()
        ioctl(self._vm_fd, k.KVM_GET_PIT2, self._pit_power_on, "KVM_GET_PIT2")

    def restore_power_on(self) -> None:
        for chip in self._power_on:
            ioctl(self._vm_fd, k.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")
        if self._pit_power_on is not None:
            ioctl(self._vm_fd, k.KVM_SET_PIT2, self._pit_power_on, "KVM_SET_PIT2")

    # --- GSI routing --------------------------------------------------------------------
    def add_msi_route(self, address: int, data: int) -> int:
        """A new GSI whose route is the MSI (address, data); it is live on return."""
        gsi = next((g for g in range(FIRST_MSI_GSI, FIRST_MSI_GSI + MAX_MSI_ROUTES)
                    if g not in self._msi_routes), None)
        if gsi is None:
            raise HypervisorError("GSI routing: no free GSI for an MSI route", errno.ENOSPC)
        self._msi_routes[gsi] = (address, data)
        try:
            self._set_routing()
        except HypervisorError:
            del self._msi_routes[gsi]
            raise
        return gsi

    def remove_msi_route(self, gsi: int) -> None:
        if self._msi_routes.pop(gsi, None) is not None:
            self._set_routing()

    def _set_routing(self) -> None:
        """KVM_SET_GSI_ROUTING replaces the whole table: the PIC/IOAPIC routes plus one
        route per MSI GSI.

        KVM's default table would send GSI 0 (where the in-kernel PIT raises ISA IRQ0) to
        IOAPIC pin 0, but the MADT, like acrn-dm's and QEMU's, overrides IRQ0 to GSI 2:
        so GSI 0 goes to PIC pin 0 and IOAPIC pin 2, as QEMU routes it. GSI 2 stays IOAPIC
        pin 2 (no PIC cascade pin), so SET_IRQLINE still drives pin n for every n but 0."""
        entries: list[tuple[int, int, int, int]] = []
        for gsi in range(k.KVM_IOAPIC_NUM_PINS):
            if gsi < LEGACY_GSIS and gsi != 2:
                chip = k.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else k.KVM_IRQCHIP_PIC_SLAVE
                entries.append((gsi, k.KVM_IRQ_ROUTING_IRQCHIP, chip, gsi % 8))
            entries.append((gsi, k.KVM_IRQ_ROUTING_IRQCHIP, k.KVM_IRQCHIP_IOAPIC,
                            _ioapic_pin(gsi)))
        for gsi, (address, data) in self._msi_routes.items():
            entries.append((gsi, k.KVM_IRQ_ROUTING_MSI, address, data))
        table = k.kvm_irq_routing(len(entries))
        for i, (gsi, kind, a, b) in enumerate(entries):
            e = table.entries[i]
            e.gsi, e.type = gsi, kind
            if kind == k.KVM_IRQ_ROUTING_IRQCHIP:
                e.u.irqchip.irqchip, e.u.irqchip.pin = a, b
            else:
                e.u.msi.address_lo = a & 0xFFFF_FFFF
                e.u.msi.address_hi = a >> 32
                e.u.msi.data = b & 0xFFFF_FFFF
        ioctl(self._vm_fd, k.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    # --- ACRN's interrupt calls ---------------------------------------------------------
    def inject_msi(self, address: int, data: int) -> None:
        msi = k.KvmMsi()
        msi.address_lo = address & 0xFFFF_FFFF
        msi.address_hi = address >> 32
        msi.data = data & 0xFFFF_FFFF
        ioctl(self._vm_fd, k.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    def set_irqline(self, gsi: int, op: int) -> None:
        """Drive a GSI's pin level as ACRN's vIOAPIC sees it.

        ACRN delivers by the pin level and the guest's RTE polarity (an active-low pin is
        asserted by GSI_SET_LOW); KVM's KVM_IRQ_LINE takes the asserted state instead, so
        the level is inverted for a pin the guest programmed active-low."""
        levels = _IRQLINE_LEVELS.get(op)
        if levels is None:
            raise HypervisorError(f"SET_IRQLINE: bad op {op}", errno.EINVAL)
        if not 0 <= gsi < VIOAPIC_PINS:
            raise HypervisorError(f"SET_IRQLINE: GSI {gsi} out of range", errno.EINVAL)
        if gsi >= k.KVM_IOAPIC_NUM_PINS:
            # ACRN's vIOAPIC has 48 pins, KVM's 24: such a line cannot reach the guest
            if gsi not in self._undeliverable:
                self._undeliverable.add(gsi)
                log.warning("GSI %d: KVM's IOAPIC has %d pins; this INTx line is dropped",
                            gsi, k.KVM_IOAPIC_NUM_PINS)
            return
        invert = 1 if self._active_low(gsi) else 0
        line = k.KvmIrqLevel()
        line.irq = gsi
        for level in levels:
            line.level = level ^ invert
            ioctl(self._vm_fd, k.KVM_IRQ_LINE, line, "KVM_IRQ_LINE")

    def _active_low(self, gsi: int) -> bool:
        chip = k.KvmIrqchip()
        chip.chip_id = k.KVM_IRQCHIP_IOAPIC
        ioctl(self._vm_fd, k.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        (rte,) = _RTE.unpack_from(chip.chip, k.IOAPIC_REDIRTBL_OFF + 8 * _ioapic_pin(gsi))
        if rte == _RTE_POWER_ON:
            # not programmed yet: take the polarity the ACPI tables declare (ISA lines high,
            # _PRT's PCI GSIs low), or an idle PCI line would sit asserted in KVM's IRR
            # and fire as soon as the guest unmasks the pin
            return gsi >= LEGACY_GSIS
        return bool(rte & k.IOAPIC_RTE_POLARITY_LOW)
