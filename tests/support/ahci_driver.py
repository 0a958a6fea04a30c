"""A guest-side AHCI driver in Python: what Linux's libahci does to bring a port up and
run commands, over any register access (the device's ABAR handlers directly, or MMIO
through the sim hypervisor's vCPU) with its structures in guest RAM.

Layout in guest RAM from ``base``: per port a 64 KiB area (command list at +0, received
FIS at +0x400, command tables at +0x1000 + slot * 0x800), data buffers from
``base + 0x40_0000``.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from devicemodel.ahci import regs as r
from devicemodel.memory import MemoryMap

PORT_AREA = 0x1_0000
TABLE = 0x1000
TABLE_STRIDE = 0x800
DATA = 0x40_0000

Read = Callable[[int], Awaitable[int]]
Write = Callable[[int, int], Awaitable[None]]


@dataclass
class Result:
    """How a command ended, as the driver sees it."""

    status: int
    error: int
    tfes: bool
    prdbc: int
    data: bytes = b""

    @property
    def ok(self) -> bool:
        return not self.tfes and not self.status & r.ST_ERR


def h2d(command: int, *, features: int = 0, lba: int = 0, count: int = 0,
        device: int = 0x40, control: int = 0, c: bool = True) -> bytes:
    """A host-to-device register FIS (48-bit layout)."""
    fis = bytearray(20)
    fis[0], fis[1], fis[2], fis[3] = r.FIS_H2D, r.FIS_C if c else 0, command, features & 0xFF
    fis[4:7] = (lba & 0xFFFFFF).to_bytes(3, "little")
    fis[7] = device
    fis[8:11] = (lba >> 24 & 0xFFFFFF).to_bytes(3, "little")
    fis[11] = features >> 8 & 0xFF
    fis[12:14] = (count & 0xFFFF).to_bytes(2, "little")
    fis[15] = control
    return bytes(fis)


class AhciDriver:
    """libahci's steps, one command at a time unless told otherwise."""

    def __init__(self, rd: Read, wr: Write, memory: MemoryMap, base: int) -> None:
        self.rd = rd
        self.wr = wr
        self.memory = memory
        self.base = base
        self.ports: list[int] = []

    # --- registers --------------------------------------------------------------------
    async def prd(self, port: int, reg: int) -> int:
        return await self.rd(r.PORT_BASE + port * r.PORT_STRIDE + reg)

    async def pwr(self, port: int, reg: int, value: int) -> None:
        await self.wr(r.PORT_BASE + port * r.PORT_STRIDE + reg, value)

    def clb(self, port: int) -> int:
        return self.base + port * PORT_AREA

    def fb(self, port: int) -> int:
        return self.clb(port) + 0x400

    def table(self, port: int, slot: int) -> int:
        return self.clb(port) + TABLE + slot * TABLE_STRIDE

    def data_addr(self, port: int, slot: int) -> int:
        return self.base + DATA + (port * 32 + slot) * 0x2_0000

    # --- bring-up (ahci_init_controller, ahci_port_start, hardreset) --------------------
    async def init(self, *, wait: Callable[[], Awaitable[None]] | None = None) -> None:
        await self.wr(r.GHC, r.GHC_HR)
        with trio.fail_after(5):
            while await self.rd(r.GHC) & r.GHC_HR:
                await trio.sleep(0.001)
        await self.wr(r.GHC, r.GHC_AE)
        pi = await self.rd(r.PI)
        self.ports = [i for i in range(32) if pi >> i & 1]
        for port in self.ports:
            await self.start_port(port)
        await self.wr(r.IS, 0xFFFF_FFFF)
        await self.wr(r.GHC, r.GHC_AE | r.GHC_IE)

    async def stop_engine(self, port: int) -> None:
        cmd = await self.prd(port, r.P_CMD)
        await self.pwr(port, r.P_CMD, cmd & ~r.CMD_ST)
        with trio.fail_after(5):
            while await self.prd(port, r.P_CMD) & r.CMD_CR:
                await trio.sleep(0.001)

    async def start_engine(self, port: int) -> None:
        cmd = await self.prd(port, r.P_CMD)
        await self.pwr(port, r.P_CMD, cmd | r.CMD_ST)

    async def start_port(self, port: int) -> None:
        await self.stop_engine(port)
        self.memory.write(self.clb(port), bytes(0x400 + r.RX_SIZE))
        await self.pwr(port, r.P_CLB, self.clb(port) & 0xFFFF_FFFF)
        await self.pwr(port, r.P_CLBU, self.clb(port) >> 32)
        await self.pwr(port, r.P_FB, self.fb(port) & 0xFFFF_FFFF)
        await self.pwr(port, r.P_FBU, self.fb(port) >> 32)
        cmd = await self.prd(port, r.P_CMD)
        await self.pwr(port, r.P_CMD, cmd | r.CMD_FRE | r.CMD_SUD | r.CMD_POD)
        await self.pwr(port, r.P_SERR, 0xFFFF_FFFF)
        await self.pwr(port, r.P_IS, 0xFFFF_FFFF)
        await self.pwr(port, r.P_IE, r.IE_MASK)
        await self.hardreset(port)
        await self.start_engine(port)

    async def hardreset(self, port: int) -> int:
        """COMRESET; the signature the drive answers with."""
        # libahci: the D2H area reads BSY until the drive's reset FIS lands
        self.memory.write(self.fb(port) + r.RX_D2H, bytes([r.FIS_D2H, 0, r.ST_BSY]))
        await self.pwr(port, r.P_SCTL, r.SCTL_DET_COMRESET)
        await self.pwr(port, r.P_SCTL, 0)
        with trio.fail_after(5):
            while await self.prd(port, r.P_TFD) & r.ST_BSY:
                await trio.sleep(0.001)
        await self.pwr(port, r.P_SERR, 0xFFFF_FFFF)
        return await self.prd(port, r.P_SIG)

    async def recover(self, port: int) -> None:
        """libahci's error handler: stop the engine (dropping what was issued), clear the
        errors, start again."""
        await self.stop_engine(port)
        await self.pwr(port, r.P_SERR, 0xFFFF_FFFF)
        await self.pwr(port, r.P_IS, 0xFFFF_FFFF)
        await self.wr(r.IS, 1 << port)
        await self.start_engine(port)

    # --- commands -----------------------------------------------------------------------
    def prepare(self, port: int, slot: int, cfis: bytes, prds: list[tuple[int, int]], *,
                write: bool = False, acmd: bytes = b"", flags: int = 0) -> None:
        """Fill slot ``slot``'s header and table (``prds``: (gpa, bytes) each)."""
        table = self.table(port, slot)
        dw0 = 5 | (r.HDR_WRITE if write else 0) | (r.HDR_ATAPI if acmd else 0) | flags
        self.memory.write(self.clb(port) + slot * r.HDR_SIZE,
                          struct.pack("<HHIQ16x", dw0, len(prds), 0, table))
        self.memory.write(table, cfis.ljust(0x40, b"\0") + acmd.ljust(0x40, b"\0"))
        for i, (gpa, n) in enumerate(prds):
            self.memory.write(table + r.CT_PRDT + 16 * i, struct.pack("<QII", gpa, 0, n - 1))

    async def issue(self, port: int, slot: int, *, ncq: bool = False) -> None:
        if ncq:
            await self.pwr(port, r.P_SACT, 1 << slot)
        await self.pwr(port, r.P_CI, 1 << slot)

    async def wait(self, port: int, slot: int, *, ncq: bool = False,
                   timeout: float = 10) -> Result:
        """Poll until the slot completes or the port reports an error."""
        bit = 1 << slot
        with trio.fail_after(timeout):
            while True:
                is_ = await self.prd(port, r.P_IS)
                busy = await self.prd(port, r.P_SACT if ncq else r.P_CI)
                if is_ & r.FATAL or not busy & bit:
                    break
                await trio.sleep(0.0005)
        tfd = await self.prd(port, r.P_TFD)
        await self.pwr(port, r.P_IS, is_)
        prdbc = struct.unpack("<I", self.memory.read(self.clb(port) + slot * 32 + 4, 4))[0]
        return Result(tfd & 0xFF, tfd >> 8 & 0xFF, bool(is_ & r.FATAL), prdbc)

    async def run(self, port: int, cfis: bytes, *, length: int = 0, data: bytes = b"",
                  acmd: bytes = b"", slot: int = 0, ncq: bool = False,
                  chunk: int = 0x1_0000) -> Result:
        """One command with a data buffer of ``length`` bytes (or ``data`` written out),
        split into PRD entries of ``chunk`` bytes; a data-in command's bytes come back
        in ``Result.data``."""
        addr = self.data_addr(port, slot)
        size = len(data) or length
        if data:
            self.memory.write(addr, data)
        prds = [(addr + off, min(chunk, size - off)) for off in range(0, size, chunk)]
        self.prepare(port, slot, cfis, prds, write=bool(data), acmd=acmd)
        await self.issue(port, slot, ncq=ncq)
        res = await self.wait(port, slot, ncq=ncq)
        if length and not data:
            res.data = self.memory.read(addr, length)
        return res

    async def identify(self, port: int) -> bytes:
        res = await self.run(port, h2d(0xEC), length=512)
        assert res.ok, res
        return res.data

    async def read(self, port: int, lba: int, sectors: int, *, ncq: bool = False,
                   slot: int = 0, sector: int = 512) -> Result:
        if ncq:
            cfis = h2d(0x60, features=sectors, lba=lba, count=slot << 3)
        else:
            cfis = h2d(0x25, lba=lba, count=sectors)
        return await self.run(port, cfis, length=sectors * sector, slot=slot, ncq=ncq)

    async def write(self, port: int, lba: int, data: bytes, *, ncq: bool = False,
                    fua: bool = False, slot: int = 0, sector: int = 512) -> Result:
        n = len(data) // sector
        if ncq:
            cfis = h2d(0x61, features=n, lba=lba, count=slot << 3,
                       device=0x40 | (0x80 if fua else 0))
        else:
            cfis = h2d(0x3D if fua else 0x35, lba=lba, count=n)
        return await self.run(port, cfis, data=data, slot=slot, ncq=ncq)

    async def packet(self, port: int, cdb: bytes, length: int = 0, *, dma: bool = True,
                     slot: int = 0) -> Result:
        cfis = h2d(0xA0, features=1 if dma else 0, lba=(length & 0xFFFF) << 8)
        return await self.run(port, cfis, length=length, acmd=cdb, slot=slot)
