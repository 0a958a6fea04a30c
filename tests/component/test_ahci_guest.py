"""The AHCI controller in a VM on the sim backend: found by a guest-side PCI enumerator,
driven through the sim vCPU's MMIO requests by the libahci-style driver with MSI, its
CD-ROM's disc changed through the monitor socket; and ``acrn-pydm lspci`` decoded by
the real ``lspci -F``."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import trio

from devicemodel.ahci import regs as r
from devicemodel.config import parse_args
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vm import running
from tests.support.ahci_driver import AhciDriver, h2d
from tests.support.lspci import decode
from tests.support.pci_guest import PciGuest

MiB = 1 << 20
MSI_DATA = 0x31


async def _call(stream: trio.SocketStream, req: dict) -> dict:
    await stream.send_all(json.dumps(req).encode() + b"\n")
    buf = b""
    with trio.fail_after(10):
        while not buf.endswith(b"\n"):
            buf += await stream.receive_some(65536)
    return json.loads(buf)


async def test_a_sim_guest_drives_the_disk_and_the_cdrom(tmp_path: Path) -> None:
    img, iso, iso2 = tmp_path / "d.img", tmp_path / "a.iso", tmp_path / "b.iso"
    img.write_bytes(os.urandom(4 * MiB))
    iso.write_bytes(os.urandom(64 * 2048))
    iso2.write_bytes(os.urandom(32 * 2048))
    mon = tmp_path / "mon.sock"
    cfg = parse_args(["--hv", "sim", "-m", "256M", "-s", "0:0,hostbridge", "-s",
                      f"4,ahci,hd:{img},cd:{iso}", "--cmd_monitor", str(mon), "vm1"])
    sim = SimHypervisor()
    async with running(cfg, sim):
        g = sim.guest(0)
        pci = PciGuest(g)
        (fn,) = [f for f in await pci.scan() if f.dev == 4]
        assert (fn.vendor, fn.device, fn.class_code) == (0x8086, 0x2821, 0x010601)
        (bar,) = fn.bars
        assert (bar.idx, bar.io, bar.is64, bar.size) == (5, False, False, 1024)
        msi = fn.cap(0x05)
        bdf = (0, 4, 0)
        await pci.write(bdf, msi + 4, 4, 0xFEE0_0000)
        await pci.write(bdf, msi + 12, 2, MSI_DATA)
        await pci.write(bdf, msi + 2, 2, 1)  # enable, one message
        await pci.write(bdf, 0x04, 2, 0x0006)  # memory decoding, bus mastering

        async def rd(off: int) -> int:
            return await g.mmio_read(bar.addr + off, 4)

        async def wr(off: int, value: int) -> None:
            await g.mmio_write(bar.addr + off, 4, value)

        d = AhciDriver(rd, wr, sim.memory, 0x100_0000)
        await d.init()
        assert d.ports == [0, 1]
        ident = await d.identify(0)
        assert struct.unpack_from("<Q", ident, 200)[0] == 4 * MiB // 512
        res = await d.read(0, 8, 16, ncq=True, slot=9)
        assert res.ok and res.data == img.read_bytes()[8 * 512 : 24 * 512]
        assert (await d.write(0, 64, b"g" * 4096)).ok
        assert img.read_bytes()[64 * 512 : 64 * 512 + 4096] == b"g" * 4096
        assert sim.msis and all(data == MSI_DATA for _, data in sim.msis)
        res = await d.packet(1, bytes([0x28, 0, 0, 0, 0, 3, 0, 0, 1, 0, 0, 0]), 2048)
        assert res.ok and res.data == iso.read_bytes()[3 * 2048 : 4 * 2048]

        async with await trio.open_unix_socket(str(mon)) as c:
            got = await _call(c, {"cmd": "blkrescan", "slot": "4", "path": str(iso2)})
            assert got == {"ok": True, "result": {"slot": "4", "port": 1, "path": str(iso2)}}
            tur = await d.packet(1, bytes(12))
            assert tur.tfes and tur.error >> 4 == 6  # UNIT ATTENTION: a new disc
            await d.recover(1)
            cap = await d.packet(1, bytes([0x25]) + bytes(11), 8)
            assert struct.unpack(">I", cap.data[:4])[0] == 31
            got = await _call(c, {"cmd": "blkrescan", "slot": 4, "eject": True})
            assert got["ok"] and got["result"]["path"] is None
            tur = await d.packet(1, bytes(12))
            assert tur.tfes and tur.error >> 4 == 2  # NOT READY: no medium
            await d.recover(1)
            for req, why in (
                ({"port": 0, "path": str(iso2)}, "port 0 has no CD-ROM drive"),
                ({"path": str(tmp_path / "none.iso")}, "no such image file"),
                ({}, 'give the new disc, e.g. "path"'),
                ({"eject": "yes"}, '"eject" and "force" must be true or false'),
                ({"port": "1", "path": str(iso2)}, '"port" must be a port number'),
            ):
                got = await _call(c, {"cmd": "blkrescan", "slot": "4", **req})
                assert not got["ok"] and why in got["error"], got
            # the guest locks the tray: the host's change needs "force"
            assert (await d.packet(1, bytes([0x1E, 0, 0, 0, 1]) + bytes(7))).ok
            got = await _call(c, {"cmd": "blkrescan", "slot": "4", "path": str(iso)})
            assert not got["ok"] and "locked the tray" in got["error"]
            got = await _call(c, {"cmd": "blkrescan", "slot": "4", "path": str(iso),
                                  "force": True})
            assert got["ok"]
            ack = await _call(c, {"command": "blkrescan", "arguments": f"4,{iso2}"})
            assert ack == {"ack": -1}  # acrn-dm's dialect cannot force a locked tray
            devices = (await _call(c, {"cmd": "devices"}))["result"]["devices"]
            (ahci,) = [dev for dev in devices if dev["slot"] == "0:4:0"]
            assert ahci["emul"] == "ahci" and ahci["counters"]["port1"]["medium_changes"] == 3
            assert "ATA 0x61 WRITE FPDMA QUEUED" not in ahci["counters"]["port0"]["commands"]
            assert ahci["counters"]["port0"]["commands"]["ATA 0x60 READ FPDMA QUEUED"] == 1
        # a hostile driver on the same VM: garbage command lists error the port only
        await d.stop_engine(0)
        await d.pwr(0, r.P_CLB, 0xFFFF_F000)  # not RAM
        await d.start_engine(0)
        await d.issue(0, 0)
        assert await d.prd(0, r.P_IS) & r.IS_HBFS
        assert (await d.run(1, h2d(0xA1), length=512)).ok  # the other port goes on


needs_lspci = pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils missing")


@needs_lspci
def test_lspci_decodes_the_controller(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    got = decode(tmp_path, "-s", "0:0,hostbridge", "-s", f"4,ahci,hd:{img},cd:", "-s",
                 f"5,ahci-cd,{tmp_path}/d.img", "vm1")
    for slot in ("00:04.0", "00:05.0"):
        text = got[slot]
        assert "SATA controller [0106]: Intel Corporation" in text and "[8086:2821]" in text
        assert "(prog-if 01 [AHCI 1.0])" in text
        assert "Region 5: Memory at " in text and "(32-bit, non-prefetchable)" in text
        assert "Capabilities: [40] MSI: Enable- Count=1/8 Maskable+ 64bit+" in text
        assert "Interrupt: pin A routed to IRQ" in text
