"""Hostile workloads that try to make the device model grow (tests/component/
test_resource_bounds.py and bench/hostile_rss.py share them).

Each runs against a sim VM (or a device on the mock transport) for ``rounds`` and returns
what it observed, so a test can check the bound and the bench can measure peak RSS.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass, field

import trio

from devicemodel.guestkit.virtio_guest import VirtioGuest
from devicemodel.hsm import abi
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.virtio.mock import FakeTap, MockDriver, RecordingInterrupt
from devicemodel.virtio.net import VirtioNet, parse_net_options
from devicemodel.virtio.queue import Virtqueue
from devicemodel.vm import running

SLOT_BLK, SLOT_CON = 4, 6


@dataclass
class Observed:
    max_tasks: int = 0
    max_threads: int = 0
    blk_requests: int = 0
    console_bytes_offered: int = 0
    console_bytes_taken: int = 0
    net_frames_sent: int = 0
    net_frames_taken: int = 0
    log_records: int = 0
    bad_requests: int = 0
    notes: list[str] = field(default_factory=list)


def count_tasks() -> int:
    """Live trio tasks in this run (walks the task tree from the root)."""
    n = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        t = stack.pop()
        n += 1
        for nursery in t.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n


def vm_args(directory: str) -> tuple[list[str], str]:
    image = os.path.join(directory, "disk.img")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    sock = os.path.join(directory, "con.sock")
    return ["-m", "256M", "-s", "0:0,hostbridge",
            "-s", f"{SLOT_BLK},virtio-blk,{image},writeback",
            "-s", "5,virtio-rnd",
            "-s", f"{SLOT_CON},virtio-console,socket:con0={sock}:server",
            "hostile"], sock


async def idle(seconds: float = 1.0, directory: str | None = None) -> Observed:
    """A VM whose guest does nothing: the baseline."""
    directory = directory or tempfile.mkdtemp(prefix="acrn-idle-")
    args, _ = vm_args(directory)
    obs = Observed()
    async with running(args, hypervisor=SimHypervisor()):
        await trio.sleep(seconds)
        obs.max_tasks = count_tasks()
        obs.max_threads = threading.active_count()
    return obs


async def blk_flood(obs: Observed, vm, sim, rounds: int, chunk: int = 64 * 1024) -> None:
    """Keep blk's queue full of large reads and writes: in-flight work is bounded by the
    queue, threads by the device's limiter."""
    g = VirtioGuest(vm, sim.guest(0), SLOT_BLK, modern=False, ram_base=0x0100_0000)
    await g.init()
    drv = g.drivers[0]
    drv.data_end = drv.data_base + 0x80_0000  # room for a queue of large buffers
    slots = drv.size // 3  # header + data + status per chain
    for r in range(rounds):
        for i in range(slots):
            write = (r + i) & 1
            sector = ((r * slots + i) * chunk // 512) % ((64 << 20) // 512 - chunk // 512)
            if write:
                drv.add_chain([struct.pack("<IIQ", 1, 0, sector), b"w" * chunk], [1])
            else:
                drv.add_chain([struct.pack("<IIQ", 0, 0, sector)], [chunk, 1])
        await g.notify(0)
        got: list[tuple[int, int]] = []
        with trio.fail_after(60):
            while len(got) < slots:
                obs.max_tasks = max(obs.max_tasks, count_tasks())
                obs.max_threads = max(obs.max_threads, threading.active_count())
                got += drv.get_used()
                await trio.sleep(0.0005)
        obs.blk_requests += slots


async def console_backlog(obs: Observed, vm, sim, sock_path: str, rounds: int,
                          chunk: int = 32 * 1024) -> socket.socket:
    """A console port whose peer connects and never reads, while the guest writes."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(sock_path)
    peer.setblocking(False)
    await trio.sleep(0.05)  # the device accepts the connection
    g = VirtioGuest(vm, sim.guest(0), SLOT_CON, modern=False, ram_base=0x0400_0000)
    await g.init()
    tx = g.drivers[1]
    taken = 0
    for _ in range(rounds):
        try:
            tx.add_chain([b"c" * chunk], [])
        except RuntimeError:  # the ring is full: the device stopped taking our data
            pass
        else:
            obs.console_bytes_offered += chunk
        await g.notify(1)
        await trio.sleep(0.001)
        taken += sum(1 for _ in tx.get_used())
        obs.max_tasks = max(obs.max_tasks, count_tasks())
    obs.console_bytes_taken = taken * chunk
    return peer


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


async def log_flood(obs: Observed, vm, sim, rounds: int) -> None:
    """Requests the server rejects and drivers that break the protocol, over and over:
    what reaches the log is bounded by the rate limiters, not by the guest."""
    counter = _Count()
    root = logging.getLogger("devicemodel")
    root.addHandler(counter)
    try:
        server = vm.server
        g = VirtioGuest(vm, sim.guest(0), 5, modern=False, ram_base=0x0600_0000)
        page = server.page
        for i in range(rounds):
            # a slot of an unknown type (logged by the server), straight into the page
            off = abi.slot_offset(0)
            abi.SLOT_U32.pack_into(page, off + abi.SLOT_TYPE_OFF, 0x77)
            server.handle_slot(off)
            # a driver that makes the device fail (logged by the device)
            if i % 50 == 0:
                await g.init()
                drv = g.drivers[0]
                drv.set_avail_entry(0, 0xFFFF)
                drv.set_avail_idx(1)
                await g.notify(0)
                await trio.sleep(0)
            obs.bad_requests += 1
    finally:
        root.removeHandler(counter)
    obs.log_records = counter.n


async def net_rx_flood(obs: Observed, frames: int, guest_buffers: int = 4) -> FakeTap:
    """The host sends frames faster than the guest posts rx buffers: the frames wait in
    the kernel (the tap), not in the device model."""
    from devicemodel.memory import GuestMemory

    mem = GuestMemory(128 << 20)
    tap = FakeTap()
    dev = VirtioNet(parse_net_options("tap=faketap"), tap=tap)  # type: ignore[arg-type]
    rx = MockDriver(mem, 0x10_0000, 256, index=0)
    txq = MockDriver(mem, 0x50_0000, 256, index=1)
    irq = RecordingInterrupt()
    tap.host.setblocking(False)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run)
            feats = dev.device_features & ~(1 << 29)
            rest = [Virtqueue(mem, i, dev.queue_max_size(i)) for i in range(2, dev.num_queues)]
            dev.activate(feats, [rx.queue(), txq.queue(), *rest], irq)
            for _ in range(guest_buffers):
                rx.add_chain([], [2048])
            dev.queue_notify(0)
            frame = b"\x00" * 1400
            for _ in range(frames):
                try:
                    tap.host.send(frame)
                    obs.net_frames_sent += 1
                except BlockingIOError:
                    obs.notes.append("tap full: the host is paced by the kernel")
                    break
                await trio.sleep(0)
            await trio.sleep(0.05)
            obs.net_frames_taken = len(rx.get_used())
            nursery.cancel_scope.cancel()
    finally:
        dev.close()
        mem.close()
    return tap


async def hostile(rounds: int, directory: str | None = None) -> Observed:
    """Every hostile workload on one VM."""
    directory = directory or tempfile.mkdtemp(prefix="acrn-hostile-")
    args, sock = vm_args(directory)
    obs = Observed()
    sim = SimHypervisor()
    async with running(args, hypervisor=sim) as vm:
        await blk_flood(obs, vm, sim, rounds)
        peer = await console_backlog(obs, vm, sim, sock, rounds * 4)
        await log_flood(obs, vm, sim, rounds * 100)
        peer.close()
    await net_rx_flood(obs, rounds * 200)
    return obs
