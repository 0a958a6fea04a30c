"""The judge for the transport's config space: the real ``lspci -F`` decodes what
``acrn-pydm lspci`` dumps for the virtio functions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.lspci import decode

pytestmark = pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils missing")


def test_lspci_decodes_legacy_blk_as_acrn_dm_builds_it(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    blk = decode(tmp_path, "-s", f"3,virtio-blk,{img}", "vm1")["00:03.0"]
    assert "SCSI storage controller [0100]" in blk and "[1af4:1001]" in blk
    assert "Virtio block device" in blk
    assert "Subsystem: Red Hat, Inc. Device [1af4:0002]" in blk
    assert "Region 0: I/O ports at 2000" in blk
    assert "Region 1: Memory at 80000000 (32-bit, non-prefetchable)" in blk
    assert "Capabilities: [40] MSI-X: Enable- Count=2 Masked-" in blk
    assert "Vector table: BAR=1 offset=00000000" in blk
    assert "MSI: Enable- Count=1/1 Maskable+ 64bit+" in blk
    assert "Interrupt: pin A routed to IRQ" in blk
    assert "VirtIO" not in blk  # legacy: no vendor capabilities


def test_lspci_decodes_modern_vendor_caps_and_msix(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    got = decode(tmp_path, "-s", f"3,virtio-blk,{img},modern", "-s",
                  "4,virtio-rnd,transitional,pio_notify", "--windows", "vm1")
    blk, rnd = got["00:03.0"], got["00:04.0"]
    assert "Virtio 1.0 block device [1af4:1042] (rev 01)" in blk
    assert "Subsystem: Oracle/SUN Device [108e:0002]" in blk  # --windows
    assert "Region 4: Memory at 80004000 (64-bit, non-prefetchable)" in blk
    assert "MSI-X: Enable- Count=2 Masked-" in blk
    for kind, off in (("CommonCfg", 0), ("ISR", 0x1000), ("DeviceCfg", 0x2000)):
        assert f"VirtIO: {kind}\n\t\tBAR=4 offset={off:08x} size=00001000" in blk
    assert "VirtIO: Notify\n\t\tBAR=4 offset=00003000 size=00001000 multiplier=00000004" in blk
    assert "[1af4:1005]" in rnd and "(rev" not in rnd.splitlines()[0]
    assert "[1af4:0004]" in rnd  # rnd keeps the virtio subsystem vendor with --windows
    assert "Region 0: I/O ports" in rnd and "Region 2: I/O ports" in rnd
    assert "VirtIO: Notify\n\t\tBAR=2 offset=00000000 size=00000004 multiplier=00000000" in rnd
