"""The AHCI controller's registers, interrupts, resets and error recovery, and what it
does with hostile command structures: errors land in the port's registers."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from devicemodel.ahci import regs as r
from devicemodel.ahci.hba import msi_messages
from devicemodel.pci import config as pc
from devicemodel.virtio.blk.io import image as image_mod
from tests.support.ahci_driver import h2d
from tests.support.ahci_rig import RAM, ahci_rig, page_cache_misses

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(2 * MiB))
    return path


async def test_registers_after_reset(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk},cd:", init=False) as rig:
        hba, d = rig.hba, rig.driver
        assert hba.cfg.get16(pc.VENDOR_ID) == 0x8086 and hba.cfg.get16(pc.DEVICE_ID) == 0x2821
        assert hba.cfg.get32(pc.REVISION) >> 8 == 0x010601  # SATA, AHCI 1.0
        bar = hba.bar(5)
        assert bar is not None and bar.size == 1024  # 0x100 + 6 ports * 0x80
        cap = await d.rd(r.CAP)
        assert cap & r.CAP_NP_MASK == 5  # six ports, as acrn-dm (an ICH8) reports
        assert (cap >> r.CAP_NCS_SHIFT) & 0x1F == 31 and cap & r.CAP_SNCQ and cap & r.CAP_S64A
        assert await d.rd(r.PI) == 0b11 and await d.rd(r.VS) == 0x10300
        assert await d.rd(r.GHC) == r.GHC_AE
        assert await d.prd(0, r.P_SIG) == r.SIG_ATA and await d.prd(1, r.P_SIG) == r.SIG_ATAPI
        assert await d.prd(0, r.P_SSTS) & 0xF == 3 and await d.prd(2, r.P_SSTS) == 0
        assert await d.prd(0, r.P_TFD) & 0xFF == r.ST_OK
        assert await d.prd(0, r.P_CMD) & r.CMD_CPS and not await d.prd(2, r.P_CMD) & r.CMD_CPS
        # sub-dword reads see the dword's bytes; sub-dword writes are ignored
        assert hba.abar_read(r.VS + 1, 1) == 0x03 and hba.abar_read(r.VS + 2, 2) == 0x0001
        hba.abar_write(r.GHC, 1, r.GHC_IE)
        assert await d.rd(r.GHC) == r.GHC_AE
        assert hba.abar_read(0x10_0000, 4) == 0  # past the ports
    assert [msi_messages(n) for n in (1, 6, 8, 9, 32)] == [1, 8, 8, 16, 16]


async def test_the_command_list_and_fis_area_move_only_while_stopped(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        clb = d.clb(0)
        await d.pwr(0, r.P_CLB, 0x1234_5000)  # ST is on: ignored
        assert await d.prd(0, r.P_CLB) == clb
        await d.pwr(0, r.P_FB, 0x1234_5000)  # FRE is on: ignored
        assert await d.prd(0, r.P_FB) == d.fb(0)
        await d.stop_engine(0)
        await d.pwr(0, r.P_CLB, 0x1234_5FFF)
        assert await d.prd(0, r.P_CLB) == 0x1234_5C00  # 1 KiB aligned
        await d.pwr(0, r.P_CI, 1)  # not running: nothing is issued
        assert await d.prd(0, r.P_CI) == 0


async def test_msi_one_message_per_port_or_one_shared(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk},hd:{disk},ro") as rig:
        d = rig.driver
        rig.enable_msi(8)
        await d.read(0, 0, 1)
        await d.read(1, 0, 1, slot=2)
        assert rig.msi_vectors() == [0, 1]  # port i → message i
        assert not rig.irqs.intx  # MSI is on: INTx stays quiet
        rig.enable_msi(1)
        rig.irqs.msis.clear()
        await d.wr(r.IS, 0xFFFF_FFFF)
        res = await d.read(0, 0, 1, slot=3)
        assert res.ok and rig.msi_vectors() == [0]
        await d.read(1, 0, 1, slot=4)  # every port's own IS bit newly set: a message
        assert rig.msi_vectors() == [0, 0] and await d.rd(r.IS) == 0b11
        await d.read(0, 0, 1, slot=5)  # port 0's bit is still set: none
        assert rig.msi_vectors() == [0, 0]
        # the guest clears IS while its port is still pending (an event that came while
        # its handler ran): raised again, never lost
        d.prepare(0, 6, h2d(0x25, lba=0, count=1), [(d.data_addr(0, 6), 512)])
        await d.issue(0, 6)
        with trio.fail_after(5):
            while await d.prd(0, r.P_CI):
                await trio.sleep(0.001)
        await d.wr(r.IS, 0b11)
        assert rig.msi_vectors() == [0, 0, 0] and await d.rd(r.IS) == 0b01
        await d.pwr(0, r.P_IS, 0xFFFF_FFFF)
        await d.wr(r.IS, 0b01)
        assert rig.msi_vectors() == [0, 0, 0] and await d.rd(r.IS) == 0
        await d.pwr(0, r.P_IE, 0)
        await d.read(0, 0, 1, slot=7)
        await d.wr(r.IS, 0b01)
        rig.memory.write(d.fb(0), bytes(8))
        await d.pwr(0, r.P_IS, 0)
        d.prepare(0, 8, h2d(0x25, lba=0, count=1), [(d.data_addr(0, 8), 512)])
        await d.issue(0, 8)
        with trio.fail_after(5):
            while await d.prd(0, r.P_CI):
                await trio.sleep(0.001)
        assert rig.msi_vectors() == [0, 0, 0]  # not enabled in PxIE
        await d.pwr(0, r.P_IE, r.IE_MASK)  # enabling a pending bit interrupts
        assert rig.msi_vectors() == [0, 0, 0, 0]


async def test_intx_follows_the_interrupt_status(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        assert not rig.irqs.intx
        await d.pwr(0, r.P_IE, 0)
        await d.read(0, 0, 1)  # wait() clears PxIS; the global IS bit stays
        await d.pwr(0, r.P_IE, r.IE_MASK)
        assert not rig.irqs.intx
        await d.read(0, 1, 1, slot=1)
        assert await d.rd(r.IS) == 1 and rig.irqs.intx
        await d.wr(r.IS, 1)
        assert not rig.irqs.intx
        await d.wr(r.GHC, r.GHC_AE)  # interrupts off
        await d.read(0, 1, 1, slot=2)
        assert not rig.irqs.intx and await d.rd(r.IS) == 1
        await d.pwr(0, r.P_IE, 0)
        await d.read(0, 1, 1, slot=3)
        await d.pwr(0, r.P_IE, r.IE_MASK)
        await d.wr(r.GHC, r.GHC_AE | r.GHC_IE)  # on again: what is pending interrupts
        assert rig.irqs.intx
        rig.enable_msi(1)  # MSI takes over from INTx
        assert not rig.irqs.intx


async def test_a_failed_command_halts_the_port_until_st_is_cleared(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        res = await d.read(0, 1 << 20, 1)
        assert res.tfes
        d.prepare(0, 1, h2d(0x25, lba=0, count=1), [(d.data_addr(0, 1), 512)])
        await d.issue(0, 1)
        await trio.sleep(0.01)
        assert await d.prd(0, r.P_CI) == 0b11  # nothing runs after the error
        await d.recover(0)
        assert await d.prd(0, r.P_CI) == 0 and rig.hba.ports[0].stats["abandoned"] == 1
        assert (await d.read(0, 0, 1, slot=2)).ok


async def test_software_reset_and_command_list_override(disk: Path) -> None:
    async with ahci_rig(f"cd:{disk},hd:{disk}") as rig:
        d = rig.driver
        for port in (0, 1):
            rig.memory.write(d.fb(port) + r.RX_D2H, bytes(20))
            d.prepare(port, 0, h2d(0, control=r.CTL_SRST, c=False), [],
                      flags=r.HDR_RESET | r.HDR_CLEAR_BUSY)
            await d.issue(port, 0)
            assert await d.prd(port, r.P_CI) == 0 and await d.prd(port, r.P_TFD) & r.ST_BSY
            d.prepare(port, 1, h2d(0, c=False), [])
            await d.issue(port, 1)
            d2h = rig.memory.read(d.fb(port) + r.RX_D2H, 20)
            assert d2h[0] == r.FIS_D2H and not d2h[1] & r.FIS_I
            assert not await d.prd(port, r.P_TFD) & r.ST_BSY
        assert (d2h[5], d2h[6]) == (0, 0)  # port 1: an ATA disk
        assert await d.prd(0, r.P_SIG) == r.SIG_ATAPI
        # CLO clears a stuck BSY and clears itself
        rig.hba.ports[1].tfd |= r.ST_BSY
        cmd = await d.prd(1, r.P_CMD)
        await d.pwr(1, r.P_CMD, cmd | r.CMD_CLO)
        assert not await d.prd(1, r.P_TFD) & r.ST_BSY
        assert not await d.prd(1, r.P_CMD) & r.CMD_CLO


@pytest.fixture
async def stalled_reads(monkeypatch):
    """Reads wait for the returned event (set from the test)."""
    gate = trio.Event()
    token = trio.lowlevel.current_trio_token()
    real = image_mod.preadv_all

    def stalled(fd, views, offset):  # noqa: ANN001, ANN202
        trio.from_thread.run(gate.wait, trio_token=token)
        return real(fd, views, offset)

    monkeypatch.setattr(image_mod, "preadv_all", stalled)
    page_cache_misses(monkeypatch)
    return gate


async def test_stopping_the_engine_mid_io_drops_the_results(disk: Path, stalled_reads) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        for slot in range(4):
            d.prepare(0, slot, h2d(0x60, features=1, lba=slot, count=slot << 3),
                      [(d.data_addr(0, slot), 512)])
        await d.pwr(0, r.P_SACT, 0xF)
        await d.pwr(0, r.P_CI, 0xF)
        await trio.sleep(0.02)
        cmd = await d.prd(0, r.P_CMD)
        await d.pwr(0, r.P_CMD, cmd & ~r.CMD_ST)  # stop with four reads in threads
        assert await d.prd(0, r.P_SACT) == 0 and await d.prd(0, r.P_CMD) & r.CMD_CR
        await d.pwr(0, r.P_IS, 0xFFFF_FFFF)
        stalled_reads.set()
        with trio.fail_after(5):
            while await d.prd(0, r.P_CMD) & r.CMD_CR:
                await trio.sleep(0.001)
        assert await d.prd(0, r.P_IS) == 0  # their completions were dropped
        await d.start_engine(0)
        assert (await d.read(0, 0, 1)).ok


async def test_hba_reset_mid_io_waits_for_the_threads(disk: Path, stalled_reads) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        d.prepare(0, 0, h2d(0x25, lba=0, count=1), [(d.data_addr(0, 0), 512)])
        await d.issue(0, 0)
        await trio.sleep(0.02)
        await d.wr(r.GHC, r.GHC_HR)
        assert await d.rd(r.GHC) & r.GHC_HR  # still resetting: a read is in a thread
        stalled_reads.set()
        with trio.fail_after(5):
            while await d.rd(r.GHC) & r.GHC_HR:
                await trio.sleep(0.001)
        await d.init()
        assert (await d.read(0, 0, 1)).ok


async def test_comreset_mid_io(disk: Path, stalled_reads) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        d.prepare(0, 0, h2d(0x25, lba=0, count=1), [(d.data_addr(0, 0), 512)])
        await d.issue(0, 0)
        await trio.sleep(0.02)
        await d.pwr(0, r.P_SCTL, r.SCTL_DET_COMRESET)  # while running: the hostile way
        assert await d.prd(0, r.P_SSTS) == 0 and await d.prd(0, r.P_CI) == 0
        await d.pwr(0, r.P_SCTL, 0)
        assert await d.prd(0, r.P_SSTS) & 0xF == 3 and await d.prd(0, r.P_SIG) == r.SIG_ATA
        stalled_reads.set()
        await trio.sleep(0.05)
        await d.recover(0)
        assert (await d.read(0, 0, 1)).ok


async def test_pointers_outside_guest_memory(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        # a PRD entry past the end of guest RAM: host bus fatal error
        d.prepare(0, 0, h2d(0x25, lba=0, count=1), [(RAM - 256, 512)])
        await d.issue(0, 0)
        res = await d.wait(0, 0)
        assert res.tfes and await d.prd(0, r.P_IS) == 0  # wait() read and cleared it
        assert rig.hba.ports[0].halted
        await d.recover(0)
        # the command table outside RAM
        header = d.clb(0) + 1 * 32
        rig.memory.write(header, struct.pack("<HHIQ", 5, 0, 0, 1 << 40))
        await d.issue(0, 1)
        is_ = await d.prd(0, r.P_IS)
        assert is_ & r.IS_HBFS
        await d.recover(0)
        # the command list outside RAM
        await d.stop_engine(0)
        await d.pwr(0, r.P_CLBU, 0x100)
        await d.start_engine(0)
        await d.issue(0, 0)
        assert await d.prd(0, r.P_IS) & r.IS_HBFS
        await d.stop_engine(0)
        await d.pwr(0, r.P_CLBU, 0)
        await d.start_engine(0)
        # the received-FIS area outside RAM: the port reports it, nothing is written
        await d.stop_engine(0)
        cmd = await d.prd(0, r.P_CMD)
        await d.pwr(0, r.P_CMD, cmd & ~r.CMD_FRE)
        await d.pwr(0, r.P_FB, RAM)
        await d.pwr(0, r.P_CMD, cmd | r.CMD_ST)
        res = await d.read(0, 0, 1)
        assert res.tfes and await d.prd(0, r.P_IS) == 0


async def test_malformed_commands(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        # a command FIS length no FIS has
        d.prepare(0, 0, h2d(0x25, count=1), [(d.data_addr(0, 0), 512)])
        rig.memory.write(d.clb(0), b"\x02\x00")
        await d.issue(0, 0)
        assert await d.prd(0, r.P_IS) & r.IS_IFS
        await d.recover(0)
        # not a register FIS
        d.prepare(0, 0, b"\x46" + h2d(0x25)[1:], [])
        await d.issue(0, 0)
        assert await d.prd(0, r.P_IS) & r.IS_IFS
        await d.recover(0)
        # fewer PRD bytes than the command moves
        d.prepare(0, 0, h2d(0x25, lba=0, count=4), [(d.data_addr(0, 0), 1024)])
        await d.issue(0, 0)
        res = await d.wait(0, 0)
        assert res.tfes and res.error == r.ER_ABRT
        await d.recover(0)
        # an NCQ tag issued again while it runs
        d.prepare(0, 7, h2d(0x60, features=1, count=7 << 3), [(d.data_addr(0, 7), 512)])
        rig.hba.ports[0].running[7] = True  # as if still in a thread
        await d.issue(0, 7, ncq=True)
        assert await d.prd(0, r.P_IS) & r.IS_TFES
        await d.recover(0)
        assert (await d.read(0, 0, 1)).ok


async def test_a_port_without_a_drive_takes_no_commands(disk: Path) -> None:
    async with ahci_rig(f"hd:{disk}") as rig:
        d = rig.driver
        await d.start_port(3)
        d.prepare(3, 0, h2d(0xEC), [(d.data_addr(3, 0), 512)])
        await d.issue(3, 0)
        await trio.sleep(0.01)
        assert await d.prd(3, r.P_IS) == 0 and await d.prd(3, r.P_TFD) == 0x7F


async def test_counters_and_close(disk: Path, tmp_path: Path) -> None:
    async with ahci_rig(f"hd:{disk},cd:{disk}") as rig:
        await rig.driver.read(0, 0, 1)
        counters = rig.hba.counters()
        assert counters["port0"]["issued"] == 1 and counters["port0"]["kind"] == "hd"
        assert counters["port1"]["kind"] == "cd"
        images = [p.drive.image for p in rig.hba.ports[:2]]  # type: ignore[union-attr]
    assert [image.fd for image in images] == [-1, -1]  # closed with the controller
