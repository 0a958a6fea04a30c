"""PCI config writes and BAR moves across every emulated function of a real VM.

Random config writes (biased to BARs, the command register and the capability chain,
with BAR values that land on other devices' BARs, sizing writes and all-ones) never raise;
IDs and the capability chain stay as built; a BAR is registered on a bus only while its
decoding is on, and the registration is where the BAR says (no stale ranges); after a VM
reset the buses hold exactly the power-on registrations again.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ._common import count, fuzz_settings
from ._vm import build_vm, reset_vm


@pytest.fixture(scope="module")
def vm():
    vm, _ = build_vm()
    yield vm
    vm._release()


def registrations(vm) -> set[tuple[str, int, int, str]]:
    return ({("io", r.base, r.length, r.name) for r in vm.ports.ranges()}
            | {("mmio", r.base, r.length, r.name) for r in vm.mmio.ranges()})


def cap_chain(dev) -> list[tuple[int, int]]:
    out = []
    pos = dev.cfg.get8(0x34)
    for _ in range(48):
        if pos < 0x40:
            break
        out.append((pos, dev.cfg.get8(pos)))
        pos = dev.cfg.get8(pos + 1)
    return out


regs = st.one_of(
    st.sampled_from([0x04, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30, 0x3C, 0x06]),
    st.integers(0x10, 0x27),
    st.integers(0x40, 0xFF),
    st.integers(0, 0xFFF),
)
values = st.one_of(
    st.sampled_from([0, 0xFFFF_FFFF, 0x7, 0x6, 0x1, 0x2, 0x400, 0x8000_0000, 0x8000_1000,
                     0x2000, 0x3000, 0x3F8, 0xCF8, 0xE000_0000, 0xFFFF_FFFE, 0x8000]),
    st.integers(0, 0xFFFF_FFFF),
)
op = st.tuples(st.integers(0, 99), regs, st.sampled_from([4, 4, 2, 1, 3]), values,
               st.booleans())


@fuzz_settings(60)
@given(ops=st.lists(op, min_size=1, max_size=60))
def test_config_writes_and_bar_moves(vm, ops):
    count("pci.config")
    funcs = vm.pci.functions()
    reset_vm(vm)
    power_on = registrations(vm)
    ids = {bdf: (d.cfg.vendor_id, d.cfg.device_id, d.cfg.class_code, cap_chain(d))
           for bdf, d in funcs}
    for which, reg, size, value, read_back in ops:
        (b, d, f), dev = funcs[which % len(funcs)]
        reg &= ~(size - 1) if size in (1, 2, 4) else 0xFFF
        vm.pci.cfg_write(b, d, f, reg, size, value & 0xFFFF_FFFF)
        if read_back:
            got = vm.pci.cfg_read(b, d, f, reg, size)
            assert 0 <= got <= 0xFFFF_FFFF
        check(vm, funcs, ids)
    reset_vm(vm)
    assert registrations(vm) == power_on


def check(vm, funcs, ids) -> None:
    for bdf, dev in funcs:
        assert (dev.cfg.vendor_id, dev.cfg.device_id, dev.cfg.class_code,
                cap_chain(dev)) == ids[bdf], f"{dev.name}: read-only fields changed"
        for bar in dev.bars:
            if not bar.trap:
                continue
            bus = vm.ports if bar.is_io else vm.mmio
            if bar.mapped_at is None:
                continue
            assert dev.decoding(bar), f"{dev.name} BAR{bar.idx} decoded with decoding off"
            r = bus.find(bar.mapped_at, 1)
            assert r is not None and r.handler is bar and r.base == bar.mapped_at
            if not any(bar.sizing):
                assert bar.mapped_at == bar.addr, f"{dev.name} BAR{bar.idx} stale mapping"
    for r in [*vm.ports.ranges(), *vm.mmio.ranges()]:
        owner = getattr(r.handler, "owner", None)
        if owner is not None:
            assert r.handler.mapped_at == r.base
