"""ConfigSpace: masks, write-1-to-clear, header helpers, acrn-dm's extended-space answer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from devicemodel.pci import config as pc
from devicemodel.pci.config import ConfigSpace


def test_header_defaults_and_read_only_ids() -> None:
    cs = ConfigSpace()
    cs.set_ids(0x8086, 0x1234, 0x020000, revision=3, subsys_vendor=0x8086, subsys_id=7)
    assert cs.read(0, 4) == 0x1234_8086
    assert cs.read(0x08, 4) == 0x0200_0003
    assert cs.read(0x2C, 4) == 0x0007_8086
    for off in range(0, 0x40, 4):
        if off not in (0x04, 0x0C, 0x3C):
            before = cs.read(off, 4)
            cs.write(off, 4, 0xFFFF_FFFF)
            assert cs.read(off, 4) == before, hex(off)
    cs.write(0x0C, 2, 0xFFFF)  # cache line size, latency timer
    cs.write(0x3C, 2, 0xFFFF)  # interrupt line (pin is read-only)
    assert (cs.read(0x0C, 2), cs.read(0x3C, 2)) == (0xFFFF, 0x00FF)


def test_command_and_status() -> None:
    cs = ConfigSpace()
    cs.write(pc.COMMAND, 2, 0xFFFF)
    assert cs.command == pc.CMD_WRITABLE == 0x077F
    cs.set16(pc.STATUS, 0xF910 | pc.STATUS_INTX)  # device sets error bits
    cs.write(pc.STATUS, 2, 0x0100)  # clear one error bit only
    assert cs.status == 0xF810 | pc.STATUS_INTX
    cs.write(pc.COMMAND, 4, 0xF800_0000)  # dword write: command 0, clear the rest
    assert (cs.command, cs.status) == (0, 0x0010 | pc.STATUS_INTX)


def test_extended_space_as_acrn_dm_answers() -> None:
    cs = ConfigSpace()
    assert [cs.read(0x100, 4), cs.read(0x102, 2), cs.read(0x103, 1)] == [0, 0, 0]
    assert cs.read(0x104, 4) == 0xFFFF_FFFF and cs.read(0xFFF, 1) == 0xFF
    cs.set_wmask(0x100, 4, 0xFFFF_FFFF)
    cs.write(0x100, 4, 0x1234)
    assert cs.read(0x100, 4) == 0
    passthrough = ConfigSpace(extended=True)
    passthrough.set32(0x100, 0x1234_0001)
    assert passthrough.read(0x100, 4) == 0x1234_0001 and passthrough.read(0x200, 4) == 0


def test_multifunction_flag() -> None:
    cs = ConfigSpace()
    cs.multifunction = True
    assert cs.read(pc.HEADER_TYPE, 1) == 0x80 and cs.multifunction
    cs.multifunction = False
    assert cs.read(pc.HEADER_TYPE, 1) == 0


@given(st.integers(0, 4095), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF),
       st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4))
def test_masks_are_exact(off: int, size: int, value: int, wm: bytes, w1c: bytes) -> None:
    off &= ~(size - 1)
    cs = ConfigSpace(extended=True)
    cs.data[off : off + size] = b"\x5a" * size
    cs.wmask[off : off + size] = wm[:size]
    cs.w1cmask[off : off + size] = w1c[:size]
    old = cs.get(off, size)
    wmv = int.from_bytes(wm[:size], "little")
    w1v = int.from_bytes(w1c[:size], "little")
    cs.write(off, size, value)
    v = value & ((1 << 8 * size) - 1)
    assert cs.read(off, size) == ((old & ~wmv) | (v & wmv)) & ~(v & w1v)
