"""Guest RAM: acrn-dm's layout, bounds and overflow checks, the e820 table, -m parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.memory import (
    E820_RAM,
    E820_RESERVED,
    GiB,
    GuestMemory,
    GuestMemoryError,
    MiB,
    parse_memsize,
)


def test_small_vm_is_all_lowmem():
    mem = GuestMemory(256 * MiB)
    try:
        assert [(r.gpa, r.size) for r in mem.regions] == [(0, 256 * MiB)]
        mem.write(0x1000, b"hello")
        assert mem.read(0x1000, 5) == b"hello"
        mem.write_u64(256 * MiB - 8, 0x1122334455667788)
        assert mem.read_u64(256 * MiB - 8) == 0x1122334455667788
        with pytest.raises(GuestMemoryError):
            mem.view(256 * MiB - 4, 8)
    finally:
        mem.close()


def test_large_vm_splits_at_2g_and_continues_at_4g():
    mem = GuestMemory(3 * GiB)
    try:
        assert [(r.gpa, r.size) for r in mem.regions] == [(0, 2 * GiB), (4 * GiB, 1 * GiB)]
        mem.write_u32(4 * GiB, 0xABCD)
        assert mem.read_u32(4 * GiB) == 0xABCD
        for bad in (2 * GiB, 3 * GiB, 5 * GiB, 2 * GiB - 2):
            with pytest.raises(GuestMemoryError):
                mem.view(bad, 4)
        e820 = mem.e820()
        assert (0xE000_0000, 0x2000_0000, E820_RESERVED) in [
            (e.addr, e.size, e.type) for e in e820
        ]
        ram = sum(e.size for e in e820 if e.type == E820_RAM)
        assert ram == 3 * GiB - 0x60000  # the legacy hole below 1 MiB is not RAM
    finally:
        mem.close()


@given(gpa=st.integers(-(2**65), 2**65), length=st.integers(-(2**65), 2**65))
def test_view_never_escapes_guest_ram(gpa, length):
    mem = _shared_mem()
    try:
        v = mem.view(gpa, length)
    except GuestMemoryError:
        return
    assert gpa >= 0 and gpa + length <= 128 * MiB and len(v) == length


_MEM: list[GuestMemory] = []


def _shared_mem() -> GuestMemory:
    if not _MEM:
        _MEM.append(GuestMemory(128 * MiB))
    return _MEM[0]


@pytest.mark.parametrize(
    "text,size",
    [("256M", 256 * MiB), ("1G", GiB), ("131072K", 128 * MiB), ("4096m", 4 * GiB)],
)
def test_memsize_units(text, size):
    assert parse_memsize(text) == size


@pytest.mark.parametrize("text", ["", "M", "12X", "-5M", "1.5G"])
def test_memsize_garbage_is_refused(text):
    with pytest.raises(ValueError):
        parse_memsize(text)


def test_memsize_limits():
    with pytest.raises(ValueError, match="minimum"):
        GuestMemory(64 * MiB)
    with pytest.raises(ValueError, match="2 MiB"):
        GuestMemory(129 * MiB)
