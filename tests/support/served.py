"""A served request page on the sim hypervisor, without a whole VM, and a recording handler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from devicemodel.bus import MmioBus, PortBus
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.ioreq import IoreqServer, PciConfigAccess, new_ioreq_page


@dataclass
class Recorder:
    """An IoHandler that records every access and answers reads from a function."""

    answer: object = None
    log: list[tuple[str, int, int, int]] = field(default_factory=list)

    def read(self, offset: int, size: int) -> int:
        value = self.answer(offset, size) if callable(self.answer) else (self.answer or 0)
        self.log.append(("r", offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


@dataclass
class Served:
    sim: SimHypervisor
    server: IoreqServer
    ports: PortBus
    mmio: MmioBus


@asynccontextmanager
async def served(vcpus: int = 1, pci: PciConfigAccess | None = None) -> AsyncIterator[Served]:
    """A sim VM whose request page is answered by an IoreqServer over fresh buses."""
    sim = SimHypervisor(vcpus)
    page = new_ioreq_page()
    info = sim.create_vm("test", page)
    ports, mmio = PortBus(), MmioBus()
    server = IoreqServer(sim, page, info.vcpu_num, ports, mmio, pci)
    sim.create_ioreq_client()
    sim.start_vm()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        try:
            yield Served(sim, server, ports, mmio)
        finally:
            sim.destroy_ioreq_client()
            sim.destroy_vm()
