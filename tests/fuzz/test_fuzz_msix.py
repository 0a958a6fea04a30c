"""MSI-X table and PBA accesses: every emulated function's MSI-X BAR, and vMSI-X on MSI.

Emulated (``irq/msix.py`` behind each virtio function and the dummy): random table/PBA
reads and writes of every size and alignment, capability-control writes (enable, function
mask) and vector raises. Properties: no exception; every delivered MSI (injected, or
signalled through the vector's irqfd) is exactly the entry's (address, data) with the
vector unmasked, the function not masked and MSI-X enabled; read-only bits stay (address
bits 1:0, vector control bits 31:1, the PBA); a pending bit is set only for a vector
raised while masked.

vMSI-X on MSI: ``tests/support/vmsix_ops.py``'s operations and invariants re-run with the
fuzz settings (long mode) on a sim passthrough device; the operations come from one seed
(``vmsix_ops``), and one VM serves every input (``PowerOn`` resets it to a fresh build).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.config import parse_args
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.irq.delivery import IrqfdDelivery
from devicemodel.pci.caps import MSIX_CTRL_ENABLE, MSIX_CTRL_FMASK
from devicemodel.vm import Vm
from tests.support import vmsix_ops as ptf

from ._common import count, fuzz_settings
from ._vm import build_vm, reset_vm


@pytest.fixture(scope="module")
def vm_sim():
    vm, sim = build_vm()
    yield vm, sim
    vm._release()


def msix_functions(vm):
    return [(bdf, d) for bdf, d in vm.pci.functions() if d.msix is not None]


op = st.tuples(
    st.sampled_from(["read", "write", "ctrl", "send", "unmask"]),
    st.integers(0, 99),                                     # function
    st.one_of(st.integers(0, 0x60), st.integers(0x7F0, 0x1010), st.integers(0, 0x2000)),
    st.sampled_from([1, 2, 4, 8, 3]),
    st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 0xFFFF_FFFF, 0xFEE0_0000])),
)


@fuzz_settings(80)
@given(ops=st.lists(op, min_size=1, max_size=50))
def test_emulated_msix_table_and_pba(vm_sim, ops):
    count("msix.emulated")
    vm, sim = vm_sim
    reset_vm(vm)
    funcs = msix_functions(vm)
    for _, d in funcs:
        vm.pci.cfg_write(*d.bdf, 0x04, 2, 0x7)
    sim.msis.clear()
    for kind, which, offset, size, value in ops:
        bdf, dev = funcs[which % len(funcs)]
        msix = dev.msix
        bar = dev.bar(msix.table_bar)
        assert bar is not None
        offset %= bar.size
        if kind == "read":
            got = bar.read(offset, size)
            assert 0 <= got < 1 << (8 * max(size, 4))
        elif kind == "write":
            bar.write(offset, size, value & ((1 << 8 * size) - 1))
        elif kind == "ctrl":
            ctrl = [0, MSIX_CTRL_ENABLE, MSIX_CTRL_ENABLE | MSIX_CTRL_FMASK, 0xFFFF][value % 4]
            vm.pci.cfg_write(*bdf, msix.offset + 2, 2, ctrl)
        elif kind == "unmask":
            v = value % msix.entries
            bar.write(16 * v, 4, 0xFEE0_0000 | v << 12)
            bar.write(16 * v + 8, 4, 0x30 + v)
            bar.write(16 * v + 12, 4, 0)
        else:
            v = value % (msix.entries + 2)
            before = len(sim.msis)
            irqfd = msix.delivery if isinstance(msix.delivery, IrqfdDelivery) else None
            irqfd_before = irqfd.sent if irqfd is not None else 0
            pba_before = msix.pba
            delivered = msix.send(v)
            if delivered:
                addr, data, vctrl = msix.entry(v)
                if irqfd is not None and irqfd.sent > irqfd_before:
                    # through the vector's irqfd: its route carries the entry's message
                    assert irqfd.sent == irqfd_before + 1 and len(sim.msis) == before
                    assert irqfd.routes[v] == (addr, data)
                else:
                    assert sim.msis[before:] == [(addr, data)]
                assert msix.enabled and not msix.function_masked and not vctrl & 1
            elif v >= msix.entries or not msix.enabled:
                assert len(sim.msis) == before and msix.pba == pba_before
            else:
                assert msix.pba >> v & 1
        check(msix)


def check(msix) -> None:
    for v in range(msix.entries):
        addr, _, vctrl = msix.entry(v)
        assert addr & 3 == 0 and vctrl & ~1 == 0
    assert msix.pba >> msix.entries == 0


@pytest.fixture(scope="module")
def vmsix_vm():
    """One sim VM with the vMSI-X-on-MSI passthrough device for every input: it is only
    built, never run (the device has no tasks and delivers MSIs synchronously), and
    ``PowerOn`` brings it back to what a fresh build gives before each input."""
    sim = SimHypervisor()
    vm = Vm(parse_args(VMSIX_ARGS), sim)
    vm.build()
    yield PowerOn(vm, sim)
    vm._release()


VMSIX_ARGS = ["-m", "128M", "-s", f"{ptf.SLOT},passthru,sim:{ptf.N},vmsix_on_msi", "vm1"]


class PowerOn:
    """A freshly built VM's state, as far as the device and its interrupts go, for the
    next input: the host function reset (MSI registers, pending bits and doorbell BAR at
    power-on, as the passthrough open resets it), the guest view reset (table masked,
    capability at power-on, routes dropped), no remapper yet (made on the first unmask,
    as in a new VM), no delivered messages. ``test_vmsix_reuse_is_a_fresh_vm`` checks
    the equivalence.

    ``SimHostDevice.reset`` rebuilds its config space through construct (0.13 ms, a
    fifth of an input), so the reset function's bytes are kept once and copied back."""

    def __init__(self, vm: Vm, sim: SimHypervisor) -> None:
        self.vm, self.sim = vm, sim
        self.dev = vm.passthrough(ptf.SLOT)
        host = self.dev.host
        host.reset()
        cs = host.cs
        self._host = (bytes(cs.data), bytes(cs.wmask), bytes(cs.w1cmask), bytes(host.bar0),
                      cs.cap_last, cs.cap_end, cs.extended)
        #: the host's MSI capability, found by a walk of its own (not the device model's
        #: HostMsi): the layout is fixed, the mask register is read live
        self.phys_msi = host.msi
        assert self.phys_msi is not None

    def __call__(self) -> None:
        dev = self.dev
        host = dev.host
        cs = host.cs
        data, wmask, w1c, bar0, *layout = self._host
        assert [cs.cap_last, cs.cap_end, cs.extended] == layout
        cs.data[:], cs.wmask[:], cs.w1cmask[:], host.bar0[:] = data, wmask, w1c, bar0
        host._held = 0
        dev.reset()
        dev.vmsix.routes.close()
        self.sim.msis.clear()


_CFG_BOUNDS = (0, 0xFF, 0x04, ptf.CAP - 4, ptf.CAP, ptf.CAP + 2, ptf.CAP + 0x1C)
_BAR_BOUNDS = (0, 8, 12, 16 * ptf.N, 16 * ptf.N + 8, 0x7F8, 0x800, 0x808, 0x810, 0xFFF)


def _num(rnd: random.Random, lo: int, hi: int) -> int:
    """An integer in lo..hi with hypothesis' biases: the bounds and small values often."""
    r = rnd.random()
    if r < 0.1:
        return lo
    if r < 0.2:
        return hi
    if r < 0.4:
        return min(hi, lo + rnd.randrange(16))
    if r < 0.55 and hi - lo > 0xFF:  # a value of a narrower width: 8, 16 or 32 bits
        return lo + rnd.getrandbits(rnd.choice([8, 16, 32])) % (hi - lo + 1)
    return rnd.randint(lo, hi)


def _cfg_offset(rnd: random.Random) -> int:
    """``ptf.offsets_cfg``: near the capability, the command register, anywhere."""
    which = rnd.randrange(4)
    if which == 0:
        return _num(rnd, ptf.CAP - 4, ptf.CAP + 0x1C)
    if which == 1:
        return 0x04
    if which == 2:
        return rnd.choice(_CFG_BOUNDS)
    return _num(rnd, 0, 0xFF)


def _bar_offset(rnd: random.Random) -> int:
    """``ptf.offsets_bar``: the table, around the PBA, anywhere in the 4 KiB BAR."""
    which = rnd.randrange(4)
    if which == 0:
        return _num(rnd, 0, ptf.N * 16 + 8)
    if which == 1:
        return _num(rnd, 0x7F8, 0x810)
    if which == 2:
        return rnd.choice(_BAR_BOUNDS)
    return _num(rnd, 0, 0xFFF)


def _vmsix_op(rnd: random.Random) -> tuple[str, int, int, int]:
    """One of ``ptf.op``'s seven kinds, with its fields drawn as it draws them."""
    kind = rnd.choice(_VMSIX_KINDS)
    if kind == "cfg":
        return kind, _cfg_offset(rnd), rnd.choice([1, 2, 4]), _num(rnd, 0, 0xFFFF_FFFF)
    if kind == "ctrl":
        return kind, ptf.CAP + 2, 2, rnd.choice([0, 0x4000, 0x8000, 0xC000, 0xFFFF])
    if kind == "bar":
        return kind, _bar_offset(rnd), rnd.choice([1, 2, 4, 8]), _num(rnd, 0, (1 << 64) - 1)
    if kind == "vctrl":
        return kind, rnd.randrange(ptf.N), 4, rnd.randrange(2)
    if kind == "read":
        return kind, _bar_offset(rnd), rnd.choice([1, 2, 4, 8]), 0
    if kind == "fire":
        return kind, rnd.randrange(ptf.N), 0, 0
    return kind, rnd.randrange(ptf.N), 0, _num(rnd, 0x20, 0xFF)  # linux


_VMSIX_KINDS = ("cfg", "ctrl", "bar", "vctrl", "read", "fire", "linux")


def vmsix_ops(seed: int) -> list[tuple[str, int, int, int]]:
    """The operations of ``st.lists(ptf.op, max_size=40)`` from one seed, lengths as
    hypothesis draws them (each element goes on with probability 5/6: five on average,
    often none), and one list in ten of any length up to 40, or the full 40."""
    rnd = random.Random(seed)
    r = rnd.random()
    if r < 0.9:
        n = 0
        while n < 40 and rnd.random() < 5 / 6:
            n += 1
    elif r < 0.97:
        n = rnd.randrange(41)
    else:
        n = 40
    return [_vmsix_op(rnd) for _ in range(n)]


@fuzz_settings(40)
@given(seed=st.integers(0, 2**64 - 1))
def test_vmsix_on_msi(vmsix_vm, seed):
    """``tests/support/vmsix_ops.py``'s operations (``vmsix_ops`` draws them from one
    seed, in plain Python: decoding them through strategies cost more than running
    them) and invariants, each input on a VM in its just-built state."""
    count("msix.vmsix_on_msi")
    vmsix_vm()
    run_ops(vmsix_vm.vm, vmsix_vm.sim, vmsix_ops(seed), vmsix_vm.phys_msi)


def _trace(vm, sim, ops) -> list[object]:
    """Everything the guest and the host device can see after each operation."""
    dev = vm.passthrough(ptf.SLOT)
    out: list[object] = []
    for op in ops:
        run_ops(vm, sim, [op], dev.host.msi)
        out.append((bytes(dev.cfg.data), dev.vmsix.table.snapshot(), dev.vmsix.pending(),
                    bytes(dev.host.cs.data), list(sim.msis), dict(sim.remap_table)))
    return out


def test_vmsix_reuse_is_a_fresh_vm(vmsix_vm):
    """The fuzz target's reset leaves nothing behind: after a run of operations, another
    run on the reused VM sees exactly what it sees on a freshly built one."""
    vm, sim = vmsix_vm.vm, vmsix_vm.sim
    for seed in range(12):
        vmsix_vm()
        run_ops(vm, sim, vmsix_ops(seed + 1000), vmsix_vm.phys_msi)  # leave state behind
        vmsix_vm()
        ops = vmsix_ops(seed)
        reused = _trace(vm, sim, ops)
        fresh_sim = SimHypervisor()
        fresh = Vm(parse_args(VMSIX_ARGS), fresh_sim)
        fresh.build()
        try:
            assert _trace(fresh, fresh_sim, ops) == reused, seed
        finally:
            fresh._release()


def run_ops(vm, sim, ops, phys_msi) -> None:
    """The body of tests/component/test_passthru_fuzz.py's inner loop, for one list of operations;
    ``phys_msi`` reads the host's MSI registers (``ptf.check`` walks the host's
    capabilities to find it after every operation: 0.3 ms each)."""
    dev = vm.passthrough(ptf.SLOT)
    host = dev.host
    pci = vm.pci
    bar = dev.bar(1)
    cap = ptf.CAP
    cap_ro = bytes(dev.cfg.data[cap : cap + 2] + dev.cfg.data[cap + 4 : cap + 12])
    pci.cfg_write(0, ptf.SLOT, 0, 0x04, 2, 0x6)
    for kind, a, size, value in ops:
        if kind in ("cfg", "ctrl"):
            pci.cfg_write(0, ptf.SLOT, 0, a, size, value & ((1 << 8 * size) - 1))
            pci.cfg_read(0, ptf.SLOT, 0, a & ~(size - 1), size)
        elif kind == "bar":
            bar.write(a, size, value & ((1 << 8 * size) - 1))
        elif kind == "vctrl":
            bar.write(16 * a + 12, 4, value)
        elif kind == "read":
            bar.read(a, size)
        elif kind == "linux":
            pci.cfg_write(0, ptf.SLOT, 0, cap + 2, 2, 0x8000)
            bar.write(16 * a, 8, 0xFEE0_0000 | a << 12)
            bar.write(16 * a + 8, 4, value)
            bar.write(16 * a + 12, 4, 0)
        else:
            before = len(sim.msis)
            host.fire(a)
            ctrl = dev.cfg.get16(cap + 2)
            address, data, masked = dev.vmsix.entry(a)
            if len(sim.msis) > before:
                assert ctrl & 0x8000 and not ctrl & 0x4000 and not masked
                assert sim.msis[-1] == (address, data)
        check_vmsix(dev, phys_msi, cap_ro)


def check_vmsix(dev, phys_msi, cap_ro) -> None:
    """``ptf.check``, with the host's MSI capability found once."""
    cap = ptf.CAP
    ctrl = dev.cfg.get16(cap + 2)
    assert ctrl & 0x3FFF == ptf.N - 1
    assert bytes(dev.cfg.data[cap : cap + 2] + dev.cfg.data[cap + 4 : cap + 12]) == cap_ro
    assert dev.cfg.data[cap + 12 : cap + 24] == bytes(12)
    phys_mask = phys_msi.mask
    for k in range(ptf.N):
        _, _, masked = dev.vmsix.entry(k)
        if masked or ctrl & 0x4000 or not ctrl & 0x8000:
            assert phys_mask >> k & 1, f"vector {k} unmasked on the device"
