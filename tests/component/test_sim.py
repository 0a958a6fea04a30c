"""The sim hypervisor keeps ACRN's contract: slot states, ioeventfd/irqfd, MSIs, IRQ lines."""

from __future__ import annotations

import os

import pytest
import trio

from devicemodel.hsm import abi
from devicemodel.hsm.base import HypervisorError
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vm import running
from tests.support.served import Recorder, served


def _state(page, vcpu):
    kh, st = abi.SLOT_STATE.unpack_from(page, abi.slot_offset(vcpu) + abi.SLOT_KERNEL_HANDLED_OFF)
    return kh, st


async def test_slot_states_follow_the_handshake():
    seen = []
    async with served(vcpus=2) as s:
        page = s.server.page

        class Peek:
            def read(self, off, size):
                seen.append(_state(page, 1))  # while the DM handles it
                return 7

            def write(self, off, size, value):
                pass

        s.ports.register(0x510, 1, Peek())
        assert _state(page, 1)[1] == abi.IOREQ_STATE_FREE
        assert await s.sim.guest(1).pio_read(0x510, 1) == 7
        assert seen == [(0, abi.IOREQ_STATE_PROCESSING)]
        assert _state(page, 1)[1] == abi.IOREQ_STATE_FREE


async def test_ioeventfd_write_signals_and_skips_the_server():
    async with served() as s:
        dev = Recorder()
        s.ports.register(0x600, 4, dev)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            s.sim.ioeventfd(efd, 0x600, 2, pio=True, datamatch=3)
            g = s.sim.guest(0)
            await g.pio_write(0x600, 2, 3)
            assert os.eventfd_read(efd) == 1
            assert dev.log == []
            await g.pio_write(0x600, 2, 4)  # data does not match: goes to the DM
            assert dev.log == [("w", 0, 2, 4)]
            assert await g.pio_read(0x600, 2) == 0  # reads inside the range answer 0
            with pytest.raises(HypervisorError):
                s.sim.ioeventfd(efd, 0x600, 2, pio=True, datamatch=3)
            s.sim.ioeventfd(efd, 0x600, 2, pio=True, datamatch=3, deassign=True)
            await g.pio_write(0x600, 2, 3)
            assert dev.log[-1] == ("w", 0, 2, 3)
        finally:
            os.close(efd)


async def test_irqfd_signal_becomes_an_msi():
    sim = SimHypervisor()
    async with running(["-m", "128M", "vm1"], hypervisor=sim):
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            sim.irqfd(efd, 0xFEE0_0000, 0x4041)
            os.eventfd_write(efd, 1)
            with trio.fail_after(5):
                assert await sim.next_msi() == (0xFEE0_0000, 0x4041)
            sim.irqfd(efd, 0, 0, deassign=True)
        finally:
            os.close(efd)


async def test_a_taken_irqfd_is_left_to_whoever_took_it():
    """take_irqfd: the sim stops turning the eventfd into MSIs (a guest driver in another
    process reads it, as a vCPU on another CPU would get the interrupt)."""
    sim = SimHypervisor()
    async with running(["-m", "128M", "vm1"], hypervisor=sim):
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            sim.irqfd(efd, 0xFEE0_0000, 0x4041)
            await trio.sleep(0.05)  # the watcher is waiting on it
            assert sim.take_irqfd(0xFEE0_0000, 0x4041) == efd
            with pytest.raises(HypervisorError):  # taken once
                sim.take_irqfd(0xFEE0_0000, 0x4041)
            os.eventfd_write(efd, 1)
            await trio.sleep(0.1)
            assert sim.msis == []
            assert os.eventfd_read(efd) == 1  # still there for the taker
            sim.irqfd(efd, 0, 0, deassign=True)  # the registration stayed
        finally:
            os.close(efd)


async def test_msis_and_irq_lines_are_recorded():
    async with served() as s:
        sim = s.sim
        sim.inject_msi(0xFEE0_1000, 0x31)
        sim.inject_msi(0xFEE0_2000, 0x32)
        assert await sim.next_msi() == (0xFEE0_1000, 0x31)
        assert await sim.next_msi() == (0xFEE0_2000, 0x32)
        sim.set_irqline(20, abi.GSI_SET_HIGH)
        sim.set_irqline(21, abi.GSI_SET_LOW)
        assert sim.irqlines == {20: 1, 21: 0}
        with pytest.raises(HypervisorError):
            sim.set_irqline(20, 99)


async def test_notify_for_a_vcpu_beyond_vcpu_num_is_einval():
    async with served(vcpus=2) as s:
        with pytest.raises(HypervisorError) as e:
            s.sim.notify_request_finish(2)
        assert e.value.errno == 22


async def test_vm_name_of_16_bytes_is_refused():
    sim = SimHypervisor()
    import mmap

    with pytest.raises(HypervisorError, match="16"):
        sim.create_vm("a" * 16, mmap.mmap(-1, 4096))


async def test_running_maps_guest_ram_and_orders_the_calls():
    sim = SimHypervisor()
    async with running(["-m", "256M", "--cpu_affinity", "0,1", "vm1"], hypervisor=sim) as vm:
        assert vm.vcpu_num == 2
        vm.memory.write(0x2000, b"guest")
        assert sim.memory.read(0x2000, 5) == b"guest"
    assert sim.calls == [
        "create_vm", "set_memseg", "create_ioreq_client", "start_vm",
        "pause_vm", "destroy_ioreq_client", "destroy_vm",
    ]


async def test_one_handle_hosts_a_second_vm_after_destroy():
    sim = SimHypervisor()
    for _ in range(2):
        async with running(["-m", "128M", "vm1"], hypervisor=sim) as vm:
            vm.memory.write(0, b"x")
            assert sim.memory.read(0, 1) == b"x"
