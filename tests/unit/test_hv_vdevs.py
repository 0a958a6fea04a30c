"""The hypervisor-emulated devices the sim presents (hsm/hv_vdevs.py) and the device
model's ivshmem registers take anything a hostile guest does: any config offset, size and
value, any BAR access, without an exception, and keep their read-only identity."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.context import standalone
from devicemodel.hsm.base import VdevSpec
from devicemodel.hsm.hv_vdevs import view_for
from devicemodel.pci.ivshmem import IvshmemDm, parse_ivshmem_options
from devicemodel.slot import SlotConfig

IVSHMEM = VdevSpec(0x1AF4, 0x1110, 8 << 3, io_addr=(0x80000000, 0x80001000, 0x8020000C, 0,
                                                   0, 0),
                   io_size=(0, 0, 2 << 20, 0, 0, 0), args=b"hv:/pydm_unit")
VUART = VdevSpec(0x9710, 0x9900, 16 << 3, io_addr=(0x80400000, 0x80401000, 0, 0, 0, 0),
                 args=struct.pack("<I", 1))
access = st.tuples(st.booleans(), st.integers(-8, 300), st.sampled_from([0, 1, 2, 3, 4, 8]),
                   st.integers(0, (1 << 64) - 1))


@settings(max_examples=200, deadline=None)
@given(spec=st.sampled_from([IVSHMEM, VUART]), accesses=st.lists(access, max_size=30),
       mmio=st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 0x2000),
                               st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1)),
                     max_size=30))
def test_hostile_config_and_bar_accesses(spec, accesses, mmio):
    view = view_for(spec)
    assert view is not None
    ids = view.cfg_read(0, 4)
    for write, reg, size, value in accesses:
        if reg < 0 or size == 0:
            continue
        if write:
            view.cfg_write(reg, size, value & ((1 << 8 * min(size, 4)) - 1))
        else:
            got = view.cfg_read(reg, min(size, 4) or 1)
            assert 0 <= got < 1 << 32
    assert view.cfg_read(0, 4) == ids  # vendor and device never change
    for write, idx, off, size, value in mmio:
        if idx not in view.bar_sizes or off + size > view.bar_sizes[idx][0]:
            continue
        if write:
            view.mmio_write(idx, off, size, value & ((1 << 8 * size) - 1))
        else:
            assert 0 <= view.mmio_read(idx, off, size) < 1 << (8 * size)


def test_an_unknown_or_badly_sized_device_has_no_view():
    assert view_for(VdevSpec(0x8086, 0x1234, 0)) is None
    assert view_for(VdevSpec(0x1AF4, 0x1110, 0, io_size=(0, 0, 3 << 20, 0, 0, 0))) is None


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 0x100), st.sampled_from([1, 2, 4]),
                              st.integers(0, 2**32 - 1)), max_size=20))
def test_dm_ivshmem_registers(ops):
    """BAR0 as acrn-dm: mask/status/IVPosition read 0, the rest all ones, writes land
    nowhere (outside a VM the shared memory is not even opened)."""
    slot = SlotConfig(0, 9, 0, "ivshmem", "dm:/pydm_unit,2")
    dev = IvshmemDm(standalone(), slot, parse_ivshmem_options(slot.options))
    bar0 = dev.bar(0)
    assert bar0 is not None and dev.memory is None
    for write, off, size, value in ops:
        if write:
            bar0.write(off, size, value)
        else:
            got = bar0.read(off, size)
            assert got == (0 if off in (0, 4, 8) else (1 << 8 * size) - 1)
    dev.close()
