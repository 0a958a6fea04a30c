"""The AHCI CD-ROM drive, command by command: the ATA commands a packet device answers
and the SCSI/MMC commands inside PACKET, driven as libata and sr do."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from devicemodel.ahci import regs as r
from devicemodel.ahci.atapi import AtapiCd
from devicemodel.ahci.identify import CD_MODEL
from devicemodel.virtio.blk.io import image as image_mod
from tests.support.ahci_driver import Result, h2d
from tests.support.ahci_rig import Rig, ahci_rig, page_cache_misses

BLOCKS = 300


@pytest.fixture
def iso(tmp_path: Path) -> Path:
    path = tmp_path / "cd.iso"
    path.write_bytes(os.urandom(BLOCKS * 2048))
    return path


def cdb(*head: int) -> bytes:
    return bytes(head).ljust(12, b"\0")


def read10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0) + b"\0\0"


def alloc(op: int, n: int, *, b1: int = 0, b2: int = 0, b6: int = 0) -> bytes:
    """A command with its allocation length in bytes 7-8."""
    return struct.pack(">BBBxxxBHx", op, b1, b2, b6, n) + b"\0\0"


async def sense(rig: Rig) -> tuple[int, int, int]:
    res = await rig.driver.packet(1 if len(rig.driver.ports) > 1 else 0, cdb(0x03, 0, 0, 0, 18),
                                  18)
    assert res.ok
    return res.data[2] & 0xF, res.data[12], res.data[13]


def checked(res: Result) -> int:
    """The sense key of a CHECK CONDITION (in the error register)."""
    assert res.tfes and res.status & r.ST_ERR
    return res.error >> 4


async def test_identify_packet_device(iso: Path) -> None:
    async with ahci_rig(f"cd:{iso}", "ahci") as rig:
        d = rig.driver
        assert await d.prd(0, r.P_SIG) == r.SIG_ATAPI
        res = await d.run(0, h2d(0xA1), length=512)
        assert res.ok
        w = struct.unpack("<256H", res.data)
        assert w[0] == 0x85C0  # ATAPI, CD-ROM, removable, 12-byte packets
        model = bytes(res.data[54 + (i ^ 1)] for i in range(40)).decode().strip()
        assert model == CD_MODEL and sum(res.data) % 256 == 0
        res = await d.run(0, h2d(0xEC), length=512)  # IDENTIFY DEVICE: abort, signature
        assert res.tfes and res.error == r.ER_ABRT
        d2h = rig.memory.read(d.fb(0) + r.RX_D2H, 20)
        assert (d2h[5], d2h[6]) == (0x14, 0xEB)


async def test_inquiry_and_sense(iso: Path) -> None:
    async with ahci_rig(f"cd:{iso}", "ahci-cd") as rig:
        d = rig.driver
        res = await d.packet(0, cdb(0x12, 0, 0, 0, 36), 36)
        assert res.ok and res.prdbc == 36
        assert res.data[0] == 0x05 and res.data[1] & 0x80  # CD/DVD, removable
        assert res.data[8:16] == b"ACRN-DM " and res.data[16:32] == b"ACRN-DM DVD-ROM "
        res = await d.packet(0, cdb(0x12, 0, 0, 0, 8), 36)  # allocation length 8
        assert res.ok and res.prdbc == 8
        res = await d.packet(0, cdb(0x12, 1, 0, 0, 16), 16)  # VPD: the page list
        assert res.ok and res.data[:5] == bytes([5, 0, 0, 1, 0])
        assert checked(await d.packet(0, cdb(0x12, 1, 0x80, 0, 16), 16)) == 5
        await d.recover(0)
        assert await sense(rig) == (5, 0x24, 0)
        assert await sense(rig) == (0, 0, 0)  # reported once
        assert checked(await d.packet(0, cdb(0xFF), 0)) == 5  # not a command we know
        await d.recover(0)
        assert await sense(rig) == (5, 0x20, 0)
        assert "ATAPI 0xff ? (not served)" in rig.hba.counters()["port0"]["commands"]


async def test_capacity_and_reads(iso: Path) -> None:
    async with ahci_rig(f"cd:{iso}", "ahci-cd") as rig:
        d = rig.driver
        assert (await d.packet(0, cdb(0x00), 0)).ok  # TEST UNIT READY
        res = await d.packet(0, cdb(0x25), 8)
        assert res.ok and struct.unpack(">II", res.data) == (BLOCKS - 1, 2048)
        res = await d.packet(0, read10(7, 3), 3 * 2048)
        assert res.ok and res.data == iso.read_bytes()[7 * 2048 : 10 * 2048]
        read12 = struct.pack(">BBII", 0xA8, 0, BLOCKS - 2, 2) + b"\0\0"
        res = await d.packet(0, read12, 2 * 2048, dma=False)  # a PIO packet command
        assert res.ok and res.data == iso.read_bytes()[-2 * 2048 :]
        assert rig.memory.read(d.fb(0) + r.RX_PIO_SETUP, 1)[0] == r.FIS_PIO_SETUP
        assert checked(await d.packet(0, read10(BLOCKS - 1, 2), 4096)) == 5
        await d.recover(0)
        assert await sense(rig) == (5, 0x21, 0)
        assert (await d.packet(0, read10(0, 0), 0)).ok  # nothing to read
        assert (await d.packet(0, cdb(0x2B), 0)).ok  # SEEK
        assert (await d.packet(0, cdb(0xBB), 0)).ok  # SET CD SPEED


async def test_table_of_contents(iso: Path) -> None:
    async with ahci_rig(f"cd:{iso}", "ahci-cd") as rig:
        d = rig.driver
        res = await d.packet(0, alloc(0x43, 100), 100)  # format 0, LBA
        toc = res.data[: struct.unpack(">H", res.data[:2])[0] + 2]
        assert toc == bytes.fromhex("0012 01 01") + bytes([0, 0x14, 1, 0, 0, 0, 0, 0]) \
            + bytes([0, 0x14, 0xAA, 0]) + struct.pack(">I", BLOCKS)
        res = await d.packet(0, alloc(0x43, 100, b1=2), 100)  # MSF
        assert res.data[8:12] == bytes([0, 0, 2, 0])  # track 1 at 00:02:00
        lead_out = BLOCKS + 150
        assert res.data[16:20] == bytes([0, lead_out // 4500, lead_out // 75 % 60,
                                         lead_out % 75])
        res = await d.packet(0, alloc(0x43, 100, b6=0xAA), 100)  # from the lead-out on
        assert res.data[:2] == b"\x00\x0a" and res.data[6] == 0xAA
        res = await d.packet(0, alloc(0x43, 100, b2=1), 100)  # sessions
        assert res.data[:4] == bytes([0, 10, 1, 1]) and res.data[6] == 1
        res = await d.packet(0, alloc(0x43, 100, b2=2), 100)  # raw TOC
        assert res.ok and res.data[1] == 2 + 4 * 11 and res.data[7] == 0xA0
        assert checked(await d.packet(0, alloc(0x43, 100, b2=5), 100)) == 5
        await d.recover(0)
        assert checked(await d.packet(0, alloc(0x43, 100, b6=2), 100)) == 5  # no track 2


async def test_configuration_mode_pages_and_disc_information(iso: Path) -> None:
    async with ahci_rig(f"cd:{iso}", "ahci-cd") as rig:
        d = rig.driver
        res = await d.packet(0, alloc(0x46, 512), 512)  # every feature
        length, profile = struct.unpack(">I2xH", res.data[:8])
        assert profile == 0x0008  # CD-ROM, current
        features = []
        at = 8
        while at < length + 4:
            number, _, n = struct.unpack(">HBB", res.data[at : at + 4])
            features.append(number)
            at += 4 + n
        assert features == [0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x001E, 0x0100]
        res = await d.packet(0, alloc(0x46, 512, b1=2) [:2] + b"\x00\x03" + alloc(0x46, 512)[4:],
                             512)  # RT 2: feature 3 alone
        assert res.data[3] == 4 + 8 and res.data[8:10] == b"\x00\x03"
        assert checked(await d.packet(0, alloc(0x46, 512, b1=3), 512)) == 5
        await d.recover(0)
        res = await d.packet(0, alloc(0x5A, 256, b2=0x2A), 256)  # MODE SENSE(10) page 2A
        assert res.ok and struct.unpack(">H", res.data[:2])[0] == len(res.data[:30]) - 2
        page = res.data[8:30]
        assert page[0] == 0x2A and page[6] & 0x09 == 0x09  # eject, lock
        res = await d.packet(0, alloc(0x5A, 256, b2=0x3F), 256)
        assert res.data[8] == 0x01 and res.data[20] == 0x2A
        assert checked(await d.packet(0, alloc(0x5A, 256, b2=0x05), 256)) == 5
        await d.recover(0)
        assert checked(await d.packet(0, alloc(0x5A, 256, b2=0xEA), 256)) == 5  # saved
        await d.recover(0)
        assert checked(await d.packet(0, cdb(0x1A, 0, 0x2A, 0, 64), 64)) == 5  # no MODE SENSE(6)
        await d.recover(0)
        res = await d.packet(0, alloc(0x51, 34), 34)
        assert res.ok and res.data[2] == 0x0E
        res = await d.packet(0, struct.pack(">BBIBHB", 0x52, 1, 1, 0, 36, 0) + b"\0\0", 36)
        assert res.ok and struct.unpack(">I", res.data[24:28])[0] == BLOCKS


async def test_eject_lock_and_media_change(iso: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.iso"
    other.write_bytes(os.urandom(100 * 2048))
    async with ahci_rig(f"hd:{iso},cd:{iso}") as rig:
        d = rig.driver
        gesn = alloc(0x4A, 8, b1=1) [:4] + b"\x10" + alloc(0x4A, 8)[5:]
        assert checked(await d.packet(1, alloc(0x4A, 8), 8)) == 5  # not polled: refused
        await d.recover(1)
        assert (await d.packet(1, gesn, 8)).data[4:6] == bytes([0, 2])  # no event, present
        assert (await d.packet(1, cdb(0x1E, 0, 0, 0, 1), 0)).ok  # PREVENT
        assert checked(await d.packet(1, cdb(0x1B, 0, 0, 0, 2), 0)) == 5  # eject refused
        await d.recover(1)
        assert await sense(rig) == (5, 0x53, 0x02)
        with pytest.raises(RuntimeError, match="locked"):
            rig.hba.change_medium(str(other))
        assert (await d.packet(1, cdb(0x1E), 0)).ok  # ALLOW
        assert (await d.packet(1, cdb(0x1B, 0, 0, 0, 2), 0)).ok  # eject: the tray opens
        assert (await d.packet(1, gesn, 8)).data[4:6] == bytes([3, 1])  # removal, tray open
        assert checked(await d.packet(1, cdb(0x00), 0)) == 2
        await d.recover(1)
        assert await sense(rig) == (2, 0x3A, 0x02)  # no medium, tray open
        assert (await d.packet(1, cdb(0x1B, 0, 0, 0, 3), 0)).ok  # load: the same disc
        assert checked(await d.packet(1, cdb(0x00), 0)) == 6  # UNIT ATTENTION once
        await d.recover(1)
        assert (await d.packet(1, cdb(0x00), 0)).ok
        assert rig.hba.change_medium(str(other)) == 1  # the host changes the disc
        assert (await d.packet(1, gesn, 8)).data[4:6] == bytes([2, 2])  # new media
        assert checked(await d.packet(1, cdb(0x25), 8)) == 6
        await d.recover(1)
        res = await d.packet(1, cdb(0x25), 8)
        assert struct.unpack(">I", res.data[:4])[0] == 99
        rig.hba.change_medium(None)  # the host takes the disc out
        assert checked(await d.packet(1, cdb(0x00), 0)) == 2
        await d.recover(1)
        res = await d.packet(1, alloc(0x46, 8), 8)
        assert res.ok and res.data[6:8] == b"\x00\x00"  # no current profile
        with pytest.raises(ValueError, match="port 0 has no CD-ROM"):
            rig.hba.change_medium(str(other), port=0)
        counters = rig.hba.counters()["port1"]
        assert counters["medium_changes"] == 2 and counters["path"] is None


async def test_an_empty_drive_and_a_disc_put_in_later(iso: Path) -> None:
    async with ahci_rig("cd:", "ahci") as rig:
        d = rig.driver
        assert await d.prd(0, r.P_SIG) == r.SIG_ATAPI
        assert checked(await d.packet(0, cdb(0x00), 0)) == 2
        await d.recover(0)
        assert await sense(rig) == (2, 0x3A, 0x01)  # no medium, tray closed
        rig.hba.change_medium(str(iso))
        assert checked(await d.packet(0, cdb(0x00), 0)) == 6
        await d.recover(0)
        res = await d.packet(0, read10(0, 1), 2048)
        assert res.ok and res.data == iso.read_bytes()[:2048]


async def test_a_replaced_disc_is_closed_once_its_reads_end(iso: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    other = tmp_path / "other.iso"
    other.write_bytes(bytes(2048 * 4))
    gate = trio.Event()
    real = image_mod.preadv_all
    token = trio.lowlevel.current_trio_token()

    def slow(fd, views, offset):  # noqa: ANN001, ANN202
        trio.from_thread.run_sync(lambda: None, trio_token=token)
        trio.from_thread.run(gate.wait, trio_token=token)
        return real(fd, views, offset)

    monkeypatch.setattr(image_mod, "preadv_all", slow)
    page_cache_misses(monkeypatch)
    async with ahci_rig(f"cd:{iso}", "ahci-cd") as rig:
        d = rig.driver
        drive = rig.hba.ports[0].drive
        assert isinstance(drive, AtapiCd)
        old = drive.image
        assert old is not None
        d.prepare(0, 0, h2d(0xA0, features=1), [(d.data_addr(0, 0), 2048)], acmd=read10(5, 1))
        await d.issue(0, 0)
        await trio.sleep(0.05)
        rig.hba.change_medium(str(other))
        assert old.fd >= 0  # still read from
        gate.set()
        res = await d.wait(0, 0)
        assert res.ok and rig.memory.read(d.data_addr(0, 0), 2048) == \
            iso.read_bytes()[5 * 2048 : 6 * 2048]
        assert old.fd == -1
