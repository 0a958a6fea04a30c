"""MSI-X table and PBA accesses: every emulated function's MSI-X BAR, and vMSI-X on MSI.

Emulated (``pci/msix.py`` behind each virtio function and the dummy): random table/PBA
reads and writes of every size and alignment, capability-control writes (enable, function
mask) and vector raises. Properties: no exception; every injected MSI is exactly the
entry's (address, data) with the vector unmasked, the function not masked and MSI-X
enabled; read-only bits stay (address bits 1:0, vector control bits 31:1, the PBA); a
pending bit is set only for a vector raised while masked.

vMSI-X on MSI: ``tests/test_passthru_fuzz.py``'s operations and invariants re-run with the
fuzz settings (long mode) on a sim passthrough device.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.pci.caps import MSIX_CTRL_ENABLE, MSIX_CTRL_FMASK
from devicemodel.vm import running
from tests import test_passthru_fuzz as ptf

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
            pba_before = msix.pba
            delivered = msix.send(v)
            if delivered:
                addr, data, vctrl = msix.entry(v)
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


@fuzz_settings(40)
@given(ops=st.lists(ptf.op, max_size=40))
def test_vmsix_on_msi(ops):
    count("msix.vmsix_on_msi")

    async def main() -> None:
        sim = SimHypervisor()
        args = ["-m", "128M", "-s", f"{ptf.SLOT},passthru,sim:{ptf.N},vmsix_on_msi", "vm1"]
        with trio.fail_after(20):
            async with running(args, hypervisor=sim) as vm:
                run_ops(vm, sim, ops)

    trio.run(main)


def run_ops(vm, sim, ops) -> None:
    """The body of tests/test_passthru_fuzz.py's inner loop, for one list of operations."""
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
        ptf.check(dev, host, cap_ro)
