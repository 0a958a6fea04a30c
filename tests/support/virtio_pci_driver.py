"""A guest-side virtio-pci driver that replays Linux's drivers/virtio/virtio_pci_{modern,legacy,
common}.c through the sim hypervisor.

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

import trio

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.virtio.blk import (
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from devicemodel.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
)
from devicemodel.virtio.mock import MockDriver
from devicemodel.virtio.pci import VirtioPci
from devicemodel.vm import Vm, running
from tests.support.pci_guest import GuestFunc, PciGuest

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
