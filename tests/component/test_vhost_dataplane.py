"""virtio-blk served over vhost-user on a data-plane thread (virtio/dataplane.py).

The thread waits on the front end's kick eventfd and signals the call eventfd itself; the
loop keeps the control plane. What a front end does to a running ring must still work:
swap the call or kick eventfd, stop the ring with requests in flight, break the ring, go
away in the middle of I/O.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest
import trio

from devicemodel.memory import GuestMemory, MiB
from devicemodel.vhost_user import protocol as p
from devicemodel.vhost_user.frontend import UVA_BASE, RingSetup
from devicemodel.vhost_user.protocol import Req
from devicemodel.virtio.blk import VirtioBlk, parse_blk_options
from devicemodel.virtio.blk.io import image as blk_image
from devicemodel.virtio.mock import MockDriver, wait_used
from tests.support.vhost import (
    NO_EVENT_IDX,
    RING_BASE,
    disk_image,
    frontend,
    served,
    start,
)

BLK_IN, BLK_OUT = 0, 1


def _dataplanes() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "virtio-blk-q0"]


def _write(drv, sector: int, data: bytes) -> int:  # noqa: ANN001 - MockDriver
    """A write as Linux posts it: one ring descriptor, an indirect table."""
    return drv.add_chain(readable=[struct.pack("<IIQ", BLK_OUT, 0, sector), data],
                         writable=[1], indirect=True)


async def _eventually(check, what: str) -> None:  # noqa: ANN001
    with trio.fail_after(5):
        while not check():
            await trio.sleep(0.005)


async def test_requests_run_on_the_data_plane_thread(tmp_path: Path) -> None:
    img = disk_image(tmp_path, 4 * MiB)
    mem = GuestMemory(128 * MiB)
    dev = VirtioBlk(parse_blk_options(f"{img},writeback"))
    try:
        async with served(dev, tmp_path / "s"), frontend(tmp_path / "s") as fe:
            await fe.negotiate(NO_EVENT_IDX)
            drv = await start(fe, mem)
            data = os.urandom(64 * 1024)
            head = _write(drv, 8, data)
            fe.kick_ring(0)
            await fe.wait_call(0)
            assert await wait_used(drv, 1) == [(head, 1)]
            assert _dataplanes() == ["virtio-blk-q0"]
            head = drv.add_chain(readable=[struct.pack("<IIQ", BLK_IN, 0, 8)],
                                 writable=[len(data), 1])
            fe.kick_ring(0)
            await fe.wait_call(0)
            assert await wait_used(drv, 1) == [(head, len(data) + 1)]
            assert drv.written(head) == data + b"\0"
            assert await fe.stop_ring(0) == 2
            await _eventually(lambda: not _dataplanes(), "the thread to end")
        assert img.read_bytes()[8 * 512 : 8 * 512 + len(data)] == data
    finally:
        dev.close()
        mem.close()


@pytest.mark.parametrize("features", [NO_EVENT_IDX, ~0], ids=["no-event-idx", "linux"])
async def test_call_and_kick_fds_swapped_while_running(tmp_path: Path, features: int) -> None:
    """QEMU replaces the call fd when the guest masks a vector, and may replace the kick
    fd: interrupts go to the new call fd, kicks on the new kick fd are served. (With
    Linux's features the thread runs blk's own loop, ``lane.py``; the driver asks for
    an interrupt for every request, as Linux does.)"""
    mem = GuestMemory(128 * MiB)
    dev = VirtioBlk(parse_blk_options(str(disk_image(tmp_path))))
    try:
        async with served(dev, tmp_path / "s"), frontend(tmp_path / "s") as fe:
            await fe.negotiate(features)
            drv = await start(fe, mem)
            _write(drv, 0, b"a" * 512)
            fe.kick_ring(0)
            await fe.wait_call(0)
            old_call, old_kick = fe.call[0], fe.kick[0]
            fe.call[0] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fe.kick[0] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            await fe.send(Req.SET_VRING_CALL, p.U64.pack(0), [fe.call[0]])
            await fe.send(Req.SET_VRING_KICK, p.U64.pack(0), [fe.kick[0]])
            await fe.call_u64(Req.GET_FEATURES)  # both applied once this is answered
            await trio.sleep(0.05)  # and settled
            drv.set_used_event(1)  # the driver has seen used idx 1
            head = _write(drv, 1, b"b" * 512)
            fe.kick_ring(0)
            await fe.wait_call(0)  # the new call fd
            assert (head, 1) in await wait_used(drv, 1)
            try:
                os.eventfd_read(old_call)
                raise AssertionError("the replaced call fd was signalled")
            except BlockingIOError:
                pass
            for fd in (old_call, old_kick):
                os.close(fd)
    finally:
        dev.close()
        mem.close()


async def test_stop_with_requests_in_flight_then_restart(tmp_path: Path, monkeypatch) -> None:
    """GET_VRING_BASE while the thread writes: every request it took is completed
    before the reply, and a restart from that base serves the rest."""
    real = blk_image.pwritev_all

    def slow_disk(*args):  # noqa: ANN002 - a batch of 32 takes 0.6 s: the stop lands in one
        time.sleep(0.02)
        return real(*args)

    monkeypatch.setattr(blk_image, "pwritev_all", slow_disk)
    img = disk_image(tmp_path, 8 * MiB)
    mem = GuestMemory(256 * MiB)
    dev = VirtioBlk(parse_blk_options(str(img)))  # writethrough: each write is synced
    blocks = [os.urandom(16 * 1024) for _ in range(96)]  # three batches of 32
    try:
        async with served(dev, tmp_path / "s"), frontend(tmp_path / "s") as fe:
            await fe.negotiate(NO_EVENT_IDX)
            drv = await start(fe, mem, size=128)
            for k, data in enumerate(blocks):
                _write(drv, 128 * k, data)
            fe.kick_ring(0)
            await _eventually(lambda: drv.used_idx() > 0, "the first completion")
            base = await fe.stop_ring(0)
            assert drv.used_idx() == base, "a request was taken but not completed"
            assert base < len(blocks), "the thread finished before the stop: no test"
            await fe.start_ring(RingSetup(0, 128, drv.desc_addr, drv.avail_addr,
                                          drv.used_addr, base))
            fe.kick_ring(0)
            await _eventually(lambda: drv.used_idx() == len(blocks), "the rest")
            assert all(n == 1 for _, n in drv.get_used())
        disk = img.read_bytes()
        for k, data in enumerate(blocks):
            assert disk[128 * k * 512 : 128 * k * 512 + len(data)] == data
    finally:
        dev.close()
        mem.close()


async def test_a_broken_ring_fails_the_device_not_the_back_end(tmp_path: Path) -> None:
    mem = GuestMemory(128 * MiB)
    dev = VirtioBlk(parse_blk_options(str(disk_image(tmp_path))))
    try:
        async with served(dev, tmp_path / "s"), frontend(tmp_path / "s") as fe:
            await fe.negotiate(NO_EVENT_IDX)
            drv = await start(fe, mem)
            err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fe.err[0] = err
            await fe.send(Req.SET_VRING_ERR, p.U64.pack(0), [err])
            await trio.sleep(0.05)
            drv.write_desc(0, 0x1000, 16, 1, 0)  # a descriptor that chains to itself
            drv.set_avail_entry(0, 0)
            drv.set_avail_idx(1)
            fe.kick_ring(0)
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(err)
            assert "loops" in (dev.failure or "")
            await _eventually(lambda: not _dataplanes(), "the thread to end")
            assert len(await fe.get_config(0, 8)) == 8  # the back end still answers
    finally:
        dev.close()
        mem.close()


async def test_front_end_leaves_in_the_middle_of_io(tmp_path: Path) -> None:
    """The memory is unmapped only once the thread is done with it; the next front end
    is served from a clean slate."""
    mem = GuestMemory(256 * MiB)
    dev = VirtioBlk(parse_blk_options(str(disk_image(tmp_path, 8 * MiB))))
    try:
        async with served(dev, tmp_path / "s"):
            async with frontend(tmp_path / "s") as fe:
                await fe.negotiate(NO_EVENT_IDX)
                drv = await start(fe, mem, size=64)
                for k in range(48):
                    _write(drv, 128 * k, os.urandom(64 * 1024))
                fe.kick_ring(0)
            await _eventually(lambda: not _dataplanes(), "the thread to end")
            async with frontend(tmp_path / "s") as fe:
                await fe.negotiate(NO_EVENT_IDX)
                drv = await start(fe, mem, base=0x200_0000)
                head = _write(drv, 0, b"c" * 512)
                fe.kick_ring(0)
                await fe.wait_call(0)
                assert await wait_used(drv, 1) == [(head, 1)]
    finally:
        dev.close()
        mem.close()


async def test_a_kick_pipe_that_hangs_up_leaves_the_ring_served(tmp_path: Path) -> None:
    """A front end whose kick fd is a pipe: a partial value, then the writer hangs up.
    The thread neither stops the device nor spins; kicks on a new kick fd are served."""
    mem = GuestMemory(128 * MiB)
    dev = VirtioBlk(parse_blk_options(str(disk_image(tmp_path))))
    r, w = os.pipe()
    try:
        async with served(dev, tmp_path / "s"), frontend(tmp_path / "s") as fe:
            await fe.negotiate(NO_EVENT_IDX)
            assert await fe.set_mem_table(mem) == 0
            drv = MockDriver(mem, RING_BASE, 64)
            await fe.send(Req.SET_VRING_NUM, p.VRING_STATE.pack(0, 64))
            await fe.send(Req.SET_VRING_BASE, p.VRING_STATE.pack(0, 0))
            await fe.send(Req.SET_VRING_ADDR, p.VRING_ADDR.pack(
                0, 0, UVA_BASE + drv.desc_addr, UVA_BASE + drv.used_addr,
                UVA_BASE + drv.avail_addr, 0))
            fe.call[0] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            await fe.send(Req.SET_VRING_KICK, p.U64.pack(0), [r])  # the pipe, from the start
            await fe.send(Req.SET_VRING_CALL, p.U64.pack(0), [fe.call[0]])
            await fe.send(Req.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 1))
            await _eventually(lambda: _dataplanes() == ["virtio-blk-q0"], "the thread")
            os.write(w, b"\1\0\0")  # three bytes of an eventfd value
            os.close(w)
            w = -1
            await trio.sleep(0.2)
            assert dev.failure is None
            cpu = _thread_cpu_seconds("virtio-blk-q0")
            await trio.sleep(0.3)
            assert _thread_cpu_seconds("virtio-blk-q0") - cpu < 0.1, "the thread spins"
            fe.kick[0] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            await fe.send(Req.SET_VRING_KICK, p.U64.pack(0), [fe.kick[0]])
            head = _write(drv, 0, b"k" * 512)
            fe.kick_ring(0)
            await fe.wait_call(0)
            assert await wait_used(drv, 1) == [(head, 1)]
            assert dev.failure is None
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        dev.close()
        mem.close()


def _thread_cpu_seconds(name: str) -> float:
    """User + system CPU time of the live thread called ``name`` (from /proc)."""
    (t,) = [t for t in threading.enumerate() if t.name == name]
    with open(f"/proc/self/task/{t.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
