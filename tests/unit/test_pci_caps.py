"""Capabilities: construct layouts round-trip, the chain walker agrees with the real lspci on
this machine's devices, and garbage only ever gives CapabilityError."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.pci import caps
from devicemodel.pci import config as pc
from devicemodel.pci.config import ConfigSpace

SYSFS = sorted(Path("/sys/bus/pci/devices").glob("*/config"))


def _space(*cap_list: caps.CapBytes, vendor: int = 0x10DD) -> tuple[ConfigSpace, list[int]]:
    cs = ConfigSpace()
    cs.set_ids(vendor, 1, 0x020000)
    return cs, [caps.add_capability(cs, c) for c in cap_list]


@pytest.mark.parametrize(("bit64", "maskable", "length"),
                         [(False, False, 10), (True, False, 14), (False, True, 20),
                          (True, True, 24)])
def test_msi_variants(bit64: bool, maskable: bool, length: int) -> None:
    cap = caps.msi_cap(8, bit64=bit64, maskable=maskable)
    assert len(cap.data) == length
    cs, (off,) = _space(cap)
    (found,) = caps.walk(cs.data)
    assert (found.offset, found.cap_id, found.length) == (0x40, caps.CAP_ID_MSI, length)
    assert (found.fields.control >> 1) & 7 == 3
    assert bool(found.fields.control & caps.MSI_CTRL_64BIT) == bit64
    regs = caps.msi_offsets(found.fields.control)
    assert regs.length == length and (regs.mask is not None) == maskable
    with pytest.raises(caps.CapabilityError):
        caps.msi_cap(3)


def test_chain_of_every_kind() -> None:
    cs, offs = _space(
        caps.pm_cap(), caps.msi_cap(4), caps.msix_cap(16, 1), caps.pcie_cap(),
        caps.virtio_cap(caps.VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x38),
        caps.virtio_cap(caps.VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x3000, 0x1000,
                        notify_off_multiplier=4),
        caps.virtio_cap(caps.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0),
        vendor=caps.VIRTIO_VENDOR_ID,
    )
    assert offs == [0x40, 0x48, 0x60, 0x6C, 0xA8, 0xB8, 0xCC]
    assert cs.get8(pc.CAP_PTR) == 0x40 and cs.status & pc.STATUS_CAP_LIST
    found = caps.walk(cs.data)
    assert [c.offset for c in found] == offs
    assert [c.next for c in found] == [*offs[1:], 0]
    msix = found[2].fields
    assert (msix.control, msix.table, msix.pba) == (15, 1, 0x1001)
    assert found[3].fields.pcie_caps == 0x2 and found[3].length == 60
    notify = found[5].fields
    assert (notify.cfg_type, notify.bar, notify.offset, notify.notify_off_multiplier) == (
        2, 4, 0x3000, 4)
    assert found[6].fields.length == 20
    assert caps.find(cs.data, caps.CAP_ID_PCIE) == found[3]
    with pytest.raises(caps.CapabilityError, match="no room"):
        for _ in range(10):
            caps.add_capability(cs, caps.pcie_cap())


def test_id_and_next_are_read_only_to_the_guest() -> None:
    cs, (msi, pm) = _space(caps.msi_cap(1), caps.pm_cap())
    cs.write(msi, 4, 0xFFFF_FFFF)  # acrn-dm: a 4-byte write at the start keeps ID/next
    assert cs.get16(msi) == 0x5805 and cs.get16(msi + 2) == 0x01F1  # MME + enable
    cs.write(pm + 4, 2, 0x0003)
    assert cs.get16(pm + 4) == 0x000B  # D3hot, No_Soft_Reset kept


def _lspci_offsets(bdf: str) -> list[tuple[int, str]]:
    out = subprocess.run(["lspci", "-vvv", "-s", bdf], capture_output=True, text=True).stdout
    return [(int(m.group(1), 16), m.group(2))
            for m in re.finditer(r"Capabilities: \[([0-9a-f]+)\] (.*)", out)]


@pytest.mark.skipif(not SYSFS or shutil.which("lspci") is None,
                    reason="no PCI devices or no lspci here")
@pytest.mark.parametrize("path", SYSFS, ids=[p.parent.name for p in SYSFS])
def test_walker_agrees_with_lspci_on_this_machine(path: Path) -> None:
    data = path.read_bytes()
    std = caps.walk(data)
    ext = caps.walk_extended(data)
    if len(data) < 256:
        pytest.skip("config space not fully readable (not root)")
    want = _lspci_offsets(path.parent.name)
    got = [(c.offset, c.cap_id) for c in std] + [(c.offset, c.cap_id) for c in ext]
    assert [o for o, _ in got] == [o for o, _ in want]
    names = {caps.CAP_ID_MSI: "MSI:", caps.CAP_ID_MSIX: "MSI-X:", caps.CAP_ID_PM: "Power",
             caps.CAP_ID_PCIE: "Express", caps.CAP_ID_VENDOR: "Vendor Specific"}
    for (off, cid), (_, text) in zip(got, want, strict=True):
        if cid in names and off < 0x100:
            assert text.startswith(names[cid]), (off, text)
    for c in std:
        if c.cap_id == caps.CAP_ID_MSIX:
            entries = (c.fields.control & 0x7FF) + 1
            line = next(t for o, t in want if o == c.offset)
            assert f"Count={entries} " in line


def test_malformed_chains() -> None:
    cs, (a, b) = _space(caps.pm_cap(), caps.msi_cap(1))
    loop = bytearray(cs.data)
    loop[b + 1] = a
    with pytest.raises(caps.CapabilityError, match="loops"):
        caps.walk(loop)
    header = bytearray(cs.data)
    header[a + 1] = 0x20
    with pytest.raises(caps.CapabilityError, match="outside"):
        caps.walk(header)
    past = bytearray(cs.data)
    past[a + 1] = 0xF8  # a 10-byte MSI at 0xF8 would run past 0x100
    past[0xF8:0xFC] = bytes([caps.CAP_ID_MSI, 0, 0, 0])
    with pytest.raises(caps.CapabilityError, match="runs past"):
        caps.walk(past)
    with pytest.raises(caps.CapabilityError):
        caps.walk(b"\xff" * 256)  # an absent device: all-ones loops on itself
    with pytest.raises(caps.CapabilityError):
        caps.walk(b"\0" * 10)
    assert caps.walk(b"\0" * 256) == []
    ext = bytearray(4096)
    ext[0x100:0x104] = (0x1 | 1 << 16 | 0x100 << 20).to_bytes(4, "little")
    with pytest.raises(caps.CapabilityError, match="loops"):
        caps.walk_extended(ext)
    ext[0x100:0x104] = (0x1 | 1 << 16 | 0x140 << 20).to_bytes(4, "little")
    ext[0x140:0x144] = (0x10 | 1 << 16).to_bytes(4, "little")
    assert [(c.offset, c.cap_id, c.next) for c in caps.walk_extended(ext)] == [
        (0x100, 1, 0x140), (0x140, 0x10, 0)]


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=4096))
def test_garbage_gives_only_capability_error(data: bytes) -> None:
    for fn in (caps.walk, caps.walk_extended):
        try:
            fn(data)
        except caps.CapabilityError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=192, max_size=192), st.integers(0, 0xFF),
       st.binary(min_size=0, max_size=3840))
def test_plausible_headers_with_garbage_chains(body: bytes, ptr: int, ext: bytes) -> None:
    """A header that announces a capability list (the common malformed case), with a
    random body, random pointer and random extended space."""
    head = bytearray(64)
    head[0:2] = b"\xf4\x1a"
    head[pc.STATUS] = pc.STATUS_CAP_LIST
    head[pc.CAP_PTR] = ptr
    data = bytes(head) + body + ext
    for fn in (caps.walk, caps.walk_extended):
        try:
            found = fn(data)
        except caps.CapabilityError:
            continue
        for c in found:
            assert 0x40 <= c.offset < len(data)
