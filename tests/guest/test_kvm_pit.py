"""The in-kernel PIT seen by a guest that follows the MADT (devicemodel/guestkit/programs/pit.c)."""

from __future__ import annotations

import re
import struct

import pytest

from devicemodel.guestkit.kvm_programs import VERDICT_PASS, build, kvm_skip_reason, run_guest
from devicemodel.platform.acpi import build_madt

SKIP = kvm_skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"no usable KVM: {SKIP}")


def madt_gsi_of_isa_irq(madt: bytes, irq: int) -> int:
    """The GSI the MADT gives an ISA IRQ: its interrupt source override, else the IRQ."""
    off = 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        if kind == 2:
            _, source, gsi, _ = struct.unpack_from("<BBIH", madt, off + 2)
            if source == irq:
                return gsi
        off += length
    return irq


async def test_pit_ticks_arrive_on_the_ioapic_pin_the_madt_names(tmp_path):
    pin = madt_gsi_of_isa_irq(build_madt([0]), 0)
    assert pin == 2  # acrn-dm's override: IRQ0 → GSI 2
    run = await run_guest(build("pit", tmp_path)[1], timeout=15)
    m = re.search(r"pit ioapic pin 02 ticks ([0-9a-f]{2}), pin 00 ticks ([0-9a-f]{2})\n",
                  run.uart.text)
    assert m, (run.uart.text, run.exit_reason)
    on_pin2, on_pin0 = int(m.group(1), 16), int(m.group(2), 16)
    assert (on_pin2 >= 5, on_pin0) == (True, 0)
    assert run.verdict == VERDICT_PASS
