"""PCI config writes and BAR moves across every emulated function of a real VM.

Random config writes (biased to BARs, the command register and the capability chain,
with BAR values that land on other devices' BARs, sizing writes and all-ones) never raise;
IDs and the capability chain stay as built; a BAR is registered on a bus only while its
decoding is on, and the registration is where the BAR says (no stale ranges); after a VM
reset the buses hold exactly the power-on registrations again, and the IDs and chains are
those the VM was built with.

The writes come from one 64-bit seed expanded by ``random.Random`` (``_ops``) with the
biases the old hypothesis strategies had: hypothesis decoding nested lists of tuples cost
more per input than the writes themselves, so a long run of a million inputs took hours.
"""

from __future__ import annotations

import random
from operator import itemgetter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.pci.config import CMD_IO, CMD_MEM

from ._common import count, fuzz_settings
from ._vm import build_vm, reset_vm


class _Built:
    """The VM and what it looked like at power-on (IDs, capability chains, bus ranges),
    computed once per process: every input must come back to exactly this."""

    def __init__(self) -> None:
        self.vm, _ = build_vm()
        self.clean = False
        self.funcs = self.vm.pci.functions()
        self.power_on = registrations(self.vm)
        self.ids = {bdf: (d.cfg.vendor_id, d.cfg.device_id, d.cfg.class_code, cap_chain(d))
                    for bdf, d in self.funcs}
        # The fields above are fixed bytes of config space (IDs, class code, the pointer
        # at 0x34 and the ID/next bytes of each capability on the chain): comparing those
        # bytes is the same check as re-walking the chain, at a fraction of the cost.
        self.fixed = []
        for _, d in self.funcs:
            at = [0, 1, 2, 3, 9, 10, 11, 0x34]
            at += [b for pos, _ in cap_chain(d) for b in (pos, pos + 1)]
            get = itemgetter(*at)
            self.fixed.append((d, get, get(d.cfg.data)))
        self.bars = [(d, [(bar, (self.vm.ports if bar.is_io else self.vm.mmio).find,
                           CMD_IO if bar.is_io else CMD_MEM)
                          for bar in d.bars if bar.trap])
                     for _, d in self.funcs]


@pytest.fixture(scope="module")
def built():
    b = _Built()
    yield b
    b.vm._release()


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


REGS = (0x04, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30, 0x3C, 0x06)
VALUES = (0, 0xFFFF_FFFF, 0x7, 0x6, 0x1, 0x2, 0x400, 0x8000_0000, 0x8000_1000,
          0x2000, 0x3000, 0x3F8, 0xCF8, 0xE000_0000, 0xFFFF_FFFE, 0x8000)
SIZES = (4, 4, 2, 1, 3)
assert len(VALUES) == 16  # _ops indexes it with 4 random bits


def _reg(rnd: random.Random) -> int:
    k = rnd.getrandbits(2)
    if k == 0:
        return REGS[int(rnd.random() * len(REGS))]  # header registers that move things
    if k == 1:
        return 0x10 + rnd.getrandbits(5) % 0x18         # anywhere in the BARs, unaligned too
    if k == 2:
        return 0x40 + rnd.getrandbits(8) % 0xC0         # the capability chain
    return rnd.getrandbits(12)                          # anywhere, extended space included


def _ops(seed: int) -> list[tuple[int, int, int, int, bool]]:
    """1..60 writes (which function, register, size, value, read back?): mostly short
    runs as hypothesis drew them (geometric, about 6), one in 16 up to 60. Drawn with
    getrandbits and random(), not choice/randrange, which would cost more than the writes;
    a quarter of the free values are small, as hypothesis' integers lean to them."""
    rnd = random.Random(seed)
    if rnd.getrandbits(4):
        n = 1
        while n < 60 and rnd.random() < 5 / 6:
            n += 1
    else:
        n = 60 if rnd.getrandbits(1) else 1 + rnd.getrandbits(6) % 60
    bits = rnd.getrandbits
    return [(bits(7) % 100, _reg(rnd), SIZES[int(rnd.random() * 5)],
             VALUES[bits(4)] if bits(1) else bits(32 if bits(2) else (1, 4, 8, 16)[bits(2)]),
             bool(bits(1)))
            for _ in range(n)]


@fuzz_settings(60)
@given(seed=st.integers(0, 2**64 - 1))
def test_config_writes_and_bar_moves(built, seed):
    count("pci.config")
    vm, funcs = built.vm, built.funcs
    if not built.clean:  # the input before failed half-way (a clean one ends in a reset)
        reset_vm(vm)
    built.clean = False
    assert registrations(vm) == built.power_on
    for which, reg, size, value, read_back in _ops(seed):
        (b, d, f), dev = funcs[which % len(funcs)]
        reg &= ~(size - 1) if size in (1, 2, 4) else 0xFFF
        vm.pci.cfg_write(b, d, f, reg, size, value & 0xFFFF_FFFF)
        if read_back:
            got = vm.pci.cfg_read(b, d, f, reg, size)
            assert 0 <= got <= 0xFFFF_FFFF
        quick_check(vm, built)
    reset_vm(vm)
    assert registrations(vm) == built.power_on
    check(vm, funcs, built.ids)
    built.clean = True


def quick_check(vm, built: _Built) -> None:
    """``check`` with the IDs and chains compared as the bytes they are read from and the
    command register read once per function (it runs after every write)."""
    for dev, get, want in built.fixed:
        assert get(dev.cfg.data) == want, f"{dev.name}: read-only fields changed"
    for dev, bars in built.bars:
        data = dev.cfg.data
        command = data[4] | data[5] << 8
        for bar, find, bit in bars:
            at = bar.mapped_at
            if at is None:
                continue
            assert command & bit, f"{dev.name} BAR{bar.idx} decoded with decoding off"
            r = find(at, 1)
            assert r is not None and r.handler is bar and r.base == at
            if not any(bar.sizing):
                assert at == bar.addr, f"{dev.name} BAR{bar.idx} stale mapping"
    for bus in (vm.ports, vm.mmio):
        for r in bus._ranges:  # noqa: SLF001 - read-only, without ranges()' copy
            if getattr(r.handler, "owner", None) is not None:
                assert r.handler.mapped_at == r.base


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
