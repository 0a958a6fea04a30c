"""An adversarial guest: virtio drivers that break the spec's "MUST"s one at a time.

One sim VM runs several devices at once (virtio-blk on a temporary image, legacy and
modern; virtio-rnd, transitional; virtio-console with a file backend; dummy; hostbridge).
A guest driver written here talks to them only the way a guest can: port and MMIO
accesses through the sim vCPU (so every access is a real request slot served by the
IoreqServer) and rings in guest RAM. Each case misbehaves against one device and ends in
a verdict (virtio-villain's scale):

* ``PASS``    the device did what the spec asks (ignored the write, refused the feature...)
* ``REJECT``  the device dropped the request or marked itself DEVICE_NEEDS_RESET, and a
              reset brought it back
* ``WEDGED``  another device stopped working, or the target did not come back after reset,
              or something hung
* ``FAIL``    an exception escaped a handler or a device worker, or the device did the
              wrong thing (e.g. a read-only field changed)

After every case each device gets a health check (rnd returns bytes, blk reads sector 0,
console writes to its file, dummy and hostbridge answer config reads).

``python -m tests.support.adversarial`` prints the verdict table; ``tests/component/
test_adversarial.py``
runs the same suite under pytest (``-s`` shows the table).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from devicemodel.guestkit.virtio_guest import (
    C_MSIX,
    C_QDESC,
    C_QMSIX,
    C_QSIZE,
    C_STATUS,
    F_EVENT_IDX,
    F_INDIRECT,
    F_VERSION_1,
    L_PFN,
    L_STATUS,
    S_ACK,
    S_DRIVER,
    S_DRIVER_OK,
    S_FEATURES_OK,
    Rejected,
    VirtioGuest,
    wait_used,
)
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.virtio.mock import MockDriver
from devicemodel.virtio.pci import NO_VECTOR, VirtioPci
from devicemodel.virtio.queue import (
    MAX_INDIRECT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from devicemodel.vm import Vm, running

PASS, REJECT, WEDGED, FAIL = "PASS", "REJECT", "WEDGED", "FAIL"

SLOT_BLK, SLOT_DUMMY, SLOT_RND, SLOT_CON, SLOT_BLK_MODERN, SLOT_NET = 4, 3, 5, 6, 7, 8
IMAGE_PATTERN = bytes(range(256)) * 2


class CaseFailed(Exception):
    """The device did something wrong (not just refused): verdict FAIL."""


# =====================================================================================
# health checks
# =====================================================================================
async def blk_read0(g: VirtioGuest) -> bool:
    drv = g.drivers.get(0)
    if drv is None:
        return False
    head = drv.add_chain([struct.pack("<IIQ", 0, 0, 0)], [512, 1])
    await g.notify(0)
    used = await wait_used(drv)
    if not used:
        return False
    data = drv.written(head)
    return data[512] == 0 and data[:512] == IMAGE_PATTERN


async def rnd_bytes(g: VirtioGuest) -> bool:
    drv = g.drivers.get(0)
    if drv is None:
        return False
    drv.add_chain([], [16])
    await g.notify(0)
    used = await wait_used(drv)
    return bool(used) and used[0][1] > 0


async def console_write(g: VirtioGuest, path: str) -> bool:
    drv = g.drivers.get(1)
    if drv is None:
        return False
    marker = os.urandom(6).hex().encode()
    drv.add_chain([marker], [])
    await g.notify(1)
    if not await wait_used(drv):
        return False
    with trio.move_on_after(2):
        while True:
            with open(path, "rb") as f:
                if marker in f.read():
                    return True
            await trio.sleep(0.005)
    return False


ETH_P_ALL = 3
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def net_available() -> bool:
    """A tap (root, /dev/net/tun) and a packet socket to watch it are both possible.
    ``ACRN_PYDM_ADVERSARIAL_NET=0`` leaves virtio-net out (the sandbox test: a packet
    socket is outside the unit's address families)."""
    if os.environ.get("ACRN_PYDM_ADVERSARIAL_NET") == "0":
        return False
    if not os.access("/dev/net/tun", os.W_OK):
        return False
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)).close()
    except OSError:
        return False
    return True


def watch_tap(name: str) -> socket.socket:
    """Bring tap ``name`` up and return a packet socket that sees what the guest sends."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | IFF_UP))
    ps = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    ps.bind((name, ETH_P_ALL))
    ps.setblocking(False)
    return ps


async def net_send(g: VirtioGuest, sock: socket.socket) -> bool:
    drv = g.drivers.get(1)
    if drv is None:
        return False
    marker = os.urandom(8)
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + marker * 8
    drv.add_chain([bytes(g.dev.device.hdr_len) + frame], [])
    await g.notify(1)
    if not await wait_used(drv):
        return False
    with trio.move_on_after(2):
        while True:
            try:
                if marker in sock.recv(65536):
                    return True
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
    return False


@dataclass
class Env:
    vm: Vm
    sim: SimHypervisor
    console_path: str
    guests: dict[int, VirtioGuest] = field(default_factory=dict)
    net_sock: socket.socket | None = None

    @property
    def slots(self) -> tuple[int, ...]:
        present = {dev for (_, dev, _) in self.vm.devices}
        return tuple(s for s in ALL_SLOTS if s in present)

    async def pci_vendor(self, slot: int) -> int:
        return await self.sim.guest(0).pci_cfg_read(0, slot, 0, 0, 2)

    async def healthy(self, slot: int) -> bool:
        """Bring ``slot`` up from reset if needed and prove it moves data."""
        if slot == SLOT_DUMMY:
            return await self.pci_vendor(slot) == 0x10DD
        if slot == 0:
            return await self.pci_vendor(0) == 0x1275
        g = self.guests[slot]
        if await g.needs_reset() or not await g.status() & S_DRIVER_OK or not g.drivers:
            await g.init()
        if slot in (SLOT_BLK, SLOT_BLK_MODERN):
            return await blk_read0(g)
        if slot == SLOT_RND:
            return await rnd_bytes(g)
        if slot == SLOT_NET:
            assert self.net_sock is not None
            return await net_send(g, self.net_sock)
        return await console_write(g, self.console_path)


ALL_SLOTS = (0, SLOT_DUMMY, SLOT_BLK, SLOT_RND, SLOT_CON, SLOT_BLK_MODERN, SLOT_NET)


# =====================================================================================
# the cases
# =====================================================================================
Case = Callable[[Env, VirtioGuest], Awaitable[str | None]]


@dataclass
class CaseSpec:
    name: str
    fn: Case
    slots: tuple[int, ...]


CASES: list[CaseSpec] = []
VIRTIO_SLOTS = (SLOT_BLK, SLOT_RND, SLOT_CON, SLOT_BLK_MODERN, SLOT_NET)
MODERN_SLOTS = (SLOT_RND, SLOT_BLK_MODERN)


def case(name: str, slots: tuple[int, ...] = VIRTIO_SLOTS):
    def deco(fn: Case) -> Case:
        CASES.append(CaseSpec(name, fn, slots))
        return fn
    return deco


def data_queue(g: VirtioGuest) -> int:
    return 1 if g.slot in (SLOT_CON, SLOT_NET) else 0  # their transmit queues


async def expect_reset_or_drop(g: VirtioGuest, drv: MockDriver) -> str:
    """After a malformed ring: NEEDS_RESET (REJECT), or nothing used and still alive."""
    q = drv.index
    await g.notify(q)
    used = await wait_used(drv, 1, timeout=0.3)
    if await g.needs_reset():
        return REJECT
    if used is None:
        return REJECT  # dropped; the health check decides whether it is alive
    raise CaseFailed(f"a malformed chain was completed: {used}")


@case("avail.idx far ahead of the queue size")
async def _bad_avail_idx(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[data_queue(g)]
    drv.add_chain([b"x" * 16], [16], publish=False)
    drv.set_avail_idx(drv.size + 5)
    return await expect_reset_or_drop(g, drv)


@case("head index >= queue size")
async def _bad_head(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[data_queue(g)]
    drv.set_avail_entry(0, drv.size + 3)
    drv.set_avail_idx(1)
    return await expect_reset_or_drop(g, drv)


@case("descriptor chain loops on itself")
async def _loop(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[data_queue(g)]
    buf = drv.alloc(64)
    drv.write_desc(0, buf, 16, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, buf, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0)
    drv.publish(0)
    return await expect_reset_or_drop(g, drv)


@case("chain longer than the queue (indirect table > limit)")
async def _oversized(env: Env, g: VirtioGuest) -> str:
    await g.init(features=None)
    drv = g.drivers[data_queue(g)]
    table = drv.alloc(16 * (MAX_INDIRECT + 1))
    buf = drv.alloc(16)
    for i in range(MAX_INDIRECT + 1):
        drv.write_desc(i, buf, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, i + 1, table=table)
    drv.write_desc(0, table, 16 * (MAX_INDIRECT + 1), VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(0)
    return await expect_reset_or_drop(g, drv)


@case("direct chain of queue size + 1 descriptors (next wraps)")
async def _long_direct(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[data_queue(g)]
    buf = drv.alloc(16)
    for i in range(drv.size):
        drv.write_desc(i, buf, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, (i + 1) % drv.size)
    drv.publish(0)
    return await expect_reset_or_drop(g, drv)


@case("buffer address outside guest RAM")
async def _buf_outside(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[data_queue(g)]
    drv.write_desc(0, 0xF000_0000_0000, 512, VIRTQ_DESC_F_WRITE, 0)
    drv.publish(0)
    return await expect_reset_or_drop(g, drv)


@case("buffer that wraps around 2^64")
async def _buf_wrap(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[data_queue(g)]
    drv.write_desc(0, 2**64 - 8, 64, VIRTQ_DESC_F_WRITE, 0)
    drv.publish(0)
    return await expect_reset_or_drop(g, drv)


@case("indirect descriptor without INDIRECT_DESC negotiated")
async def _indirect_unneg(env: Env, g: VirtioGuest) -> str:
    host = await g.host_features()
    await g.init(features=host & ~(F_INDIRECT | F_EVENT_IDX))
    drv = g.drivers[data_queue(g)]
    table = drv.alloc(32)
    buf = drv.alloc(16)
    drv.write_desc(0, buf, 16, VIRTQ_DESC_F_WRITE, 0, table=table)
    drv.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    drv.publish(0)
    return await expect_reset_or_drop(g, drv)


@case("readable descriptor after a writable one")
async def _order(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[data_queue(g)]
    a, b = drv.alloc(16), drv.alloc(16)
    drv.write_desc(0, a, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, b, 16, 0, 0)
    drv.publish(0)
    return await expect_reset_or_drop(g, drv)


@case("zero-length buffers only")
async def _zero_len(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[data_queue(g)]
    a = drv.alloc(16)
    drv.write_desc(0, a, 0, 0 if g.slot in (SLOT_CON, SLOT_NET) else VIRTQ_DESC_F_WRITE, 0)
    drv.publish(0)
    await g.notify(drv.index)
    used = await wait_used(drv, 1, timeout=0.3)
    if await g.needs_reset():
        return REJECT
    return PASS if used is None or used[0][1] == 0 else _fail(f"wrote into 0 bytes: {used}")


@case("ring addresses outside guest RAM")
async def _rings_outside(env: Env, g: VirtioGuest) -> str:
    await g.reset()
    await g.set_status(S_ACK | S_DRIVER)
    host = await g.host_features()
    await g.write_features(host & ~F_EVENT_IDX)
    st = S_ACK | S_DRIVER | (S_FEATURES_OK if g.modern else 0)
    await g.set_status(st)
    far = 0x7F_0000_0000
    for q in range(g.num_queues()):
        await g.setup_queue(q, addrs=(far, far + 0x1000, far + 0x2000))
    await g.set_status(st | S_DRIVER_OK)
    await g.notify(data_queue(g))
    return REJECT if await g.needs_reset() else _fail("rings outside RAM accepted")


@case("write to read-only device config")
async def _ro_config(env: Env, g: VirtioGuest) -> str:
    await g.init()
    n = g.dev.device.config_size
    before = [await g.cfg_read(o, 1) for o in range(min(n, 32))]
    for o in range(0, min(n, 32), 4):
        await g.cfg_write(o, 4, 0xA5A5_A5A5)
    after = [await g.cfg_read(o, 1) for o in range(min(n, 32))]
    if g.slot == SLOT_NET:  # a legacy driver may set the MAC there (Linux, acrn-dm do)
        before, after = before[6:], after[6:]
    return PASS if after == before else _fail(f"read-only config changed {before} -> {after}")


@case("config access beyond the device config")
async def _config_beyond(env: Env, g: VirtioGuest) -> str:
    await g.init()
    n = g.dev.device.config_size
    await g.cfg_write(n, 4, 0xFFFF_FFFF)
    await g.cfg_write(n + 100, 4, 0xFFFF_FFFF)
    v = await g.cfg_read(n + 100, 4)
    return PASS if v in (0xFFFF_FFFF, 0) else _fail(f"read beyond config: {v:#x}")


@case("features written after FEATURES_OK", MODERN_SLOTS)
async def _features_late(env: Env, g: VirtioGuest) -> str:
    await g.init()
    before = await g.read_features()
    await g.write_features(0xFFFF_FFFF_FFFF_FFFF)
    after = await g.read_features()
    return PASS if after == before else _fail(f"features changed {before:#x} -> {after:#x}")


@case("features written after DRIVER_OK (legacy)", (SLOT_BLK, SLOT_CON))
async def _features_late_legacy(env: Env, g: VirtioGuest) -> str:
    await g.init()
    before = await g.read_features()
    await g.write_features(0xFFFF_FFFF)
    after = await g.read_features()
    return PASS if after == before else _fail(f"features changed {before:#x} -> {after:#x}")


@case("features the device did not offer", MODERN_SLOTS)
async def _features_unoffered(env: Env, g: VirtioGuest) -> str:
    try:
        await g.init(features=0xFFFF_FFFF_FFFF_FFFF)
    except Rejected:
        return REJECT
    f = await g.read_features()
    host = await g.host_features()
    return PASS if f & ~host == 0 else _fail(f"accepted unoffered features {f & ~host:#x}")


@case("FEATURES_OK without VERSION_1", MODERN_SLOTS)
async def _no_version1(env: Env, g: VirtioGuest) -> str:
    host = await g.host_features()
    try:
        await g.init(features=host & ~F_VERSION_1 & ~F_EVENT_IDX)
    except Rejected:
        return REJECT
    return _fail("FEATURES_OK accepted without VERSION_1")


@case("DRIVER_OK without FEATURES_OK", MODERN_SLOTS)
async def _driver_ok_early(env: Env, g: VirtioGuest) -> str:
    await g.reset()
    await g.set_status(S_ACK | S_DRIVER)
    await g.write_features(await g.host_features())
    for q in range(g.num_queues()):
        await g.setup_queue(q)
    await g.set_status(S_ACK | S_DRIVER | S_DRIVER_OK)
    return REJECT if await g.needs_reset() else _fail("DRIVER_OK accepted without FEATURES_OK")


@case("notify of a queue that does not exist or is disabled")
async def _notify_bad(env: Env, g: VirtioGuest) -> str:
    await g.init(queues=[data_queue(g)])
    for q in (g.num_queues(), 99, 0xFFFF, 0 if data_queue(g) else 1):
        if g.modern and q > 8:
            continue  # beyond the notify region: no such register
        await g.notify(q)
    return REJECT if await g.needs_reset() else PASS


@case("notify storm (2000 kicks, nothing queued)")
async def _notify_storm(env: Env, g: VirtioGuest) -> str:
    await g.init()
    for _ in range(2000):
        await g.notify(data_queue(g))
    return REJECT if await g.needs_reset() else PASS


@case("MSI-X vector out of range", (SLOT_BLK, SLOT_RND, SLOT_CON, SLOT_BLK_MODERN))
async def _msix_vector(env: Env, g: VirtioGuest) -> str:
    await g.init(driver_ok=False)
    # turn MSI-X on so the legacy layout has the vector registers
    dev = g.dev
    msix = dev.msix
    assert msix is not None and dev.bdf is not None
    guest = env.sim.guest(0)
    await guest.pci_cfg_write(*dev.bdf, msix.offset + 2, 2, 0x8000)
    try:
        await g.select(0)
        if g.modern:
            await g.wr(C_QMSIX, 2, msix.entries + 5)
            got = await g.rd(C_QMSIX, 2)
            await g.wr(C_MSIX, 2, 0x7FFF)
            cfg = await g.rd(C_MSIX, 2)
        else:
            await g.wr(22, 2, msix.entries + 5)
            got = await g.rd(22, 2)
            await g.wr(20, 2, 0x7FFF)
            cfg = await g.rd(20, 2)
    finally:
        await guest.pci_cfg_write(*dev.bdf, msix.offset + 2, 2, 0)
    if got == NO_VECTOR and cfg == NO_VECTOR:
        return PASS
    return _fail(f"out-of-range vector kept: queue {got:#x}, config {cfg:#x}")


@case("queue size not a power of two", MODERN_SLOTS)
async def _qsize(env: Env, g: VirtioGuest) -> str:
    await g.reset()
    await g.set_status(S_ACK | S_DRIVER)
    await g.write_features(await g.host_features() & ~F_EVENT_IDX)
    await g.set_status(S_ACK | S_DRIVER | S_FEATURES_OK)
    for q in range(g.num_queues()):
        await g.setup_queue(q, size=3)
    await g.set_status(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
    return REJECT if await g.needs_reset() else _fail("queue size 3 accepted")


@case("queue size larger than the maximum", MODERN_SLOTS)
async def _qsize_big(env: Env, g: VirtioGuest) -> str:
    await g.reset()
    await g.set_status(S_ACK | S_DRIVER)
    await g.write_features(await g.host_features() & ~F_EVENT_IDX)
    await g.set_status(S_ACK | S_DRIVER | S_FEATURES_OK)
    for q in range(g.num_queues()):
        await g.setup_queue(q, size=32768)
    await g.set_status(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
    return REJECT if await g.needs_reset() else _fail("queue size 32768 accepted")


@case("queue registers rewritten while enabled")
async def _queue_rewrite(env: Env, g: VirtioGuest) -> str:
    await g.init()
    q = data_queue(g)
    await g.select(q)
    if g.modern:
        await g.wr(C_QDESC, 4, 0x1234_0000)
        await g.wr(C_QSIZE, 2, 2)
    else:
        await g.wr(L_PFN, 4, 0x7_FFFF)
    ok = await env.healthy(g.slot) if not await g.needs_reset() else False
    return PASS if ok else REJECT


@case("status regression (DRIVER_OK cleared without reset)")
async def _status_regress(env: Env, g: VirtioGuest) -> str:
    await g.init()
    st = await g.status()
    await g.set_status(S_ACK)
    await g.set_status(st)
    return REJECT if await g.needs_reset() else PASS


@case("FEATURES_OK set again after DRIVER_OK with new features", MODERN_SLOTS)
async def _renegotiate(env: Env, g: VirtioGuest) -> str:
    await g.init()
    await g.write_features(0)
    await g.set_status(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
    f = await g.read_features()
    return PASS if f else _fail("features renegotiated while running")


@case("reset in the middle of I/O")
async def _reset_mid_io(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[data_queue(g)]
    for _ in range(8):
        if g.slot in (SLOT_CON, SLOT_NET):
            drv.add_chain([b"y" * 64], [])
        elif g.slot == SLOT_RND:
            drv.add_chain([], [64])
        else:
            drv.add_chain([struct.pack("<IIQ", 0, 0, 0)], [4096, 1])
    await g.notify(drv.index)
    await g.reset()
    return PASS


@case("blk: request beyond the disk", (SLOT_BLK, SLOT_BLK_MODERN))
async def _blk_beyond(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[0]
    head = drv.add_chain([struct.pack("<IIQ", 0, 0, 2**63)], [512, 1])
    await g.notify(0)
    used = await wait_used(drv)
    if used is None:
        return REJECT if await g.needs_reset() else _fail("request neither done nor refused")
    return PASS if drv.written(head)[512] == 1 else _fail("read beyond the disk succeeded")


@case("blk: unknown request type", (SLOT_BLK, SLOT_BLK_MODERN))
async def _blk_type(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[0]
    head = drv.add_chain([struct.pack("<IIQ", 0x7777, 0, 0)], [512, 1])
    await g.notify(0)
    used = await wait_used(drv)
    if used is None:
        return REJECT if await g.needs_reset() else _fail("request neither done nor refused")
    return PASS if drv.written(head)[512] == 2 else _fail("unknown type not UNSUPP")


@case("blk: header shorter than 16 bytes", (SLOT_BLK, SLOT_BLK_MODERN))
async def _blk_short(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[0]
    drv.add_chain([b"\x00" * 7], [1])
    return await expect_reset_or_drop(g, drv)


@case("blk: no status byte (no writable buffer)", (SLOT_BLK, SLOT_BLK_MODERN))
async def _blk_nostatus(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[0]
    drv.add_chain([struct.pack("<IIQ", 0, 0, 0), b"\x00" * 512], [])
    return await expect_reset_or_drop(g, drv)


@case("blk: write whose data is shorter than a sector", (SLOT_BLK, SLOT_BLK_MODERN))
async def _blk_partial(env: Env, g: VirtioGuest) -> str:
    await g.init()
    drv = g.drivers[0]
    head = drv.add_chain([struct.pack("<IIQ", 1, 0, 100), b"z" * 100], [1])
    await g.notify(0)
    used = await wait_used(drv)
    if used is None:
        return REJECT if await g.needs_reset() else _fail("request neither done nor refused")
    status = drv.written(head)[0]
    return PASS if status in (0, 1, 2) else _fail(f"status {status}")


# --- PCI- and ioreq-level cases ---------------------------------------------------------
@case("BAR moved onto another device's BAR", (SLOT_DUMMY, SLOT_RND))
async def _bar_overlap(env: Env, g: VirtioGuest | None) -> str:
    dev = env.vm.device(SLOT_DUMMY if g is None or g.slot == SLOT_DUMMY else g.slot)
    other = env.vm.device(SLOT_BLK).bar(0)
    guest = env.sim.guest(0)
    bar = dev.bar(0)
    old = await guest.pci_cfg_read(*dev.bdf, 0x10, 4)
    await guest.pci_cfg_write(*dev.bdf, 0x10, 4, other.addr | 1)
    ok = await env.healthy(SLOT_BLK)
    await guest.pci_cfg_write(*dev.bdf, 0x10, 4, old)
    assert bar is not None
    return PASS if ok else _fail("the device whose BAR was covered stopped working")


@case("BAR moved onto guest RAM and the ECAM window", (SLOT_DUMMY, SLOT_RND))
async def _bar_on_ram(env: Env, g: VirtioGuest | None) -> str:
    dev = env.vm.device(SLOT_DUMMY if g is None or g.slot == SLOT_DUMMY else g.slot)
    guest = env.sim.guest(0)
    old = await guest.pci_cfg_read(*dev.bdf, 0x14, 4)
    for addr in (0x0010_0000, 0xE000_0000, 0xFFFF_F000):
        await guest.pci_cfg_write(*dev.bdf, 0x14, 4, addr)
        await env.healthy(SLOT_BLK)
    await guest.pci_cfg_write(*dev.bdf, 0x14, 4, old)
    vendor = await guest.pci_cfg_read(0, SLOT_BLK, 0, 0, 2)
    return PASS if vendor == 0x1AF4 else _fail("config space lost under a BAR on ECAM")


@case("decoding turned off under a running device", (SLOT_BLK, SLOT_RND))
async def _decode_off(env: Env, g: VirtioGuest) -> str:
    await g.init()
    guest = env.sim.guest(0)
    bdf = g.dev.bdf
    await guest.pci_cfg_write(*bdf, 0x04, 2, 0)
    v = await g.rd(C_STATUS if g.modern else L_STATUS, 1)
    await guest.pci_cfg_write(*bdf, 0x04, 2, 0x7)
    return PASS if v == 0xFF else _fail(f"BAR answered with decoding off: {v:#x}")


@case("odd-sized and unaligned register accesses")
async def _odd_access(env: Env, g: VirtioGuest) -> str:
    await g.init()
    base = g._mm() if g.modern else g._io()
    for off in range(0, 24):
        for size in (1, 2, 4, 8 if g.modern else 4):
            if g.modern:
                await g.g.mmio_read(base + off, size)
                if off not in (C_STATUS, C_STATUS + 1):
                    await g.g.mmio_write(base + off + 0x1000, size, 0)
            else:
                await g.g.pio_read(base + off, size)
    return REJECT if await g.needs_reset() else PASS


@case("ECAM and CF8 config access with bad sizes and offsets", (SLOT_DUMMY,))
async def _cfg_odd(env: Env, g: VirtioGuest | None) -> str:
    guest = env.sim.guest(0)
    for reg in (0x1, 0x3, 0xFFD, 0xFFF, 0x1000):
        for size in (1, 2, 4):
            await guest.mmio_read(0xE000_0000 | SLOT_DUMMY << 15 | reg, size)
            await guest.mmio_write(0xE000_0000 | SLOT_DUMMY << 15 | (reg & 0xFFF), size, 0)
    await guest.mmio_read(0xE000_0000 | 31 << 15 | 7 << 12, 8)
    await guest.pio_write(0xCF8, 2, 0xFFFF)
    await guest.pio_read(0xCFD, 4)
    return PASS


def _fail(msg: str) -> str:
    raise CaseFailed(msg)


# =====================================================================================
# the runner
# =====================================================================================
@dataclass
class Result:
    case: str
    slot: int
    device: str
    verdict: str
    detail: str = ""


def device_name(vm: Vm, slot: int) -> str:
    dev = vm.device(slot)
    name = getattr(dev, "name", type(dev).__name__)
    if isinstance(dev, VirtioPci):
        name += f" ({dev.mode.value})"
    return name


def _counters(env: Env) -> tuple[int, int]:
    server = env.vm.server
    errors = server.stats["handler_error"] if server is not None else 0
    crashed = sum(1 for s in VIRTIO_SLOTS if s in env.guests
                  and (env.vm.device(s).device.failure or "").startswith("internal error"))
    return errors, crashed


async def run_case(env: Env, spec: CaseSpec, slot: int) -> Result:
    g = env.guests.get(slot)
    name = device_name(env.vm, slot)
    errors0, crashed0 = _counters(env)
    verdict, detail = PASS, ""
    try:
        with trio.fail_after(20):
            verdict = await spec.fn(env, g)  # type: ignore[arg-type]
    except CaseFailed as e:
        verdict, detail = FAIL, str(e)
    except Rejected as e:
        verdict, detail = REJECT, str(e)
    except trio.TooSlowError:
        verdict, detail = WEDGED, "the case hung"
    except Exception as e:  # a guest access must never raise in the guest
        verdict, detail = FAIL, f"{type(e).__name__}: {e}"
    errors1, crashed1 = _counters(env)
    if errors1 > errors0 or crashed1 > crashed0:
        verdict, detail = FAIL, "a handler or device worker raised (see log)"
    if verdict in (FAIL, WEDGED):
        return Result(spec.name, slot, name, verdict, detail)
    try:
        with trio.fail_after(20):
            for other in env.slots:
                if other != slot and not await env.healthy(other):
                    return Result(spec.name, slot, name, WEDGED,
                                  f"{device_name(env.vm, other)} stopped working")
            if slot in env.guests:
                await env.guests[slot].reset()
            if not await env.healthy(slot):
                return Result(spec.name, slot, name, WEDGED, "no recovery after reset")
    except trio.TooSlowError:
        return Result(spec.name, slot, name, WEDGED, "health check hung")
    return Result(spec.name, slot, name, verdict, detail)


def make_image(directory: str) -> str:
    path = os.path.join(directory, "disk.img")
    with open(path, "wb") as f:
        f.write(IMAGE_PATTERN)
        f.truncate(4 << 20)
    return path


async def run_suite(directory: str | None = None, cases: list[CaseSpec] | None = None
                    ) -> list[Result]:
    directory = directory or tempfile.mkdtemp(prefix="acrn-adversarial-")
    image = make_image(directory)
    con = os.path.join(directory, "console.out")
    args = ["-m", "256M",
            "-s", "0:0,hostbridge", "-s", f"{SLOT_DUMMY},dummy",
            "-s", f"{SLOT_BLK},virtio-blk,{image}",
            "-s", f"{SLOT_RND},virtio-rnd,transitional",
            "-s", f"{SLOT_CON},virtio-console,@file:con0={con}",
            "-s", f"{SLOT_BLK_MODERN},virtio-blk,{image},modern"]
    tap = f"adv{os.getpid() % 100000}"
    net = net_available()
    if net:
        args += ["-s", f"{SLOT_NET},virtio-net,tap={tap}"]
    sim = SimHypervisor()
    results: list[Result] = []
    async with running([*args, "adversary"], hypervisor=sim) as vm:
        g0 = sim.guest(0)
        env = Env(vm, sim, con)
        virtio = [(SLOT_BLK, False), (SLOT_RND, True), (SLOT_CON, False),
                  (SLOT_BLK_MODERN, True)] + ([(SLOT_NET, False)] if net else [])
        for i, (slot, modern) in enumerate(virtio):
            env.guests[slot] = VirtioGuest(vm, g0, slot, modern=modern,
                                           ram_base=0x0100_0000 + i * 0x0100_0000)
        if net:
            env.net_sock = watch_tap(tap)
        for slot in env.slots:  # everything works before the attacks start
            if not await env.healthy(slot):
                results.append(Result("health check before the cases", slot,
                                      device_name(vm, slot), WEDGED, "does not work"))
        try:
            for spec in CASES if cases is None else cases:
                for slot in spec.slots:
                    if slot in env.slots:
                        results.append(await run_case(env, spec, slot))
        finally:
            if env.net_sock is not None:
                env.net_sock.close()
    return results


def table(results: list[Result]) -> str:
    w = max(len(r.case) for r in results)
    d = max(len(r.device) for r in results)
    lines = [f"{'case':<{w}}  {'device':<{d}}  verdict", "-" * (w + d + 11)]
    for r in results:
        lines.append(f"{r.case:<{w}}  {r.device:<{d}}  {r.verdict}"
                     + (f"  ({r.detail})" if r.detail and r.verdict != PASS else ""))
    counts = {v: sum(r.verdict == v for r in results) for v in (PASS, REJECT, WEDGED, FAIL)}
    lines.append("-" * (w + d + 11))
    lines.append(f"{len(results)} cases: " + ", ".join(f"{v} {n}" for v, n in counts.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.adversarial [--quick]``: ``--quick`` runs three cases only."""
    import logging

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.ERROR)
    results = trio.run(run_suite, None, CASES[:3] if "--quick" in argv else None)
    print(table(results))
    return 1 if any(r.verdict in (WEDGED, FAIL) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
