"""The vhost-user back end over its real socket, driven by our Python front end.

What QEMU does at device start (negotiate, share memory, program and kick rings) is played
here with a memfd-backed guest RAM and the virtio mock driver, so each step can be checked:
the bytes the device wrote land in the shared memory, the call eventfd fires, stopping a
ring reports its position, a reconnecting front end starts from a clean slate.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
import trio

from devicemodel.memory import GuestMemory, MiB
from devicemodel.vhost_user import protocol as p
from devicemodel.vhost_user.backend import VhostUserBackend
from devicemodel.vhost_user.connection import Connection
from devicemodel.vhost_user.frontend import Frontend, RingSetup
from devicemodel.vhost_user.protocol import Req
from devicemodel.vhost_user.server import serve
from devicemodel.virtio.blk import VirtioBlk, parse_blk_options
from devicemodel.virtio.mock import wait_used
from devicemodel.virtio.rnd import VirtioRnd
from tests.support.vhost import NO_EVENT_IDX, disk_image, frontend, served, start

BLK_IN = 0
BLK_OUT = 1


async def test_rnd_fills_a_guest_buffer_and_signals_the_call_eventfd(tmp_path: Path) -> None:
    sock = tmp_path / "rnd.sock"
    mem = GuestMemory(128 * MiB)
    async with served(VirtioRnd(), sock), frontend(sock) as fe:
        features = await fe.negotiate()
        assert features & p.F_PROTOCOL_FEATURES
        drv = await start(fe, mem)
        head = drv.add_chain(writable=[64])
        fe.kick_ring(0)
        await fe.wait_call(0)
        assert drv.get_used() == [(head, 64)]
        data = drv.written(head)
        assert data != b"\xa5" * 64 and len(set(data)) > 8  # random, not the mock's fill
        # GET_VRING_BASE stops the ring and reports the next avail index it would use.
        assert await fe.stop_ring(0) == 1


async def test_stopped_ring_restarts_where_it_stopped(tmp_path: Path) -> None:
    sock = tmp_path / "rnd.sock"
    mem = GuestMemory(128 * MiB)
    async with served(VirtioRnd(), sock), frontend(sock) as fe:
        await fe.negotiate(NO_EVENT_IDX)
        drv = await start(fe, mem)
        for _ in range(3):
            drv.add_chain(writable=[16])
        fe.kick_ring(0)
        await fe.wait_call(0)
        assert await fe.stop_ring(0) == 3
        # While stopped, a new request stays unanswered ...
        head = drv.add_chain(writable=[16])
        await trio.sleep(0.05)
        assert drv.used_idx() == 3
        # ... until the ring is started again from base 3.
        await fe.start_ring(RingSetup(0, 64, drv.desc_addr, drv.avail_addr, drv.used_addr, 3))
        fe.kick_ring(0)
        await fe.wait_call(0)
        got = drv.get_used()
        assert got[-1] == (head, 16) and drv.used_idx() == 4


async def test_disabled_ring_is_not_processed(tmp_path: Path) -> None:
    sock = tmp_path / "rnd.sock"
    mem = GuestMemory(128 * MiB)
    async with served(VirtioRnd(), sock), frontend(sock) as fe:
        await fe.negotiate(NO_EVENT_IDX)
        drv = await start(fe, mem, enable=False)
        drv.add_chain(writable=[16])
        fe.kick_ring(0)
        await trio.sleep(0.05)
        assert drv.used_idx() == 0
        await fe.send(Req.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 1))
        await fe.wait_call(0)
        assert drv.used_idx() == 1


async def test_blk_config_and_write_reach_the_image(tmp_path: Path) -> None:
    img = disk_image(tmp_path)
    sock = tmp_path / "blk.sock"
    mem = GuestMemory(128 * MiB)
    dev = VirtioBlk(parse_blk_options(str(img)))
    async with served(dev, sock), frontend(sock) as fe:
        await fe.negotiate(NO_EVENT_IDX)
        assert await fe.call_u64(Req.GET_QUEUE_NUM) == 1
        cfg = await fe.get_config(0, 60)
        assert len(cfg) == 60 and struct.unpack_from("<Q", cfg)[0] == 2048  # sectors
        drv = await start(fe, mem)
        pattern = bytes(range(256)) * 2
        head = drv.add_chain(readable=[struct.pack("<IIQ", BLK_OUT, 0, 3), pattern],
                             writable=[1])
        fe.kick_ring(0)
        await fe.wait_call(0)
        # the interrupt may come before a write finishes on its thread: wait for the entry
        assert await wait_used(drv, 1) == [(head, 1)] and drv.written(head) == b"\0"
        assert img.read_bytes()[3 * 512 : 4 * 512] == pattern
        head = drv.add_chain(readable=[struct.pack("<IIQ", BLK_IN, 0, 3)], writable=[512, 1])
        fe.kick_ring(0)
        await fe.wait_call(0)
        assert await wait_used(drv, 1) == [(head, 513)]
        assert drv.written(head) == pattern + b"\0"
    dev.close()


async def test_blk_set_config_toggles_the_write_cache(tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    wce = 32  # virtio_blk_config.writeback
    dev = VirtioBlk(parse_blk_options(f"{disk_image(tmp_path)},writeback"))
    async with served(dev, sock), frontend(sock) as fe:
        await fe.negotiate()
        assert await fe.get_config(wce, 1) == b"\1"
        await fe.send(Req.SET_CONFIG, p.CONFIG_HEADER.pack(wce, 1, 0) + b"\0")
        assert await fe.get_config(wce, 1) == b"\0"
        # a read-only field stays as it was
        before = await fe.get_config(0, 8)
        await fe.send(Req.SET_CONFIG, p.CONFIG_HEADER.pack(0, 8, 0) + bytes(8))
        assert await fe.get_config(0, 8) == before
    dev.close()


async def test_reconnect_starts_from_a_clean_slate(tmp_path: Path) -> None:
    sock = tmp_path / "rnd.sock"
    mem = GuestMemory(128 * MiB)
    dev = VirtioRnd()
    async with served(dev, sock):
        for _ in range(2):
            async with frontend(sock) as fe:
                await fe.negotiate(NO_EVENT_IDX)
                drv = await start(fe, mem)
                head = drv.add_chain(writable=[8])
                fe.kick_ring(0)
                await fe.wait_call(0)
                assert drv.get_used() == [(head, 8)]
            await trio.sleep(0.05)
            # After the hang-up the device is inactive: no queues, no session.
            assert dev.queues == [] and dev.quiescent


def _ram_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("memfd:guest-ram-low" in line for line in f)


async def test_new_memory_table_while_running_keeps_the_ring_going(tmp_path: Path) -> None:
    sock = tmp_path / "rnd.sock"
    mem = GuestMemory(128 * MiB)
    async with served(VirtioRnd(), sock), frontend(sock) as fe:
        await fe.negotiate(NO_EVENT_IDX)
        drv = await start(fe, mem)
        drv.add_chain(writable=[8])
        fe.kick_ring(0)
        await fe.wait_call(0)
        assert await fe.set_mem_table(mem) == 0  # e.g. after memory hot-plug
        head = drv.add_chain(writable=[8])
        fe.kick_ring(0)
        await fe.wait_call(0)
        assert drv.get_used()[-1] == (head, 8) and drv.used_idx() == 2


async def test_backend_unmaps_memory_when_the_front_end_leaves() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev = VirtioRnd()
    backend = VhostUserBackend(dev)
    mem = GuestMemory(128 * MiB)
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        fe = Frontend(Connection(trio.socket.from_stdlib_socket(a)))
        done = trio.Event()

        async def run_backend() -> None:
            await backend.serve(Connection(trio.socket.from_stdlib_socket(b)))
            done.set()

        nursery.start_soon(run_backend)
        await fe.negotiate(NO_EVENT_IDX)
        # other tests in this process may still hold guest RAM of their own: count from here
        base = _ram_mappings()  # includes the front end's own mapping
        assert await fe.set_mem_table(mem) == 0
        assert backend.mem is not None and backend.mem.total == mem.total
        assert _ram_mappings() == base + 1  # ... and the back end's
        fe.close()
        with trio.fail_after(5):
            await done.wait()
        assert backend.mem is None and backend.features == 0
        assert _ram_mappings() == base
        nursery.cancel_scope.cancel()


async def test_reply_ack_reports_failure_then_drops(tmp_path: Path) -> None:
    sock = tmp_path / "rnd.sock"
    async with served(VirtioRnd(), sock):
        async with frontend(sock) as fe:
            await fe.negotiate(NO_EVENT_IDX)
            # ring 7 does not exist on an entropy device (one queue)
            assert await fe.ack(Req.SET_VRING_NUM, p.VRING_STATE.pack(7, 64)) != 0
            with pytest.raises(ConnectionError):
                await fe.read_reply(Req.GET_FEATURES)
        async with frontend(sock) as fe:  # the server survived and serves again
            assert await fe.call_u64(Req.GET_FEATURES) & p.F_PROTOCOL_FEATURES


async def test_unoffered_features_are_refused(tmp_path: Path) -> None:
    sock = tmp_path / "rnd.sock"
    async with served(VirtioRnd(), sock), frontend(sock) as fe:
        await fe.call_u64(Req.GET_FEATURES)
        await fe.send(Req.SET_FEATURES, p.U64.pack(1 << 40))
        with pytest.raises(ConnectionError):
            await fe.call_u64(Req.GET_FEATURES)


async def test_rnd_offers_no_config_protocol_feature_blk_does(tmp_path: Path) -> None:
    for dev, has_config in ((VirtioRnd(), False),
                            (VirtioBlk(parse_blk_options(str(disk_image(tmp_path)))), True)):
        sock = tmp_path / "x.sock"
        async with served(dev, sock), frontend(sock) as fe:
            await fe.call_u64(Req.GET_FEATURES)
            proto = await fe.call_u64(Req.GET_PROTOCOL_FEATURES)
            assert bool(proto & 1 << p.PROTOCOL_F_CONFIG) == has_config
            assert proto & 1 << p.PROTOCOL_F_REPLY_ACK and proto & 1 << p.PROTOCOL_F_MQ


async def test_inherited_connected_fd_serves_then_exits() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.dup(b.fileno())
    b.close()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve(VirtioRnd(), fd=fd))
            fe = Frontend(Connection(trio.socket.from_stdlib_socket(a)))
            assert await fe.call_u64(Req.GET_FEATURES) & p.F_PROTOCOL_FEATURES
            fe.close()  # hang up: serve() returns by itself
