"""An AHCI controller built from a ``-s`` option string (the registry's factory) on a
standalone context whose guest RAM is an anonymous mapping, run in a trio nursery, with
``AhciDriver`` on its ABAR handlers: the unit tests' and the fuzz target's rig.

MSIs and INTx levels the controller raises are recorded; ``enable_msi`` programs the
MSI capability the way a guest would, through config space.
"""

from __future__ import annotations

import mmap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from devicemodel.ahci import Ahci
from devicemodel.context import standalone
from devicemodel.irq.intx import IntxRoute
from devicemodel.memory import MemoryMap, RamRegion
from devicemodel.pci import caps as pcaps
from devicemodel.registry import create_pci
from devicemodel.slot import SlotConfig
from devicemodel.virtio.blk.io import image as image_mod
from tests.support.ahci_driver import AhciDriver

RAM = 64 << 20
DRIVER_BASE = 0x10_0000
MSI_ADDR = 0xFEE0_0000
GSI = 20


@dataclass
class Recorder:
    """The context's interrupt services: what the controller raised."""

    msis: list[tuple[int, int]] = field(default_factory=list)
    lines: dict[int, bool] = field(default_factory=dict)

    def inject_msi(self, address: int, data: int) -> None:
        self.msis.append((address, data))

    def set_line(self, gsi: int, high: bool) -> None:
        self.lines[gsi] = high

    def pulse_line(self, gsi: int) -> None:
        self.lines[gsi] = False

    @property
    def intx(self) -> bool:
        return self.lines.get(GSI) is False  # active low: asserted is low


@dataclass
class Rig:
    hba: Ahci
    driver: AhciDriver
    memory: MemoryMap
    irqs: Recorder

    def msi_vectors(self) -> list[int]:
        """The message numbers sent so far (data - base data)."""
        return [d - 0x40 for _, d in self.irqs.msis]

    def enable_msi(self, messages: int = 1) -> None:
        cap = pcaps.find(self.hba.cfg.data, pcaps.CAP_ID_MSI)
        assert cap is not None
        off = cap.offset
        self.hba.cfg_write(off + 4, 4, MSI_ADDR)
        self.hba.cfg_write(off + 8, 4, 0)
        self.hba.cfg_write(off + 12, 2, 0x40)
        mme = (messages - 1).bit_length()
        self.hba.cfg_write(off + 2, 2, 1 | mme << 4)


def page_cache_misses(monkeypatch) -> None:  # noqa: ANN001 - pytest's fixture
    """Every non-blocking read and write misses the page cache, so each transfer goes
    to a thread (where tests can stall it or make it fail)."""

    def miss(*args: object) -> int:
        raise BlockingIOError

    monkeypatch.setattr(image_mod, "preadv_nowait", miss)
    monkeypatch.setattr(image_mod, "pwritev_nowait", miss)


@asynccontextmanager
async def ahci_rig(options: str, emul: str = "ahci", *, init: bool = True,
                   memory: MemoryMap | None = None) -> AsyncIterator[Rig]:
    """A running controller for ``-s 4,<emul>,<options>``; ``init`` brings every port
    up the way libahci does."""
    if memory is None:
        memory = MemoryMap([RamRegion(0, RAM, mmap.mmap(-1, RAM))])
    irqs = Recorder()
    ctx = standalone(memory, msi=irqs, lines=irqs)
    hba = create_pci(ctx, SlotConfig(0, 4, 0, emul, options))
    assert isinstance(hba, Ahci)
    assert hba.intx is not None
    hba.intx.connect(irqs, IntxRoute(0, 4, 1, GSI, 1, 11))

    async def rd(off: int) -> int:
        return hba.abar_read(off, 4)

    async def wr(off: int, value: int) -> None:
        hba.abar_write(off, 4, value)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hba.run)
            while hba.nursery is None:
                await trio.sleep(0)
            driver = AhciDriver(rd, wr, memory, DRIVER_BASE)
            if init:
                await driver.init()
            yield Rig(hba, driver, memory, irqs)
            nursery.cancel_scope.cancel()
    finally:
        hba.close()
