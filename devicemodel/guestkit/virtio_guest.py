"""A guest-side virtio-pci driver for the sim hypervisor's scriptable vCPU.

``VirtioGuest`` talks to one virtio-pci function only the way a guest can: port and MMIO
accesses through a ``SimVcpu`` (so every access is a real request slot served by the
IoreqServer), over the legacy (BAR0 I/O) or the modern (BAR4 MMIO) interface, with split
rings in guest RAM laid out by ``MockDriver``. The adversarial suite, the hostile workloads
(``hostile.py``) and the benchmarks drive devices with it.
"""

from __future__ import annotations

import trio

from devicemodel.hsm.sim import SimVcpu
from devicemodel.virtio.mock import MockDriver
from devicemodel.virtio.pci import VirtioPci
from devicemodel.vm import Vm

S_ACK, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET = 1, 2, 4, 8, 0x40
F_VERSION_1 = 1 << 32
F_INDIRECT = 1 << 28
F_EVENT_IDX = 1 << 29

# legacy BAR0 registers
L_HOST_F, L_GUEST_F, L_PFN, L_NUM, L_SEL, L_NOTIFY, L_STATUS, L_ISR = 0, 4, 8, 12, 14, 16, 18, 19
L_CONFIG = 20  # device config while MSI-X is off
# modern common config (BAR4 + 0)
C_DFSEL, C_DF, C_GFSEL, C_GF, C_MSIX, C_NUMQ, C_STATUS = 0, 4, 8, 12, 16, 18, 20
C_QSEL, C_QSIZE, C_QMSIX, C_QENABLE = 22, 24, 26, 28
C_QDESC, C_QAVAIL, C_QUSED = 32, 40, 48
M_DEVICE, M_NOTIFY = 0x2000, 0x3000


class Rejected(Exception):
    """The device refused the request in a way the spec allows (the adversarial suite's
    verdict REJECT)."""


class VirtioGuest:
    """A virtio-pci driver over the legacy (BAR0 I/O) or modern (BAR4 MMIO) interface."""

    def __init__(self, vm: Vm, g: SimVcpu, slot: int, *, modern: bool, ram_base: int) -> None:
        self.vm = vm
        self.g = g
        self.slot = slot
        self.modern = modern
        self.dev: VirtioPci = vm.device(slot)
        self.ram_base = ram_base
        self.drivers: dict[int, MockDriver] = {}

    # -- registers --------------------------------------------------------------------
    def _io(self) -> int:
        bar = self.dev.bar(0)
        assert bar is not None
        return bar.addr

    def _mm(self) -> int:
        bar = self.dev.bar(4)
        assert bar is not None
        return bar.addr

    async def rd(self, off: int, size: int) -> int:
        if self.modern:
            return await self.g.mmio_read(self._mm() + off, size)
        return await self.g.pio_read(self._io() + off, size)

    async def wr(self, off: int, size: int, value: int) -> None:
        if self.modern:
            await self.g.mmio_write(self._mm() + off, size, value)
        else:
            await self.g.pio_write(self._io() + off, size, value)

    async def status(self) -> int:
        return await self.rd(C_STATUS if self.modern else L_STATUS, 1)

    async def set_status(self, value: int) -> None:
        await self.wr(C_STATUS if self.modern else L_STATUS, 1, value)

    async def reset(self) -> None:
        await self.set_status(0)
        with trio.fail_after(5):
            while await self.status() != 0:
                await trio.sleep(0.001)
        self.drivers.clear()

    async def host_features(self) -> int:
        if not self.modern:
            return await self.rd(L_HOST_F, 4)
        await self.wr(C_DFSEL, 4, 0)
        lo = await self.rd(C_DF, 4)
        await self.wr(C_DFSEL, 4, 1)
        return lo | await self.rd(C_DF, 4) << 32

    async def write_features(self, f: int) -> None:
        if not self.modern:
            await self.wr(L_GUEST_F, 4, f & 0xFFFF_FFFF)
            return
        for sel in (0, 1):
            await self.wr(C_GFSEL, 4, sel)
            await self.wr(C_GF, 4, (f >> 32 * sel) & 0xFFFF_FFFF)

    async def read_features(self) -> int:
        if not self.modern:
            return await self.rd(L_GUEST_F, 4)
        out = 0
        for sel in (0, 1):
            await self.wr(C_GFSEL, 4, sel)
            out |= await self.rd(C_GF, 4) << 32 * sel
        return out

    async def select(self, q: int) -> None:
        await self.wr(C_QSEL if self.modern else L_SEL, 2, q)

    async def queue_num(self) -> int:
        return await self.rd(C_QSIZE if self.modern else L_NUM, 2)

    def num_queues(self) -> int:
        return self.dev.device.num_queues

    def ring_base(self, q: int) -> int:
        return self.ram_base + q * 0x10_0000

    async def setup_queue(self, q: int, *, size: int | None = None,
                          addrs: tuple[int, int, int] | None = None) -> MockDriver:
        await self.select(q)
        max_size = await self.queue_num()
        size = size or max_size
        drv = MockDriver(self.vm.memory, self.ring_base(q), size if size & (size - 1) == 0
                         and size <= max_size else max_size, index=q, data_size=0x40000,
                         max_size=max_size)
        desc, avail, used = addrs or (drv.desc_addr, drv.avail_addr, drv.used_addr)
        if self.modern:
            await self.wr(C_QSIZE, 2, size)
            for off, a in ((C_QDESC, desc), (C_QAVAIL, avail), (C_QUSED, used)):
                await self.wr(off, 4, a & 0xFFFF_FFFF)
                await self.wr(off + 4, 4, a >> 32)
            await self.wr(C_QENABLE, 2, 1)
        else:
            await self.wr(L_PFN, 4, (desc >> 12) & 0xFFFF_FFFF)
        self.drivers[q] = drv
        return drv

    async def init(self, *, features: int | None = None, driver_ok: bool = True,
                   queues: list[int] | None = None) -> None:
        """The driver initialization sequence of virtio 1.2 §3.1.1."""
        await self.reset()
        await self.set_status(S_ACK)
        await self.set_status(S_ACK | S_DRIVER)
        host = await self.host_features()
        want = host & ~F_EVENT_IDX if features is None else features
        if not self.modern:
            want &= 0xFFFF_FFFF
        await self.write_features(want)
        st = S_ACK | S_DRIVER
        if self.modern:
            st |= S_FEATURES_OK
            await self.set_status(st)
            if not await self.status() & S_FEATURES_OK:
                raise Rejected("FEATURES_OK not accepted")
        for q in range(self.num_queues()) if queues is None else queues:
            await self.setup_queue(q)
        if driver_ok:
            await self.set_status(st | S_DRIVER_OK)

    async def notify(self, q: int) -> None:
        if self.modern:
            await self.wr(M_NOTIFY + 4 * q, 2, q)
        else:
            await self.wr(L_NOTIFY, 2, q)

    async def cfg_read(self, off: int, size: int) -> int:
        return await self.rd((M_DEVICE if self.modern else L_CONFIG) + off, size)

    async def cfg_write(self, off: int, size: int, value: int) -> None:
        await self.wr((M_DEVICE if self.modern else L_CONFIG) + off, size, value)

    async def needs_reset(self) -> bool:
        return bool(await self.status() & S_NEEDS_RESET)


async def wait_used(drv: MockDriver, n: int = 1, timeout: float = 2.0
                    ) -> list[tuple[int, int]] | None:
    got: list[tuple[int, int]] = []
    with trio.move_on_after(timeout):
        while len(got) < n:
            got += drv.get_used()
            if len(got) < n:
                await trio.sleep(0.002)
        return got
    return None
