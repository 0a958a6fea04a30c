"""Queues served on the loop are looked at again when idle (``VirtioDevice._look_after``).

A guest whose memory barriers do not work (QEMU TCG before 8.1 with one vCPU) now and
then misses our avail_event (it then posts buffers without a kick) or our used idx (it
then waits for an interrupt we decided it did not need). Either used to hang the device
until the guest gave up; now it is a pause of ``look_again_s``. Exercised through
virtio-rnd, which serves its queue on the loop."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from devicemodel.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, VirtioDevice
from devicemodel.virtio.mock import MockDriver, RecordingInterrupt, wait_used
from devicemodel.virtio.rnd import VirtioRnd

PAUSE = 0.02
EVENT_IDX = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX


@pytest.fixture(autouse=True)
def _short_pause(monkeypatch):
    monkeypatch.setattr(VirtioDevice, "look_again_s", PAUSE)


async def _started(nursery: trio.Nursery, mem, features: int = EVENT_IDX
                   ) -> tuple[VirtioRnd, MockDriver, RecordingInterrupt]:
    dev = VirtioRnd()
    drv = MockDriver(mem, 0x100000, 64)
    irq = RecordingInterrupt()
    await nursery.start(dev.run)
    dev.activate(features, [drv.queue()], irq)
    await trio.testing.wait_all_tasks_blocked()
    return dev, drv, irq


async def test_buffers_posted_without_a_kick_are_served_after_a_pause(mem):
    async with trio.open_nursery() as nursery:
        dev, drv, _ = await _started(nursery, mem)
        drv.add_chain([], [16])  # and no queue_notify: the kick the guest did not send
        with trio.fail_after(20 * PAUSE):
            assert len(await wait_used(drv, 1)) == 1
        assert dev._session is not None and dev._session.kicked_again == 1
        nursery.cancel_scope.cancel()


async def test_an_interrupt_the_driver_missed_is_sent_again_once(mem):
    async with trio.open_nursery() as nursery:
        dev, drv, irq = await _started(nursery, mem)
        drv.set_used_event(5)  # (stale) no interrupt wanted for the first buffer
        drv.add_chain([], [16])
        dev.queue_notify(0)
        await wait_used(drv, 1)
        assert irq.queue_irqs == []
        drv.set_used_event(0)  # now it wants one for it, but did not see used idx 1
        with trio.fail_after(20 * PAUSE):
            while not irq.queue_irqs:
                await trio.sleep(PAUSE / 4)
        await trio.sleep(5 * PAUSE)
        assert irq.queue_irqs == [0]  # once, not once a pause
        assert dev._session is not None and dev._session.reinterrupted == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("used_event,features", [
    (1, EVENT_IDX),  # it took the used buffer and waits for the next one
    (0x8000, EVENT_IDX),  # interrupts turned off (Linux writes an index far behind)
    (0, VIRTIO_F_VERSION_1),  # no EVENT_IDX: the ring does not say how far it got
])
async def test_no_extra_interrupt_for_a_driver_that_is_not_waiting(mem, used_event, features):
    async with trio.open_nursery() as nursery:
        dev, drv, irq = await _started(nursery, mem, features)
        drv.add_chain([], [16])
        dev.queue_notify(0)
        await wait_used(drv, 1)
        await trio.testing.wait_all_tasks_blocked()
        sent = list(irq.queue_irqs)
        drv.set_used_event(used_event)
        await trio.sleep(5 * PAUSE)
        assert irq.queue_irqs == sent
        assert dev._session is not None and dev._session.reinterrupted == 0
        nursery.cancel_scope.cancel()
