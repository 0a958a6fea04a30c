"""The guest-side PCI enumerator (tests/support/pci_guest.py, what Linux does in
drivers/pci/probe.c) sees what acrn-dm builds."""

from __future__ import annotations

from tests.support.pci_guest import sim_vm


async def test_enumeration_sees_what_acrn_dm_builds() -> None:
    async with sim_vm("0:0,hostbridge", "3,dummy") as (_, _, guest):
        funcs = await guest.scan()
        assert [(f.dev, f.func) for f in funcs] == [(0, 0), (3, 0)]
        hb, dummy = funcs
        assert (hb.vendor, hb.device, hb.class_code, hb.header) == (0x1275, 0x1275, 0x060000, 0)
        assert hb.bars == [] and hb.caps == [(0x40, 0x10)]
        assert (dummy.vendor, dummy.device, dummy.class_code) == (0x10DD, 0x0001, 0x020000)
        assert [(b.idx, b.io, b.addr, b.size) for b in dummy.bars] == [
            (0, True, 0x2000, 8), (1, False, 0x8000_0000, 4096), (2, False, 0x8000_1000, 4096)]
        assert dummy.caps == [(0x40, 0x05)]
