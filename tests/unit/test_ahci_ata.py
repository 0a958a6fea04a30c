"""The AHCI disk, command by command, driven the way libahci drives it (tests/support/
ahci_driver.py) on the controller's ABAR, with the image in a temporary file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from devicemodel.ahci import regs as r
from devicemodel.ahci.identify import DISK_MODEL, FIRMWARE
from devicemodel.virtio.blk.io import image as image_mod
from devicemodel.virtio.blk.options import disk_ident
from tests.support.ahci_driver import h2d
from tests.support.ahci_rig import ahci_rig, page_cache_misses

MiB = 1 << 20
SECTORS = 8 * MiB // 512


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(8 * MiB))
    return path


def words(data: bytes) -> list[int]:
    return list(struct.unpack("<256H", data))


def ata_text(data: bytes, first: int, count: int) -> str:
    raw = data[2 * first : 2 * (first + count)]
    return bytes(raw[i ^ 1] for i in range(len(raw))).decode().strip()


# --- IDENTIFY DEVICE --------------------------------------------------------------------
async def test_identify_describes_the_disk(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        data = await rig.driver.identify(0)
    w = words(data)
    assert ata_text(data, 27, 20) == DISK_MODEL
    assert ata_text(data, 23, 4) == FIRMWARE
    assert ata_text(data, 10, 10) == disk_ident(str(disk)).decode()  # acrn-dm's serial
    assert w[60] | w[61] << 16 == SECTORS
    assert sum(w[100 + i] << (16 * i) for i in range(4)) == SECTORS
    assert w[49] & 0x0300 == 0x0300  # LBA and DMA
    assert w[83] & 0x0400 and w[86] & 0x0400  # 48-bit addresses
    assert w[76] & 0x0100 and w[75] == 31  # NCQ, 32 tags
    assert w[84] & 0x0040  # FUA
    assert w[169] & 1 and w[105] > 0 and w[69] & 0x4020 == 0x4020  # TRIM, zeroes after it
    assert w[85] & 0x0020 == 0  # writethrough unless asked: the write cache is off
    assert w[217] == 1 and w[88] & 0x7F == 0x7F and w[88] >> 8 == 0x40  # SSD, UDMA6 set
    assert data[510] == 0xA5 and sum(data) % 256 == 0  # signature and checksum


async def test_identify_follows_the_drive_options(tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    big.write_bytes(bytes(4 * MiB))
    async with ahci_rig(f"hd:{big},writeback,sectorsize=4096/4096") as rig:
        w = words(await rig.driver.identify(0))
    assert w[85] & 0x0020  # writeback: the write cache is on
    assert w[106] == 0x5000 and w[117] | w[118] << 16 == 2048  # 4096-byte logical sectors
    assert sum(w[100 + i] << (16 * i) for i in range(4)) == 1024
    async with ahci_rig(f"hd:{big},sectorsize=512/4096,ro") as rig:
        w = words(await rig.driver.identify(0))
    assert w[106] == 0x6003  # 8 logical sectors per physical one
    assert w[169] == 0  # read-only: no TRIM


# --- reads and writes -------------------------------------------------------------------
async def test_dma_reads_and_writes_in_every_addressing(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        res = await d.read(0, 3, 9)  # READ DMA EXT, PRDs of 64 KiB
        assert res.ok and res.prdbc == 9 * 512
        assert res.data == disk.read_bytes()[3 * 512 : 12 * 512]
        res = await d.run(0, h2d(0xC8, lba=5, count=2, device=0x40), length=1024)  # 28-bit
        assert res.ok and res.data == disk.read_bytes()[5 * 512 : 7 * 512]
        data = os.urandom(4096)
        assert (await d.write(0, 100, data)).ok
        assert disk.read_bytes()[100 * 512 : 100 * 512 + 4096] == data
        # a buffer split into odd PRD entries (2-byte granules, as libata may build)
        res = await d.run(0, h2d(0x25, lba=0, count=2), length=1024, chunk=258)
        assert res.ok and res.data == disk.read_bytes()[:1024]


async def test_28_bit_addresses_take_the_device_register_bits(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(9 << 30)
    lba = 0x010A0B0C  # bits 27:24 in the device register
    async with ahci_rig(f"hd:{sparse}") as rig:
        res = await rig.driver.run(0, h2d(0xCA, lba=lba & 0xFFFFFF, count=1, device=0x41),
                                   data=b"w" * 512)  # WRITE DMA
        assert res.ok
    with open(sparse, "rb") as f:
        f.seek(lba * 512)
        assert f.read(512) == b"w" * 512


async def test_pio_commands_end_with_a_pio_setup_fis(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        res = await d.run(0, h2d(0x24, lba=1, count=1), length=512)  # READ SECTOR(S) EXT
        assert res.ok and res.data == disk.read_bytes()[512:1024]
        pio = rig.memory.read(d.fb(0) + r.RX_PIO_SETUP, 20)
        assert pio[0] == r.FIS_PIO_SETUP and pio[1] & r.FIS_D  # device to host
        assert pio[15] == r.ST_OK  # libahci reads the ending status from here
        assert int.from_bytes(pio[16:18], "little") == 512
        res = await d.run(0, h2d(0x34, lba=2, count=1), data=b"p" * 512)  # WRITE SECTOR(S) EXT
        assert res.ok and disk.read_bytes()[1024:1536] == b"p" * 512


async def test_the_write_cache_decides_when_a_write_is_durable(disk: Path, monkeypatch) -> None:
    synced: list[bool] = []
    real = image_mod.pwritev_all

    def record(fd, views, offset, sync):  # noqa: ANN001, ANN202
        synced.append(sync)
        return real(fd, views, offset, sync)

    monkeypatch.setattr(image_mod, "pwritev_all", record)
    page_cache_misses(monkeypatch)  # every write through pwritev_all, whatever /tmp is
    fsyncs: list[int] = []
    monkeypatch.setattr(image_mod.os, "fsync", lambda fd: fsyncs.append(fd))
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        await d.write(0, 0, b"a" * 512)  # writethrough
        await d.run(0, h2d(0xEF, features=0x02))  # SET FEATURES: write cache on
        await d.write(0, 0, b"b" * 512)
        await d.write(0, 0, b"c" * 512, fua=True)
        await d.write(0, 0, b"d" * 512, ncq=True, slot=3)
        await d.write(0, 0, b"e" * 512, ncq=True, fua=True, slot=4)
        assert (await d.run(0, h2d(0xEA))).ok  # FLUSH CACHE EXT
        assert fsyncs
        await d.run(0, h2d(0xEF, features=0x82))  # write cache off
        await d.write(0, 0, b"f" * 512, ncq=True, slot=5)
        assert words(await d.identify(0))[85] & 0x20 == 0
    assert synced == [True, False, True, False, True, True]


async def test_the_page_cache_serves_without_a_thread(disk: Path, monkeypatch) -> None:
    threads: list[str] = []
    real = image_mod.preadv_all

    def record(fd, views, offset):  # noqa: ANN001, ANN202
        threads.append("thread")
        return real(fd, views, offset)

    monkeypatch.setattr(image_mod, "preadv_all", record)
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        d.prepare(0, 2, h2d(0x60, features=8, lba=16, count=2 << 3),
                  [(d.data_addr(0, 2), 4096)])
        await d.issue(0, 2, ncq=True)
        assert await d.prd(0, r.P_SACT) == 0  # done inside the register write
        assert rig.memory.read(d.data_addr(0, 2), 4096) == disk.read_bytes()[8192:12288]
    assert threads == []


async def test_ncq_commands_run_side_by_side(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        for slot in range(8):
            d.prepare(0, slot, h2d(0x60, features=8, lba=slot * 8, count=slot << 3),
                      [(d.data_addr(0, slot), 4096)])
        await d.pwr(0, r.P_SACT, 0xFF)
        await d.pwr(0, r.P_CI, 0xFF)
        assert await d.prd(0, r.P_CI) == 0  # each was accepted at once (register FIS)
        for slot in range(8):
            res = await d.wait(0, slot, ncq=True)
            assert res.ok
        image = disk.read_bytes()
        for slot in range(8):
            assert rig.memory.read(d.data_addr(0, slot), 4096) == \
                image[slot * 4096 : (slot + 1) * 4096]
        sdb = rig.memory.read(d.fb(0) + r.RX_SDB, 8)
        assert sdb[0] == r.FIS_SDB and sdb[1] & r.FIS_I


async def test_a_failed_ncq_command_is_found_in_the_error_log(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        res = await d.read(0, SECTORS - 1, 2, ncq=True, slot=6)  # one sector past the end
        assert res.tfes and res.status & r.ST_ERR and res.error == r.ER_IDNF
        assert await d.prd(0, r.P_SACT) == 1 << 6  # still active: the guest recovers
        assert rig.memory.read(d.fb(0) + r.RX_SDB, 4)[2] & r.ST_ERR
        await d.recover(0)
        assert await d.prd(0, r.P_SACT) == 0
        res = await d.run(0, h2d(0x2F, lba=0x10, count=1), length=512)  # READ LOG EXT 10h
        assert res.ok
        page = res.data
        assert page[0] == 6 and page[2] & r.ST_ERR and page[3] == r.ER_IDNF
        assert int.from_bytes(page[4:7] + page[8:11], "little") == SECTORS - 1
        assert sum(page) % 256 == 0
        res = await d.run(0, h2d(0x2F, lba=0x10, count=1), length=512)
        assert res.data[0] & 0x80  # read once: no queued command has failed since
        res = await d.run(0, h2d(0x2F, lba=0x00, count=1), length=512)  # the directory
        assert res.data[0:2] == b"\x01\x00" and res.data[0x20] == 1


async def test_errors_set_the_task_file(disk: Path, tmp_path: Path, monkeypatch) -> None:
    ro = tmp_path / "ro.img"
    ro.write_bytes(bytes(MiB))
    async with ahci_rig(f"hd:{disk},hd:{ro},ro") as rig:
        d = rig.driver
        res = await d.read(0, SECTORS - 1, 2)
        assert res.tfes and res.error == r.ER_IDNF
        assert await d.prd(0, r.P_CI) == 1  # the failed slot stays issued
        await d.recover(0)
        res = await d.run(0, h2d(0x42, lba=SECTORS, count=1))  # READ VERIFY past the end
        assert res.tfes and res.error == r.ER_IDNF
        await d.recover(0)
        res = await d.write(1, 0, b"x" * 512)  # a read-only drive
        assert res.tfes and res.error == r.ER_ABRT
        assert ro.read_bytes() == bytes(MiB)
        res = await d.run(0, h2d(0xB0, features=0xD0))  # SMART: not offered
        await d.recover(0)
        assert res.tfes and res.error == r.ER_ABRT
        assert "ATA 0xb0 SMART (not served)" in rig.hba.counters()["port0"]["commands"]

        def broken(fd, views, offset):  # noqa: ANN001, ANN202
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(image_mod, "preadv_all", broken)
        page_cache_misses(monkeypatch)
        res = await d.read(0, 0, 1)
        assert res.tfes and res.error == r.ER_UNC
        assert rig.hba.counters()["port0"]["io_errors"] == 1


async def test_trim_punches_holes(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        entries = struct.pack("<QQ", 2048 | 1024 << 48, 3072 | 1024 << 48)  # merged: 1 MiB
        res = await d.run(0, h2d(0x06, features=1, count=1), data=entries.ljust(512, b"\0"))
        assert res.ok
        assert disk.read_bytes()[MiB : 2 * MiB] == bytes(MiB)
        fd = os.open(disk, os.O_RDONLY)
        try:
            assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB
        finally:
            os.close(fd)
        past = struct.pack("<Q", (SECTORS - 1) | 2 << 48).ljust(512, b"\0")
        res = await d.run(0, h2d(0x06, features=1, count=1), data=past)
        assert res.tfes and res.error == r.ER_IDNF
        await d.recover(0)
        for features, count in ((0, 1), (1, 9), (1, 0)):  # no TRIM bit; too many blocks
            res = await d.run(0, h2d(0x06, features=features, count=count),
                              data=bytes(512 * max(count, 1)))
            assert res.tfes and res.error == r.ER_ABRT
            await d.recover(0)


async def test_set_features_and_the_other_small_commands(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        assert (await d.run(0, h2d(0xEF, features=0x03, count=0x42))).ok  # UDMA2
        assert words(await d.identify(0))[88] >> 8 == 0x04
        assert (await d.run(0, h2d(0xEF, features=0x03, count=0x21))).ok  # MWDMA1
        assert words(await d.identify(0))[63] >> 8 == 0x02
        for bad in (0x47, 0x23, 0x10):  # no UDMA7, MWDMA3, PIO mode 8
            assert (await d.run(0, h2d(0xEF, features=0x03, count=bad))).tfes
            await d.recover(0)
        assert (await d.run(0, h2d(0xEF, features=0x99))).tfes  # an unknown subcommand
        await d.recover(0)
        assert (await d.run(0, h2d(0xC6, count=8))).ok  # SET MULTIPLE MODE
        assert words(await d.identify(0))[59] == 0x0108
        assert (await d.run(0, h2d(0xC6, count=3))).tfes
        await d.recover(0)
        res = await d.run(0, h2d(0xE5))  # CHECK POWER MODE: active
        assert res.ok and rig.memory.read(d.fb(0) + r.RX_D2H + 12, 1) == b"\xff"
        for op in (0xE0, 0xE1, 0xE7, 0x91):  # standby, idle, FLUSH CACHE, CHS set-up
            assert (await d.run(0, h2d(op))).ok
        res = await d.run(0, h2d(0x00))  # NOP always aborts
        assert res.tfes and res.error == r.ER_ABRT
