"""acrn-dm's AHCI option string: drives in port order, their block options, and one
clear line for every mistake (from the parser, the validator and the factory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devicemodel.ahci.options import parse_ahci_options
from devicemodel.config import parse_args
from devicemodel.context import standalone
from devicemodel.errors import ConfigError
from devicemodel.registry import create_pci, known
from devicemodel.slot import SlotConfig
from devicemodel.virtio.blk.options import disk_ident
from devicemodel.vmcheck import check_vm


def test_drives_in_port_order() -> None:
    drives = parse_ahci_options("hd:/a.img,ro,writeback,cd:/b.iso,hd:/c.img,range=8/64", "ahci")
    assert [(d.kind, d.blk.path) for d in drives] == [("hd", "/a.img"), ("cd", "/b.iso"),
                                                      ("hd", "/c.img")]
    a, b, c = drives
    assert a.blk.ro and a.blk.writeback and not c.blk.ro
    assert (c.blk.range_start, c.blk.range_size) == (8, 64)
    assert b.blk.ro  # a CD-ROM is read-only whatever it was given
    # acrn-dm's serial: "ACRN--" and the MD5 of the drive's option string
    assert a.serial == disk_ident("/a.img,ro,writeback").decode()
    assert a.serial.startswith("ACRN--") and len(a.serial) == 20


def test_the_emulation_name_gives_the_first_drive_its_kind() -> None:
    assert [d.kind for d in parse_ahci_options("/x.iso", "ahci-cd")] == ["cd"]
    assert [d.kind for d in parse_ahci_options("/x.img", "ahci-hd")] == ["hd"]
    assert [d.kind for d in parse_ahci_options("/x.img,cd:/y.iso", "ahci")] == ["hd", "cd"]
    (empty,) = parse_ahci_options("cd:", "ahci")
    assert empty.kind == "cd" and empty.blk.path is None


@pytest.mark.parametrize("text,emul,message", [
    ("", "ahci", "ahci: give at least one drive, e.g. -s 4,ahci,hd:/var/lib/vm/disk.img"),
    ("", "ahci-cd", "ahci-cd: give at least one drive, e.g. -s 4,ahci-cd,cd:/path/"),
    ("hd:", "ahci", "ahci: port 0 (hd): hd: needs an image"),
    ("hd:/a,cd:/b,bogus", "ahci", "ahci: port 1 (cd): option 'bogus' does not apply"),
    ("hd:/a,bogus", "ahci", "ahci: port 0 (hd): unknown option 'bogus'"),
    ("hd:/a,nocache", "ahci", "ahci: port 0 (hd): option 'nocache' is not supported"),
    ("cd:/a,writeback", "ahci", "ahci: port 0 (cd): option 'writeback' does not apply"),
    ("cd:,ro", "ahci", "ahci: port 0 (cd): an empty drive (cd: with no image) takes no"),
    ("hd:/a,sectorsize=1000", "ahci", "ahci: port 0 (hd): sectorsize=1000: sector sizes must"),
    (",".join(["cd:"] * 33), "ahci", "ahci: 33 drives; an AHCI controller has at most 32"),
])
def test_mistakes_are_one_line(text: str, emul: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_ahci_options(text, emul)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_every_front_door_knows_the_names(tmp_path: Path) -> None:
    assert {"ahci", "ahci-hd", "ahci-cd"} <= set(known())
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    check_vm(parse_args(["-s", f"4,ahci,hd:{img},cd:", "vm1"]))
    with pytest.raises(ConfigError) as e:
        check_vm(parse_args(["-s", f"4,ahci,hd:{img},bogus", "vm1"]))
    assert str(e.value) == "-s 4,ahci: ahci: port 0 (hd): unknown option 'bogus'"


def test_the_factory_names_the_port_whose_image_fails(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    ctx = standalone()
    with pytest.raises(ConfigError) as e:
        create_pci(ctx, SlotConfig(0, 4, 0, "ahci", f"hd:{img},cd:{tmp_path}/missing.iso"))
    assert str(e.value).startswith("ahci: port 1 (cd): cannot open ")
    assert "missing.iso" in str(e.value)
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    with pytest.raises(ConfigError, match=r"ahci-hd: port 0 \(hd\): .*non-zero multiple"):
        create_pci(ctx, SlotConfig(0, 4, 0, "ahci-hd", str(odd)))
    dev = create_pci(ctx, SlotConfig(0, 4, 0, "ahci", f"hd:{img},ro"))
    try:
        assert dev.name == "ahci"
    finally:
        dev.close()
