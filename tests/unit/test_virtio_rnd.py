"""virtio-rnd through the mock driver."""

from __future__ import annotations

import pytest
import trio

from devicemodel.config import ConfigError
from devicemodel.virtio.mock import MockDriver, RecordingInterrupt, wait_used
from devicemodel.virtio.rnd import VirtioRnd, parse_rnd_options


async def test_fills_buffers_with_entropy(mem):
    dev = VirtioRnd()
    drv = MockDriver(mem, 0x100000, 64)
    irq = RecordingInterrupt()
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        dev.activate(dev.device_features, [drv.queue()], irq)
        a = drv.add_chain([], [64])
        b = drv.add_chain([], [16, 48], indirect=True)
        dev.queue_notify(0)
        used = dict(await wait_used(drv, 2))
        assert used == {a: 64, b: 64}
        da, db = drv.written(a), drv.written(b)
        assert da != db and da != b"\xa5" * 64 and len(set(da)) > 16
        assert irq.queue_irqs
        assert dev.pci_ids.legacy_device_id == 0x1005 and dev.config_size == 0
        nursery.cancel_scope.cancel()


async def test_rate_limit_shortens_and_paces(mem):
    dev = VirtioRnd(parse_rnd_options("max-bytes=100,period=200"))
    drv = MockDriver(mem, 0x100000, 64)
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        dev.activate(dev.device_features, [drv.queue()], RecordingInterrupt())
        t0 = trio.current_time()
        for _ in range(3):
            drv.add_chain([], [64])
        dev.queue_notify(0)
        used = await wait_used(drv, 3)
        elapsed = trio.current_time() - t0
        assert [n for _, n in used] == [64, 36, 64]
        assert 0.15 < elapsed < 1.0
        nursery.cancel_scope.cancel()


def test_options():
    assert parse_rnd_options("").max_bytes is None
    with pytest.raises(ConfigError, match="speed=1"):
        parse_rnd_options("speed=1")
    with pytest.raises(ConfigError, match="max-bytes=x"):
        parse_rnd_options("max-bytes=x")
