"""A guest-side virtio-pci driver that replays Linux's drivers/virtio/virtio_pci_{modern,legacy,
common}.c through the sim hypervisor, and the tests of the transport's core paths.

Linux, modern: find the vendor capabilities (COMMON, NOTIFY, ISR, DEVICE) by walking config
space; reset and poll device_status until it reads 0; ACKNOWLEDGE, DRIVER; read both feature
words, write the accepted ones, set FEATURES_OK and read it back; MSI-X: enable with the
function masked, program entries, unmask; per queue: select, read queue_size (and
queue_enable, which must be 0), write size, ring addresses and vector (read back: NO_VECTOR
means failure), read queue_notify_off; enable every queue last; DRIVER_OK. Notifies are 16-bit
writes of the queue index. Legacy: BAR0 registers, PFN = ring >> 12 (4096 alignment), the
vector registers at 20/22 only while MSI-X is on, device config at 24 (MSI-X) or 20.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.virtio.blk import (
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from devicemodel.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from devicemodel.virtio.mock import MockDriver
from devicemodel.virtio.pci import VirtioPci
from devicemodel.vm import Vm, running
from tests.test_pci_guest import GuestFunc, PciGuest

MSI_ADDR = 0xFEE0_0000
NO_VECTOR = 0xFFFF
CMD_IO, CMD_MEM, CMD_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
MSIX_ENABLE, MSIX_FMASK = 0x8000, 0x4000
_BLK_HDR = struct.Struct("<IIQ")

# common cfg offsets (virtio 1.2 §4.1.4.3)
DFSELECT, DF, GFSELECT, GF, MSIX_CFG, NUMQ, STATUS, CFGGEN = 0, 4, 8, 12, 16, 18, 20, 21
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOFF = 22, 24, 26, 28, 30
Q_DESC, Q_AVAIL, Q_USED = 32, 40, 48
# legacy registers
L_HOSTF, L_GUESTF, L_PFN, L_NUM, L_SEL, L_NOTIFY, L_STATUS, L_ISR = 0, 4, 8, 12, 14, 16, 18, 19
L_MSIX_CFG, L_MSIX_Q = 20, 22


@dataclass
class VirtioCap:
    pos: int
    cfg_type: int
    bar: int
    offset: int
    length: int
    multiplier: int = 0


@dataclass
class VirtioPciDriver:
    """One virtio function as Linux's virtio_pci drives it (``legacy`` picks the interface)."""

    sim: SimHypervisor
    pci: PciGuest
    fn: GuestFunc
    legacy: bool
    ring_base: int
    data_base: int = 0x10
    caps: dict[int, VirtioCap] = field(default_factory=dict)
    queues: dict[int, MockDriver] = field(default_factory=dict)
    notify_addr: dict[int, tuple[bool, int]] = field(default_factory=dict)
    msix_on: bool = False
    msi_on: bool = False
    nvectors: int = 0
    features: int = 0
    _consumed: dict[tuple[int, int], int] = field(default_factory=dict)

    @property
    def g(self):  # noqa: ANN201 - the SimVcpu
        return self.pci.g

    @property
    def bdf(self) -> tuple[int, int, int]:
        return (self.fn.bus, self.fn.dev, self.fn.func)

    def bar(self, idx: int) -> int:
        return next(b.addr for b in self.fn.bars if b.idx == idx)

    def bar_is_io(self, idx: int) -> bool:
        return next(b.io for b in self.fn.bars if b.idx == idx)

    # --- probing (virtio_pci_probe, vp_modern_probe / vp_legacy_probe) ------------------
    @classmethod
    async def probe(cls, sim: SimHypervisor, pci: PciGuest, dev: int, *, legacy: bool,
                    ring_base: int = 0x0100_0000, data_base: int = 0x10) -> VirtioPciDriver:
        fn = await pci.probe((0, dev, 0))
        assert fn is not None and fn.vendor == 0x1AF4
        await pci.size_bars(fn)
        await pci.walk_caps(fn)
        drv = cls(sim, pci, fn, legacy, ring_base, data_base)
        cmd = await pci.read(drv.bdf, 0x04, 2)
        await pci.write(drv.bdf, 0x04, 2, cmd | CMD_IO | CMD_MEM | CMD_MASTER)
        if not legacy:
            for pos, cid in fn.caps:
                if cid != 0x09:
                    continue
                cfg_type = await pci.read(drv.bdf, pos + 3, 1)
                cap = VirtioCap(pos, cfg_type, await pci.read(drv.bdf, pos + 4, 1),
                                await pci.read(drv.bdf, pos + 8, 4),
                                await pci.read(drv.bdf, pos + 12, 4))
                if cfg_type == 2:
                    cap.multiplier = await pci.read(drv.bdf, pos + 16, 4)
                drv.caps.setdefault(cfg_type, cap)  # Linux takes the first of each type
            assert {1, 2, 3, 4} <= set(drv.caps), "modern virtio capabilities missing"
        return drv

    # --- register access ----------------------------------------------------------------
    async def common_read(self, off: int, size: int) -> int:
        c = self.caps[1]
        return await self.g.mmio_read(self.bar(c.bar) + c.offset + off, size)

    async def common_write(self, off: int, size: int, value: int) -> None:
        c = self.caps[1]
        await self.g.mmio_write(self.bar(c.bar) + c.offset + off, size, value)

    async def legacy_read(self, off: int, size: int) -> int:
        return await self.g.pio_read(self.bar(0) + off, size)

    async def legacy_write(self, off: int, size: int, value: int) -> None:
        await self.g.pio_write(self.bar(0) + off, size, value)

    async def get_status(self) -> int:
        if self.legacy:
            return await self.legacy_read(L_STATUS, 1)
        return await self.common_read(STATUS, 1)

    async def set_status(self, value: int) -> None:
        if self.legacy:
            await self.legacy_write(L_STATUS, 1, value)
        else:
            await self.common_write(STATUS, 1, value)

    async def add_status(self, bits: int) -> None:
        await self.set_status(await self.get_status() | bits)

    async def read_isr(self) -> int:
        if self.legacy:
            return await self.legacy_read(L_ISR, 1)
        c = self.caps[3]
        return await self.g.mmio_read(self.bar(c.bar) + c.offset, 1)

    async def config_read(self, off: int, size: int) -> int:
        """virtio_cread: legacy reads byte by byte, modern with the generation loop."""
        if self.legacy:
            base = 24 if self.msix_on else 20
            data = bytes([await self.legacy_read(base + off + i, 1) for i in range(size)])
            return int.from_bytes(data, "little")
        c = self.caps[4]
        while True:
            gen = await self.common_read(CFGGEN, 1)
            value = await self.g.mmio_read(self.bar(c.bar) + c.offset + off, size)
            if gen == await self.common_read(CFGGEN, 1):
                return value

    # --- reset and negotiation ----------------------------------------------------------
    async def reset(self, *, timeout: float = 5.0) -> None:
        """vp_reset: write 0, then (modern) poll until the device reads back 0."""
        await self.set_status(0)
        if self.legacy:
            await self.get_status()  # flush
            return
        with trio.fail_after(timeout):
            while await self.get_status():
                await trio.sleep(0.001)

    async def device_features(self) -> int:
        if self.legacy:
            return await self.legacy_read(L_HOSTF, 4)
        await self.common_write(DFSELECT, 4, 0)
        lo = await self.common_read(DF, 4)
        await self.common_write(DFSELECT, 4, 1)
        return lo | (await self.common_read(DF, 4) << 32)

    async def write_features(self, features: int) -> None:
        if self.legacy:
            await self.legacy_write(L_GUESTF, 4, features & 0xFFFF_FFFF)
            return
        await self.common_write(GFSELECT, 4, 0)
        await self.common_write(GF, 4, features & 0xFFFF_FFFF)
        await self.common_write(GFSELECT, 4, 1)
        await self.common_write(GF, 4, features >> 32)

    async def init(self, want: int = ~0) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, negotiate (FEATURES_OK for modern); returns features."""
        await self.reset()
        await self.add_status(STATUS_ACKNOWLEDGE)
        await self.add_status(STATUS_DRIVER)
        offered = await self.device_features()
        features = offered & want
        if self.legacy:
            features &= 0xFFFF_FFFF
        else:
            assert offered & VIRTIO_F_VERSION_1
            features |= VIRTIO_F_VERSION_1
        await self.write_features(features)
        if not self.legacy:
            await self.add_status(STATUS_FEATURES_OK)
            assert await self.get_status() & STATUS_FEATURES_OK, "device refused our features"
        self.features = features
        return features

    # --- interrupts (pci_alloc_irq_vectors) ------------------------------------------------
    def msi_data(self, vector: int) -> int:
        return self.data_base + vector

    async def enable_msix(self, nvectors: int) -> None:
        pos = self.fn.cap(0x11)
        ctrl = await self.pci.read(self.bdf, pos + 2, 2)
        assert (ctrl & 0x7FF) + 1 >= nvectors
        table = await self.pci.read(self.bdf, pos + 4, 4)
        base = self.bar(table & 7) + (table & ~7)
        await self.pci.write(self.bdf, pos + 2, 2, MSIX_ENABLE | MSIX_FMASK)
        for v in range(nvectors):
            e = base + 16 * v
            await self.g.mmio_write(e, 4, MSI_ADDR)
            await self.g.mmio_write(e + 4, 4, 0)
            await self.g.mmio_write(e + 8, 4, self.msi_data(v))
            await self.g.mmio_write(e + 12, 4, 0)  # request_irq unmasks the entry
        await self.pci.write(self.bdf, pos + 2, 2, MSIX_ENABLE)
        cmd = await self.pci.read(self.bdf, 0x04, 2)
        await self.pci.write(self.bdf, 0x04, 2, cmd | CMD_INTX_DISABLE)
        self.msix_on = True
        self.nvectors = nvectors

    async def msix_entry_write(self, vector: int, off: int, value: int) -> None:
        pos = self.fn.cap(0x11)
        table = await self.pci.read(self.bdf, pos + 4, 4)
        base = self.bar(table & 7) + (table & ~7)
        await self.g.mmio_write(base + 16 * vector + off, 4, value)

    async def enable_msi(self) -> None:
        pos = self.fn.cap(0x05)
        await self.pci.write(self.bdf, pos + 4, 4, MSI_ADDR)
        await self.pci.write(self.bdf, pos + 8, 4, 0)
        await self.pci.write(self.bdf, pos + 12, 2, self.msi_data(0))
        ctrl = await self.pci.read(self.bdf, pos + 2, 2)
        await self.pci.write(self.bdf, pos + 2, 2, ctrl | 1)
        self.msi_on = True

    async def set_config_vector(self, vector: int) -> int:
        if self.legacy:
            await self.legacy_write(L_MSIX_CFG, 2, vector)
            return await self.legacy_read(L_MSIX_CFG, 2)
        await self.common_write(MSIX_CFG, 2, vector)
        return await self.common_read(MSIX_CFG, 2)

    # --- queues (setup_vq) ----------------------------------------------------------------
    async def setup_queue(self, index: int, *, size: int | None = None,
                          vector: int | None = None, data_size: int = 1 << 20) -> MockDriver:
        if self.legacy:
            await self.legacy_write(L_SEL, 2, index)
            num = await self.legacy_read(L_NUM, 2)
            assert num and await self.legacy_read(L_PFN, 4) == 0
            q = MockDriver(self.sim.memory, self.ring_base, num, index=index, data_size=data_size)
            await self.legacy_write(L_PFN, 4, self.ring_base >> 12)
            if vector is not None:
                await self.legacy_write(L_MSIX_Q, 2, vector)
                assert await self.legacy_read(L_MSIX_Q, 2) == vector
            self.notify_addr[index] = (True, self.bar(0) + L_NOTIFY)
        else:
            await self.common_write(Q_SELECT, 2, index)
            num = await self.common_read(Q_SIZE, 2)
            assert num and not await self.common_read(Q_ENABLE, 2)
            n = min(num, size or num)
            q = MockDriver(self.sim.memory, self.ring_base, n, index=index, data_size=data_size,
                           max_size=num)
            await self.common_write(Q_SIZE, 2, n)
            for off, addr in ((Q_DESC, q.desc_addr), (Q_AVAIL, q.avail_addr),
                              (Q_USED, q.used_addr)):
                await self.common_write(off, 4, addr & 0xFFFF_FFFF)
                await self.common_write(off + 4, 4, addr >> 32)
            if vector is not None:
                await self.common_write(Q_MSIX, 2, vector)
                assert await self.common_read(Q_MSIX, 2) == vector
            noff = await self.common_read(Q_NOFF, 2)
            c = self.caps[2]
            self.notify_addr[index] = (self.bar_is_io(c.bar),
                                       self.bar(c.bar) + c.offset + noff * c.multiplier)
        self.ring_base = (q.data_end + 0xFFF) & ~0xFFF
        self.queues[index] = q
        return q

    async def enable_queues(self) -> None:
        if self.legacy:
            return
        for i in self.queues:
            await self.common_write(Q_SELECT, 2, i)
            await self.common_write(Q_ENABLE, 2, 1)

    async def driver_ok(self) -> None:
        await self.enable_queues()
        await self.add_status(STATUS_DRIVER_OK)

    async def kick(self, index: int) -> None:
        io, addr = self.notify_addr[index]
        if io:
            await self.g.pio_write(addr, 2, index)
        else:
            await self.g.mmio_write(addr, 2, index)

    # --- waiting for the device ------------------------------------------------------------
    async def wait_msi(self, vector: int, timeout: float = 5.0) -> None:
        """Wait for one more MSI/MSI-X message for ``vector`` than we have seen so far."""
        msg = (MSI_ADDR, self.msi_data(vector))
        want = self._consumed.get(msg, 0) + 1
        with trio.fail_after(timeout):
            while sum(1 for m in self.sim.msis if m == msg) < want:
                await trio.sleep(0.0005)
        self._consumed[msg] = want

    def msi_count(self, vector: int) -> int:
        msg = (MSI_ADDR, self.msi_data(vector))
        return sum(1 for m in self.sim.msis if m == msg)

    async def wait_used(self, index: int, count: int = 1,
                        timeout: float = 5.0) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        q = self.queues[index]
        with trio.fail_after(timeout):
            while len(got) < count:
                got.extend(q.get_used())
                # virtqueue_enable_cb: with EVENT_IDX, interrupt me after the next entry
                q.set_used_event(q.last_used_idx)
                if len(got) < count:
                    await trio.sleep(0.0005)
        return got


# --- virtio-blk requests --------------------------------------------------------------------
def blk_read(q: MockDriver, sector: int, n: int, *, indirect: bool = False) -> int:
    return q.add_chain([_BLK_HDR.pack(VIRTIO_BLK_T_IN, 0, sector)], [n, 1], indirect=indirect)


def blk_write(q: MockDriver, sector: int, data: bytes) -> int:
    return q.add_chain([_BLK_HDR.pack(VIRTIO_BLK_T_OUT, 0, sector), data], [1])


def blk_simple(q: MockDriver, rtype: int, n: int = 0) -> int:
    return q.add_chain([_BLK_HDR.pack(rtype, 0, 0)], [n, 1] if n else [1])


def blk_status(q: MockDriver, head: int) -> int:
    return q.written(head)[-1]


@asynccontextmanager
async def vm_with(*slots: str, extra: tuple[str, ...] = (),
                  mem: str = "256M") -> AsyncIterator[tuple[Vm, SimHypervisor, PciGuest]]:
    sim = SimHypervisor()
    args = ["-m", mem, *extra]
    for s in slots:
        args += ["-s", s]
    async with running([*args, "vm1"], hypervisor=sim) as vm:
        yield vm, sim, PciGuest(sim.guest(0))


def count_trapped_kicks(t: VirtioPci) -> list[int]:
    """Wrap the transport's trapped-notify entry point: what arrives here missed the
    ioeventfd fast path."""
    seen: list[int] = []
    orig = t._kick

    def spy(index: int) -> None:
        seen.append(index)
        orig(index)

    t._kick = spy  # type: ignore[method-assign]
    return seen


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
        f.seek(4096)
        f.write(bytes(range(256)) * 16)
    return p


# ============================================================================================
# tests
# ============================================================================================
async def test_modern_blk_enumeration_negotiation_and_io(image: Path) -> None:
    """Modern virtio-blk the way Linux finds and drives it: ids, BARs, vendor caps, MSI-X,
    feature negotiation, one queue, read/write/flush/get-id, kicks through the ioeventfd and
    completions through irqfds."""
    async with vm_with(f"3,virtio-blk,{image},modern") as (vm, sim, pci):
        t: VirtioPci = vm.device(3)
        trapped = count_trapped_kicks(t)
        drv = await VirtioPciDriver.probe(sim, pci, 3, legacy=False)
        fn = drv.fn
        assert (fn.vendor, fn.device, fn.class_code) == (0x1AF4, 0x1042, 0x010000)
        assert await pci.read(drv.bdf, 0x08, 1) == 1  # revision 1: modern only
        assert await pci.read(drv.bdf, 0x2C, 4) == 0x0002_1AF4  # subsystem: type 2
        bars = {b.idx: b for b in fn.bars}
        assert set(bars) == {1, 4}
        assert bars[4].is64 and bars[4].size == 0x4000 and not bars[4].io
        assert bars[1].size == 0x2000  # acrn-dm: table page + PBA, power of two
        assert [c for _, c in fn.caps] == [0x11, 0x05, 0x09, 0x09, 0x09, 0x09, 0x09]
        assert [(c.cfg_type, c.bar, c.offset, c.length) for c in drv.caps.values()] == [
            (1, 4, 0, 0x1000), (3, 4, 0x1000, 0x1000), (4, 4, 0x2000, 0x1000),
            (2, 4, 0x3000, 0x1000), (5, 0, 0, 0)]
        assert drv.caps[2].multiplier == 4

        features = await drv.init()
        assert features & VIRTIO_F_RING_EVENT_IDX and features & VIRTIO_F_RING_INDIRECT_DESC
        assert await drv.common_read(NUMQ, 2) == 1
        await drv.enable_msix(2)
        assert await drv.set_config_vector(0) == 0
        q = await drv.setup_queue(0, size=128, vector=1)
        await drv.driver_ok()
        assert t.device.queues[0].size == 128
        assert await drv.config_read(0, 8) == (8 << 20) // 512  # capacity

        # acrn-dm's ioeventfd for modern MMIO notify: BAR4 + 0x3000 + 4q, len 2, no data
        regs = [(r.address, r.length, r.pio, r.datamatch) for r in sim._ioeventfds]
        assert (drv.bar(4) + 0x3000, 2, False, None) in regs

        payload = bytes(range(256)) * 32
        w = blk_write(q, 64, payload)
        await drv.kick(0)
        await drv.wait_msi(1)
        assert await drv.wait_used(0) == [(w, 1)] and blk_status(q, w) == 0
        r = blk_read(q, 64, len(payload), indirect=True)
        f = blk_simple(q, VIRTIO_BLK_T_FLUSH)
        i = blk_simple(q, VIRTIO_BLK_T_GET_ID, 20)
        await drv.kick(0)
        used = dict(await drv.wait_used(0, 3))
        assert used[r] == len(payload) + 1 and q.written(r)[:-1] == payload
        assert blk_status(q, r) == blk_status(q, f) == blk_status(q, i) == 0
        assert len(q.written(i)[:-1].rstrip(b"\0")) > 0
        assert image.read_bytes()[64 * 512 : 64 * 512 + len(payload)] == payload
        assert trapped == [] and t.irqfd_sent >= 2
        assert vm.server is not None and vm.server.stats["handler_error"] == 0


async def test_legacy_blk_intx_through_trapped_registers(image: Path) -> None:
    """acrn-dm's default (legacy) virtio-blk with MSI-X left off: INTx, ISR read-to-clear,
    device config at BAR0+20; no_ioeventfd/no_irqfd force the trapped notify register."""
    async with vm_with(f"3,virtio-blk,{image},no_ioeventfd,no_irqfd") as (vm, sim, pci):
        t: VirtioPci = vm.device(3)
        trapped = count_trapped_kicks(t)
        drv = await VirtioPciDriver.probe(sim, pci, 3, legacy=True)
        assert (drv.fn.device, await pci.read(drv.bdf, 0x08, 1)) == (0x1001, 0)
        bars = {b.idx: b for b in drv.fn.bars}
        assert set(bars) == {0, 1} and bars[0].io and bars[0].size == 128
        assert [c for _, c in drv.fn.caps] == [0x11, 0x05]
        assert await pci.read(drv.bdf, 0x3D, 1) == 1  # INTA
        features = await drv.init()
        assert not features >> 32
        assert await drv.config_read(0, 8) == (8 << 20) // 512
        q = await drv.setup_queue(0)
        assert q.size == 256  # legacy: the device's size, fixed
        await drv.driver_ok()
        assert sim._ioeventfds == []
        gsi = t.intx.gsi
        assert sim.irqlines[gsi] == 1  # idle (active low)
        h = blk_read(q, 8, 4096)
        await drv.kick(0)
        with trio.fail_after(5):
            while sim.irqlines[gsi] != 0:
                await trio.sleep(0.001)
        assert await drv.read_isr() == 1
        assert sim.irqlines[gsi] == 1 and await drv.read_isr() == 0
        assert await drv.wait_used(0) == [(h, 4097)]
        assert q.written(h)[:-1] == bytes(range(256)) * 16
        assert trapped == [0] and t.irqfd_sent == 0


async def test_legacy_msix_vectors_config_offset_and_irqfd(image: Path) -> None:
    """Legacy with MSI-X: vector registers at 20/22 (read back, out-of-range → NO_VECTOR),
    device config moves to 24, the legacy PIO ioeventfd uses acrn-dm's datamatch."""
    async with vm_with(f"3,virtio-blk,{image}") as (vm, sim, pci):
        t: VirtioPci = vm.device(3)
        trapped = count_trapped_kicks(t)
        drv = await VirtioPciDriver.probe(sim, pci, 3, legacy=True)
        await drv.init()
        await drv.enable_msix(2)
        assert await drv.set_config_vector(7) == NO_VECTOR
        assert await drv.set_config_vector(0) == 0
        assert await drv.config_read(0, 8) == (8 << 20) // 512  # now at 24
        assert await drv.legacy_read(20, 2) == 0  # config vector, not device config
        q = await drv.setup_queue(0, vector=1)
        await drv.driver_ok()
        regs = [(r.address, r.length, r.pio, r.datamatch) for r in sim._ioeventfds]
        assert regs == [(drv.bar(0) + 16, 2, True, 0)]
        h = blk_read(q, 8, 512)
        await drv.kick(0)
        await drv.wait_msi(1)
        assert await drv.wait_used(0) == [(h, 513)]
        assert trapped == [] and t.irqfd_sent == 1
        # a notify value that does not match the datamatch reaches the device model
        await drv.legacy_write(16, 2, 5)
        assert trapped == [5]


async def test_virtio_msi_gives_msi_instead_of_msix(image: Path) -> None:
    """``--virtio_msi``: no MSI-X capability, one MSI message; ISR bit 0 is set too."""
    async with vm_with(f"3,virtio-blk,{image},modern", extra=("--virtio_msi",)) as (
            vm, sim, pci):
        drv = await VirtioPciDriver.probe(sim, pci, 3, legacy=False)
        assert [c for _, c in drv.fn.caps][:1] == [0x05] and 1 not in {b.idx for b in
                                                                       drv.fn.bars}
        await drv.init()
        await drv.enable_msi()
        assert await drv.set_config_vector(0) == NO_VECTOR
        q = await drv.setup_queue(0)
        await drv.driver_ok()
        h = blk_read(q, 0, 512)
        await drv.kick(0)
        await drv.wait_msi(0)
        assert await drv.read_isr() == 1
        assert await drv.wait_used(0) == [(h, 513)]


async def test_features_ok_refused_stays_clear(image: Path) -> None:
    """A driver that accepts an unoffered feature, or no VERSION_1, does not get FEATURES_OK;
    DRIVER_OK without it stops the device (needs reset) rather than running it."""
    async with vm_with(f"3,virtio-blk,{image},modern") as (vm, sim, pci):
        drv = await VirtioPciDriver.probe(sim, pci, 3, legacy=False)
        await drv.reset()
        await drv.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = await drv.device_features()
        for bad in (offered | (1 << 63), offered & ~VIRTIO_F_VERSION_1):
            await drv.write_features(bad)
            await drv.add_status(STATUS_FEATURES_OK)
            assert not await drv.get_status() & STATUS_FEATURES_OK
        await drv.add_status(STATUS_DRIVER_OK)
        assert await drv.get_status() & STATUS_DEVICE_NEEDS_RESET
        assert not vm.device(3).active
        await drv.reset()
        await drv.init()  # a fresh start negotiates fine
        assert await drv.get_status() == (STATUS_ACKNOWLEDGE | STATUS_DRIVER
                                          | STATUS_FEATURES_OK)


async def test_reset_in_the_middle_of_io(image: Path) -> None:
    """Status 0 with reads in flight: once status reads back 0 the used ring no longer
    moves; the device then starts over cleanly."""
    async with vm_with(f"3,virtio-blk,{image},modern") as (vm, sim, pci):
        drv = await VirtioPciDriver.probe(sim, pci, 3, legacy=False)
        await drv.init()
        await drv.enable_msix(2)
        await drv.set_config_vector(0)
        q = await drv.setup_queue(0, vector=1, data_size=16 << 20)
        await drv.driver_ok()
        for k in range(40):  # larger than blk's inline limit: these go to worker threads
            blk_read(q, (k * 600) % 15000, 300 * 1024, indirect=True)
        await drv.kick(0)
        with trio.fail_after(5):
            while q.used_idx() == 0:
                await trio.sleep(0)
        await drv.set_status(0)
        # a worker thread may still be reading into our buffers: status stays non-zero
        t: VirtioPci = vm.device(3)
        if not t.device.quiescent:  # (checked in one step, without letting the loop run)
            assert t._modern_read(STATUS, 1) != 0
        await drv.reset()  # polls until 0
        frozen = q.used_idx()
        await trio.sleep(0.05)
        assert q.used_idx() == frozen
        assert vm.device(3).device.quiescent
        await drv.init()
        q2 = await drv.setup_queue(0)
        await drv.driver_ok()
        h = blk_read(q2, 8, 4096)
        await drv.kick(0)
        assert await drv.wait_used(0) == [(h, 4097)]


async def test_hostile_ring_needs_reset_and_others_go_on(image: Path) -> None:
    """A descriptor index beyond the queue: that device sets DEVICE_NEEDS_RESET and raises
    its config vector (generation changes); a virtio-rnd next to it keeps working."""
    async with vm_with(f"3,virtio-blk,{image},modern", "4,virtio-rnd,modern") as (
            vm, sim, pci):
        blk = await VirtioPciDriver.probe(sim, pci, 3, legacy=False)
        rnd = await VirtioPciDriver.probe(sim, pci, 4, legacy=False, ring_base=0x0400_0000,
                                          data_base=0x40)
        for d in (blk, rnd):
            await d.init()
            await d.enable_msix(2)
            await d.set_config_vector(0)
            await d.setup_queue(0, vector=1)
            await d.driver_ok()
        gen = await blk.common_read(CFGGEN, 1)
        q = blk.queues[0]
        q.set_avail_entry(0, 4000)  # head index ≥ queue size
        q.set_avail_idx(1)
        await blk.kick(0)
        await blk.wait_msi(0)
        assert await blk.get_status() & STATUS_DEVICE_NEEDS_RESET
        assert await blk.common_read(CFGGEN, 1) != gen
        rq = rnd.queues[0]
        h = rq.add_chain([], [64])
        await rnd.kick(0)
        await rnd.wait_msi(1)
        assert await rnd.wait_used(0) == [(h, 64)]
        # the driver's answer: reset and start again
        await blk.reset()
        await blk.init()
        assert not await blk.get_status() & STATUS_DEVICE_NEEDS_RESET
