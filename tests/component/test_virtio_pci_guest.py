"""The virtio-pci transport's core paths, driven by a guest-side driver that replays
Linux's drivers/virtio/virtio_pci_{modern,legacy,common}.c through the sim hypervisor
(tests/support/virtio_pci_driver.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from devicemodel.virtio.blk import (
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
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
from devicemodel.virtio.pci import VirtioPci
from tests.support.virtio_pci_driver import (
    CFGGEN,
    NO_VECTOR,
    NUMQ,
    STATUS,
    VirtioPciDriver,
    blk_read,
    blk_simple,
    blk_status,
    blk_write,
    count_trapped_kicks,
    vm_with,
)


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
            assert t.modern.read(STATUS, 1) != 0
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


async def test_blk_queues_behind_an_ioeventfd_are_served_on_a_data_plane_thread(
        image: Path) -> None:
    """With the backend's ioeventfd, the queue's kicks wake a data-plane thread of its own
    (the loop stops watching that doorbell), which serves the ring and signals the irqfd;
    a status-0 reset ends the thread and gives the doorbell back to the loop, and the next
    activation gets a new thread."""
    import threading

    async with vm_with(f"3,virtio-blk,{image},modern") as (vm, sim, pci):
        t: VirtioPci = vm.device(3)
        assert t.doorbells is not None
        trapped = count_trapped_kicks(t)

        def planes() -> list[str]:
            return [th.name for th in threading.enumerate() if th.name == f"{t.name}-q0"]

        drv = await VirtioPciDriver.probe(sim, pci, 3, legacy=False)
        for round_ in range(2):
            await drv.init()
            await drv.enable_msix(2)
            await drv.set_config_vector(0)
            q = await drv.setup_queue(0, vector=1)
            await drv.driver_ok()
            payload = bytes([round_ + 1]) * 4096
            w = blk_write(q, 8 + 16 * round_, payload)
            await drv.kick(0)
            await drv.wait_msi(1)
            assert await drv.wait_used(0) == [(w, 1)] and blk_status(q, w) == 0
            assert len(planes()) == 1  # one thread for the queue, not one per request
            assert 0 not in t.doorbells._watchers  # the loop no longer reads its eventfd
            await drv.reset()
            assert planes() == [] and 0 in t.doorbells._watchers
        data = image.read_bytes()
        assert data[8 * 512:8 * 512 + 4096] == b"\1" * 4096
        assert data[24 * 512:24 * 512 + 4096] == b"\2" * 4096
        assert trapped == [] and t.irqfd_sent >= 2
