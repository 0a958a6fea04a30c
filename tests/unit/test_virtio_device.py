"""The transport-facing VirtioDevice contract, exercised through virtio-rnd."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from devicemodel.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from devicemodel.virtio.mock import MockDriver, RecordingInterrupt, wait_used
from devicemodel.virtio.queue import VIRTQ_DESC_F_NEXT
from devicemodel.virtio.rnd import VirtioRnd


async def test_kicks_from_an_eventfd(mem):
    """The ioeventfd fast path: a task waits on the eventfd and calls queue_notify."""
    dev = VirtioRnd()
    drv = MockDriver(mem, 0x100000, 64)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    async def ioeventfd_task() -> None:
        while True:
            await trio.lowlevel.wait_readable(efd)
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                continue
            dev.queue_notify(0)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run)
            nursery.start_soon(ioeventfd_task)
            dev.activate(dev.device_features, [drv.queue()], RecordingInterrupt())
            await trio.testing.wait_all_tasks_blocked()
            drv.add_chain([], [32])
            os.eventfd_write(efd, 1)  # what the hypervisor does on the guest's notify write
            assert len(await wait_used(drv, 1)) == 1
            nursery.cancel_scope.cancel()
    finally:
        os.close(efd)


async def test_idle_device_sleeps_and_kicks_before_activate_are_ignored(mem):
    dev = VirtioRnd()
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        dev.queue_notify(0)
        dev.queue_notify(7)
        drv = MockDriver(mem, 0x100000, 64)
        dev.activate(dev.device_features, [drv.queue()], RecordingInterrupt())
        dev.queue_notify(99)
        # no busy polling: every task blocks when there is no work
        with trio.fail_after(2):
            await trio.testing.wait_all_tasks_blocked(0.01)
        nursery.cancel_scope.cancel()


async def test_event_idx_suppresses_kicks_while_busy_and_interrupts(mem):
    dev = VirtioRnd()
    drv = MockDriver(mem, 0x100000, 64)
    irq = RecordingInterrupt()
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        dev.activate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX, [drv.queue()], irq)
        await trio.testing.wait_all_tasks_blocked()
        assert drv.avail_event() == 0  # "kick me at the next buffer"
        drv.set_used_event(2)  # the driver wants an interrupt only after the 3rd buffer
        for _ in range(3):
            drv.add_chain([], [8])
        dev.queue_notify(0)
        await wait_used(drv, 3)
        await trio.testing.wait_all_tasks_blocked()
        assert irq.queue_irqs == [0]
        assert drv.avail_event() == 3
        nursery.cancel_scope.cancel()


async def test_bad_ring_at_activate_needs_reset_without_raising(mem):
    dev = VirtioRnd()
    drv = MockDriver(mem, 0x100000, 64)
    q = drv.queue()
    q.used_addr = 2**64 - 8
    irq = RecordingInterrupt()
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        dev.activate(dev.device_features, [q], irq)
        assert irq.reset_requests == 1 and "outside guest RAM" in dev.failure
        assert dev.quiescent
        nursery.cancel_scope.cancel()


async def test_needs_reset_once_then_reset_and_reuse(mem):
    dev = VirtioRnd()
    drv = MockDriver(mem, 0x100000, 64)
    irq = RecordingInterrupt()
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        dev.activate(dev.device_features, [drv.queue()], irq)
        drv.write_desc(0, drv.data_base, 8, VIRTQ_DESC_F_NEXT, 0)  # a loop
        drv.publish(0)
        drv.publish(0)
        dev.queue_notify(0)
        with trio.fail_after(2):
            await dev.wait_quiescent()
        await trio.testing.wait_all_tasks_blocked()
        assert irq.reset_requests == 1 and "loops" in dev.failure
        dev.queue_notify(0)
        await trio.testing.wait_all_tasks_blocked()
        assert irq.reset_requests == 1
        # the driver resets the device and starts over
        dev.reset()
        assert dev.failure is None and dev.features == 0
        drv2 = MockDriver(mem, 0x600000, 64)
        dev.activate(dev.device_features, [drv2.queue()], irq)
        drv2.add_chain([], [16])
        dev.queue_notify(0)
        assert [n for _, n in await wait_used(drv2, 1)] == [16]
        nursery.cancel_scope.cancel()


async def test_activate_before_run_is_a_programming_error(mem):
    dev = VirtioRnd()
    with pytest.raises(RuntimeError, match="before run"):
        dev.activate(0, [MockDriver(mem, 0x100000, 64).queue()], RecordingInterrupt())


def test_static_description():
    dev = VirtioRnd()
    assert dev.read_config(0, 4) == b"\xff" * 4
    assert dev.check_features(VIRTIO_F_VERSION_1)
    assert not dev.check_features(1 << 40)
    ids = dev.pci_ids
    assert (ids.vendor_id, ids.legacy_device_id, ids.modern_device_id, ids.subsystem_id) == \
        (0x1AF4, 0x1005, 0x1044, 4)
    assert ids.subsystem_vendor(windows=True) == 0x1AF4  # only blk/net change it


def test_create_device_by_emulation_name(tmp_path):
    from devicemodel.registry import VIRTIO_KINDS
    from devicemodel.registry import create_virtio as create_device

    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    dev = create_device("virtio-blk", f"{img},ro")
    try:
        assert dev.name == "virtio-blk" and dev.pci_ids.legacy_device_id == 0x1001
    finally:
        dev.close()
    assert create_device("virtio-rnd", "").pci_ids.class_code == 0x100000
    assert set(VIRTIO_KINDS) == {"virtio-blk", "virtio-net", "virtio-console", "virtio-rnd"}
