"""The IoreqServer against the sim hypervisor: every request type, both directions, every
size, unhandled accesses, concurrent vCPUs, and shutdown with a request in flight."""

from __future__ import annotations

import pytest
import trio

from devicemodel.hsm import abi
from devicemodel.hsm.sim import SimVmGone
from devicemodel.vm import running
from tests.support.served import Recorder, served

MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class PciRecorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def cfg_read(self, bus, dev, func, reg, size):
        self.log.append(("r", bus, dev, func, reg, size))
        return 0x1234_5678 >> (8 * (reg & 3))

    def cfg_write(self, bus, dev, func, reg, size, value):
        self.log.append(("w", bus, dev, func, reg, size, value))


@pytest.mark.parametrize("size", [1, 2, 4])
async def test_pio_both_directions(size):
    async with served() as s:
        dev = Recorder(answer=lambda off, sz: 0xA1B2C3D4)
        s.ports.register(0x500, 8, dev, "rec")
        g = s.sim.guest(0)
        assert await g.pio_read(0x504, size) == 0xA1B2C3D4 & MASKS[size]
        await g.pio_write(0x502, size, 0xDEADBEEF)
        assert dev.log == [
            ("r", 4, size, 0xA1B2C3D4),
            ("w", 2, size, 0xDEADBEEF & MASKS[size]),
        ]


@pytest.mark.parametrize("size", [1, 2, 4, 8])
async def test_mmio_both_directions(size):
    async with served() as s:
        dev = Recorder(answer=lambda off, sz: 0x1122_3344_5566_7788)
        s.mmio.register(0xC000_0000, 0x1000, dev, "rec")
        g = s.sim.guest(0)
        assert await g.mmio_read(0xC000_0010, size) == 0x1122_3344_5566_7788 & MASKS[size]
        await g.mmio_write(0xC000_0020, size, 0xFEDC_BA98_7654_3210)
        assert dev.log[1] == ("w", 0x20, size, 0xFEDC_BA98_7654_3210 & MASKS[size])


@pytest.mark.parametrize("size", [1, 2, 4])
async def test_pcicfg_through_cf8_cfc(size):
    pci = PciRecorder()
    async with served(pci=pci) as s:
        g = s.sim.guest(0)
        reg = 0x44 + (4 - size if size < 4 else 0)
        value = await g.pci_cfg_read(1, 3, 2, reg, size)
        assert value == (0x1234_5678 >> (8 * (reg & 3))) & MASKS[size]
        await g.pci_cfg_write(1, 3, 2, reg, size, 0xCAFEBABE)
        assert pci.log == [
            ("r", 1, 3, 2, reg, size),
            ("w", 1, 3, 2, reg, size, 0xCAFEBABE & MASKS[size]),
        ]
        # the server saw only PCICFG requests: the HSM completed the CF8 writes itself
        assert s.server.stats["pio"] == 0
        assert s.server.stats["pcicfg"] == 2


async def test_pcicfg_extended_register_bits():
    pci = PciRecorder()
    async with served(pci=pci) as s:
        await s.sim.guest(0).pci_cfg_read(0, 4, 0, 0x9A8, 4)
        assert pci.log == [("r", 0, 4, 0, 0x9A8, 4)]


async def test_cfc_with_enable_bit_clear_is_answered_by_the_kernel():
    pci = PciRecorder()
    async with served(pci=pci) as s:
        g = s.sim.guest(0)
        await g.pio_write(0xCF8, 4, 0x0000_1800)  # enable bit clear
        assert await g.pio_read(0xCF8, 4) == 0x0000_1800
        assert await g.pio_read(0xCFC, 4) == 0xFFFF_FFFF
        assert pci.log == []
        assert sum(s.server.stats.values()) == 0


async def test_pci_read_result_does_not_clobber_bdf_fields():
    async with served(pci=PciRecorder()) as s:
        await s.sim.guest(0).pci_cfg_read(7, 9, 3, 0x10, 4)
        page = s.server.page
        bus, dev, func, reg = (
            abi.SLOT_U32.unpack_from(page, abi.SLOT_PCI_BDFR_OFF + 4 * i)[0] for i in range(4)
        )
        assert (bus, dev, func, reg) == (7, 9, 3, 0x10)


@pytest.mark.parametrize("size", [1, 2, 4])
async def test_unhandled_pio_reads_all_ones_and_writes_drop(size):
    async with served() as s:
        g = s.sim.guest(0)
        assert await g.pio_read(0x1234, size) == MASKS[size]
        await g.pio_write(0x1234, size, 0)
        assert s.server.stats["unhandled_pio"] == 2


@pytest.mark.parametrize("size", [1, 2, 4, 8])
async def test_unhandled_mmio_reads_all_ones(size):
    async with served() as s:
        g = s.sim.guest(0)
        assert await g.mmio_read(0xD000_0000, size) == MASKS[size]
        await g.mmio_write(0xD000_0000, size, 5)
        assert s.server.stats["unhandled_mmio"] == 2


async def test_access_straddling_a_range_end_is_unhandled():
    async with served() as s:
        dev = Recorder(answer=0)
        s.ports.register(0x600, 4, dev)
        assert await s.sim.guest(0).pio_read(0x603, 2) == 0xFFFF
        assert dev.log == []


async def test_handler_exception_answers_all_ones_and_server_survives():
    class Broken:
        def read(self, off, size):
            raise RuntimeError("device bug")

        def write(self, off, size, value):
            raise RuntimeError("device bug")

    async with served() as s:
        s.mmio.register(0xC000_0000, 0x100, Broken())
        g = s.sim.guest(0)
        assert await g.mmio_read(0xC000_0000, 4) == 0xFFFF_FFFF
        await g.mmio_write(0xC000_0000, 4, 1)
        assert s.server.stats["handler_error"] == 2
        s.ports.register(0x70, 2, Recorder(answer=9))
        assert await g.pio_read(0x70, 1) == 9


async def test_concurrent_vcpus_each_get_their_own_answer():
    async with served(vcpus=4) as s:
        s.ports.register(0x400, 0x100, Recorder(answer=lambda off, size: off * 3))
        results: dict[tuple[int, int], int] = {}

        async def vcpu(v: int) -> None:
            g = s.sim.guest(v)
            for i in range(50):
                port = 0x400 + ((v * 50 + i) % 0x100)
                results[(v, i)] = await g.pio_read(port, 2) - (port - 0x400) * 3

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for v in range(4):
                    n.start_soon(vcpu, v)
        assert len(results) == 200 and set(results.values()) == {0}
        assert s.server.stats["pio"] == 200


async def test_many_requests_pending_at_once_are_served_in_one_scan():
    async with served(vcpus=4) as s:
        s.ports.register(0x400, 4, Recorder(answer=1))
        scans = []
        orig = s.server.scan

        def counting_scan():
            n = orig()
            scans.append(n)
            return n

        s.server.scan = counting_scan
        async with trio.open_nursery() as n:
            for v in range(4):
                n.start_soon(s.sim.guest(v).pio_read, 0x400, 1)
        assert sum(scans) == 4
        assert max(scans) > 1  # all four slots were PROCESSING together


async def test_unknown_request_type_is_completed_and_counted():
    async with served() as s:
        sim = s.sim
        with trio.fail_after(5):
            await sim._post(0, 7, abi.IOREQ_DIR_READ, 0, 4, 0)
        assert s.server.stats["unknown_type"] == 1


async def test_shutdown_with_a_request_in_flight_does_not_hang():
    from devicemodel.hsm.sim import SimHypervisor

    sim = SimHypervisor(vcpus=2)
    outcome = []

    async def guest_access():
        try:
            await sim.guest(1).pio_read(0x80, 1)
            outcome.append("completed")
        except SimVmGone:
            outcome.append("gone")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with running(["-m", "128M", "vm1"], hypervisor=sim) as vm:
                vm.server.hold_completion = True  # the DM keeps the slot, as during a reset
                nursery.start_soon(guest_access)
                while not vm.server.held:
                    await trio.sleep(0.001)
            await trio.sleep(0)
    assert outcome == ["gone"]
    assert sim.state == "destroyed"
    assert vm.state == "stopped"


async def test_a_held_request_is_handled_once():
    async with served(vcpus=2) as s:
        dev = Recorder(answer=1)
        s.ports.register(0x700, 1, dev)
        s.server.hold_completion = True
        async with trio.open_nursery() as n:
            n.start_soon(s.sim.guest(0).pio_read, 0x700, 1)
            while not s.server.held:
                await trio.sleep(0.001)
            # another vCPU's request makes the server scan again while vCPU 0 is held
            s.server.hold_completion = False
            s.ports.register(0x701, 1, Recorder(answer=2))
            assert await s.sim.guest(1).pio_read(0x701, 1) == 2
            assert len(dev.log) == 1
            s.server.release_held()
