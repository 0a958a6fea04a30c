"""virtio-blk through the whole device model versus ``os.preadv`` on the same file.

A 1 GiB image (written once and read once, so the page cache is warm) is read by a guest
on the sim hypervisor, the way Linux's virtio-blk does it: a modern virtio-pci function,
one queue with 32 requests in flight, rings and buffers in guest RAM, kicks as 16-bit
writes to the notify address (an ioeventfd in the sim, or the trapped MMIO register with
``--trapped``), completions as MSI-X messages (irqfd, or direct injection), EVENT_IDX on
both sides. The driver runs in its own process pinned to one CPU and the queue's data-plane
thread is pinned to another, as a guest's vCPU and the device model's I/O thread are on
separate CPUs under ACRN (left to the scheduler, waking the driver on a 2-CPU machine
often preempts the data-plane thread on its own CPU: most of its time then showed as the
interrupt's eventfd write). Baseline: ``os.preadv`` of the same sizes into an anonymous
mapping, one call after another, in the same run. Printed: MB/s (sequential 128 KiB) and
IOPS (random 4 KiB), the ratio device model / preadv, which is the figure (targets: ≥ 0.9
and ≥ 0.3), and per request the device model's and the driver's CPU time, kicks and
interrupts.

    python bench/virtio_blk.py [--image PATH] [--seconds S] [--trapped] [--profile FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import mmap
import os
import random
import select
import struct
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vm import running

GiB = 1 << 30
SEQ_BS = 128 * 1024
RAND_BS = 4096
QD = 32
SLOT = 3
MSI_ADDR = 0xFEE0_0000
RING_BASE = 0x0100_0000
DATA_BASE = 0x0200_0000
QSIZE = 128

_HDR = struct.Struct("<IIQ")
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")


def ensure_image(path: str, size: int) -> None:
    """Write the image once (real data, not holes) and read it once to warm the cache."""
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        chunk = os.urandom(1 << 20)
        with open(path + ".tmp", "wb") as f:
            for i in range(size >> 20):
                f.write(i.to_bytes(8, "little") + chunk[8:])
        os.replace(path + ".tmp", path)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        mv = memoryview(buf)
        for off in range(0, size, 1 << 20):
            os.preadv(fd, [mv], off)
        mv.release()
        buf.close()
    finally:
        os.close(fd)


def offsets(kind: str, size: int, bs: int, n: int, seed: int = 1) -> list[int]:
    if kind == "seq":
        return [(i * bs) % size for i in range(n)]
    rnd = random.Random(seed)
    return [rnd.randrange(size // bs) * bs for _ in range(n)]


def baseline(path: str, offs: list[int], bs: int, nbufs: int) -> float:
    """Seconds for ``os.preadv`` of every offset, one after another, into ``nbufs``
    buffers in turn (``QD`` of them is the guest's footprint: 32 requests in flight each
    land in their own buffer, so the copies miss the CPU caches as the guest's do)."""
    fd = os.open(path, os.O_RDONLY)
    buf = mmap.mmap(-1, bs * nbufs)
    mv = memoryview(buf)
    views = [mv[i * bs : (i + 1) * bs] for i in range(nbufs)]
    try:
        for i, off in enumerate(offs[:256]):  # warm the buffers
            os.preadv(fd, [views[i % nbufs]], off)
        t0 = time.perf_counter()
        for i, off in enumerate(offs):
            os.preadv(fd, [views[i % nbufs]], off)
        return time.perf_counter() - t0
    finally:
        for v in views:
            v.release()
        mv.release()
        buf.close()
        os.close(fd)


@dataclass
class Ring:
    """Driver-side split ring with QD fixed requests (header, data, status).

    As Linux does once VIRTIO_F_INDIRECT_DESC is negotiated, each request is one ring
    descriptor pointing at a 3-entry indirect table; ``direct`` chains the three in the
    ring instead (what Linux does without the feature).
    """

    mem: memoryview  # guest RAM from 0
    size: int = QSIZE
    direct: bool = False

    def __post_init__(self) -> None:
        self.desc = RING_BASE
        self.avail = self.desc + 16 * self.size
        self.used = (self.avail + 6 + 2 * self.size + 4095) & ~4095
        self.hdrs = (self.used + 6 + 8 * self.size + 4095) & ~4095
        self.tables = self.hdrs + 4096
        self.stride = 3 if self.direct else 1  # ring descriptors per request
        self.avail_idx = 0
        self.last_used = 0
        self.bs = 0
        # indices the device reads while we write them: one 16-bit store each, never
        # struct.pack_into (it zeroes the field first: the device could read 0)
        self.mem16 = self.mem.cast("H")

    def layout(self, bs: int) -> None:
        self.bs = bs
        m = self.mem
        # descriptors, headers and tables afresh; the avail and used rings stay as they
        # are: the device's indices carry on from the previous phase, and zeroing them
        # under it made a stale interrupt read a used index of 0 (a spurious failure)
        m[self.desc : self.avail] = bytes(self.avail - self.desc)
        m[self.hdrs : self.tables + 48 * QD] = bytes(self.tables + 48 * QD - self.hdrs)
        for s in range(QD):
            hdr = self.hdrs + 32 * s
            if self.direct:
                table, d = self.desc, 3 * s
            else:  # ring descriptor s → table s, whose entries chain 0 → 1 → 2
                table, d = self.tables + 48 * s, 0
                _DESC.pack_into(m, self.desc + 16 * s, table, 48, 4, 0)
            _DESC.pack_into(m, table + 16 * d, hdr, 16, 1, d + 1)
            _DESC.pack_into(m, table + 16 * (d + 1), DATA_BASE + s * bs, bs, 3, d + 2)
            _DESC.pack_into(m, table + 16 * (d + 2), hdr + 16, 1, 2, 0)

    def post(self, slot: int, sector: int) -> None:
        m = self.mem
        _HDR.pack_into(m, self.hdrs + 32 * slot, 0, 0, sector)
        m[self.hdrs + 32 * slot + 16] = 0xFF
        _U16.pack_into(m, self.avail + 4 + 2 * (self.avail_idx % self.size),
                       self.stride * slot)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> None:
        self.mem16[(self.avail + 2) >> 1] = self.avail_idx  # one store (see queue.py)

    def used_idx(self) -> int:
        return _U16.unpack_from(self.mem, self.used + 2)[0]

    def avail_event(self) -> int:
        return _U16.unpack_from(self.mem, self.used + 4 + 8 * self.size)[0]

    def set_used_event(self, v: int) -> None:
        self.mem16[(self.avail + 4 + 2 * self.size) >> 1] = v


_BARRIER = threading.Lock()


def barrier() -> None:
    """A full memory barrier for the driver (a locked instruction on x86): with the driver
    in its own process, a store to used_event or avail.idx followed by a load of the
    device's index can otherwise pass each other and lose a wake-up."""
    _BARRIER.acquire()
    _BARRIER.release()


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class Guest:
    """A modern virtio-blk driver reduced to what the benchmark needs."""

    def __init__(self, sim: SimHypervisor, vm, slot: int,  # noqa: ANN001
                 direct: bool = False) -> None:
        self.sim = sim
        self.g = sim.guest(0)
        self.t = vm.device(slot)
        self.slot = slot
        self.bar4 = self.t.bar(4).addr
        self.ring = Ring(sim.memory.view(0, 256 << 20), direct=direct)
        self.kick_fd = self.call_fd = -1  # the data path's eventfds, once taken
        self.pin = True

    async def common(self, off: int, size: int, value: int | None = None) -> int:
        if value is None:
            return await self.g.mmio_read(self.bar4 + off, size)
        await self.g.mmio_write(self.bar4 + off, size, value)
        return 0

    async def setup(self) -> None:
        g, t = self.g, self.t
        await self.common(20, 1, 0)
        while await self.common(20, 1):
            await trio.sleep(0.001)
        await self.common(20, 1, 3)
        await self.common(0, 4, 1)
        hi = await self.common(4, 4)
        await self.common(0, 4, 0)
        lo = await self.common(4, 4)
        feats = (hi << 32 | lo) & ((1 << 32) | (1 << 29) | (1 << 28) | (1 << 9) | (1 << 2))
        for sel in (0, 1):
            await self.common(8, 4, sel)
            await self.common(12, 4, (feats >> (32 * sel)) & 0xFFFF_FFFF)
        await self.common(20, 1, 0xB)
        assert await self.common(20, 1) & 8, "FEATURES_OK refused"
        cap = t.msix.offset
        await g.pci_cfg_write(0, self.slot, 0, cap + 2, 2, 0xC000)
        table = t.bar(1).addr
        for v in range(2):
            await g.mmio_write(table + 16 * v, 4, MSI_ADDR)
            await g.mmio_write(table + 16 * v + 8, 4, 0x30 + v)
            await g.mmio_write(table + 16 * v + 12, 4, 0)
        await g.pci_cfg_write(0, self.slot, 0, cap + 2, 2, 0x8000)
        await self.common(16, 2, 0)
        r = self.ring
        await self.common(22, 2, 0)
        await self.common(24, 2, r.size)
        for off, addr in ((32, r.desc), (40, r.avail), (48, r.used)):
            await self.common(off, 4, addr)
            await self.common(off + 4, 4, 0)
        await self.common(26, 2, 1)
        await self.common(28, 2, 1)
        await self.common(20, 1, 0xF)

    async def run(self, offs: list[int], bs: int) -> float:
        """Seconds to read every offset with QD requests in flight, the driver on the
        device model's own thread (kicks through the sim vCPU, MSIs from the sim)."""
        g, sim = self.g, self.sim
        notify = self.bar4 + 0x3000
        sim.msis.clear()
        sim._msi_cursor = 0
        t0 = time.perf_counter()
        for step in driver_steps(self.ring, offs, bs):
            if step is KICK:
                await g.mmio_write(notify, 2, 0)
            else:
                await sim.next_msi()
        return time.perf_counter() - t0

    async def run_in_process(self, offs: list[int], bs: int) -> float:
        """The same driver in a child process, as a guest vCPU runs on another CPU: it
        kicks the queue's ioeventfd and waits on its irqfd itself, so only the device
        model's work is on this process's CPU. Seconds, as measured by the child."""
        sim = self.sim
        if self.kick_fd < 0:
            notify = self.bar4 + 0x3000
            self.kick_fd = next(r.fd for r in sim.ioeventfds if r.address == notify)
            self.call_fd = sim.take_irqfd(MSI_ADDR, 0x31)  # the queue's vector
        cpus = sorted(os.sched_getaffinity(0))
        if self.pin and len(cpus) >= 2:  # the queue's thread on one CPU, the driver on another
            dataplane = next((t for t in threading.enumerate() if t.name.endswith("-q0")), None)
            if dataplane is not None and dataplane.native_id is not None:
                os.sched_setaffinity(dataplane.native_id, {cpus[0]})
        r_fd, w_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the guest driver: no trio here, only the shared RAM and two eventfds
            try:
                os.close(r_fd)
                if self.pin and len(cpus) >= 2:
                    os.sched_setaffinity(0, {cpus[-1]})
                one = (1).to_bytes(8, "little")
                kick, call = self.kick_fd, self.call_fd
                poller = select.poll()  # the eventfd is non-blocking (shared with the parent)
                poller.register(call, select.POLLIN)
                kicks = waits = 0
                t0 = time.perf_counter()
                c0 = os.times()
                for step in driver_steps(self.ring, offs, bs):
                    if step is KICK:
                        os.write(kick, one)
                        kicks += 1
                    else:
                        poller.poll()
                        os.read(call, 8)
                        waits += 1
                c1 = os.times()
                os.write(w_fd, struct.pack("<dddd", time.perf_counter() - t0,
                                           c1.user + c1.system - c0.user - c0.system,
                                           kicks, waits))
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(0)
        os.close(w_fd)
        c0 = os.times()
        try:
            await trio.lowlevel.wait_readable(r_fd)
            data = os.read(r_fd, 32)
        finally:
            os.close(r_fd)
            os.waitpid(pid, 0)
        c1 = os.times()
        if len(data) != 32:
            raise RuntimeError("the driver process failed")
        secs, driver_cpu, kicks, waits = struct.unpack("<dddd", data)
        n = len(offs)
        self.stats = (c1.user + c1.system - c0.user - c0.system) / n, \
            driver_cpu / n, kicks / n, waits / n
        # the parent's copy of the ring state did not move: take the child's from RAM
        self.ring.avail_idx = _U16.unpack_from(self.ring.mem, self.ring.avail + 2)[0]
        self.ring.last_used = self.ring.used_idx()
        return secs


KICK, WAIT = "kick", "wait"


def driver_steps(r: Ring, offs: list[int], bs: int) -> Iterator[str]:
    """The driver's ring work for reading every offset with QD requests in flight;
    yields KICK where it notifies the device and WAIT where it sleeps for an interrupt.

    ``Ring.post``/``publish``/``set_used_event`` are inlined on local names: with the
    driver on the device model's thread this loop is charged to the device model.
    """
    r.layout(bs)
    sectors = iter([o // 512 for o in offs])
    stride = r.stride
    head_slot = {stride * s: s for s in range(QD)}
    total = len(offs)
    done = 0
    mem, mem16 = r.mem, r.mem16
    mask = r.size - 1
    hdrs = r.hdrs
    avail_ring = r.avail + 4
    avail_idx_at = r.avail + 2
    used_event_at = r.avail + 4 + 2 * r.size
    used_ring = r.used + 4
    used_idx_at = r.used + 2
    avail_event_at = r.used + 4 + 8 * r.size
    hdr_pack, u16_pack, u16_unpack, used_unpack = (
        _HDR.pack_into, _U16.pack_into, _U16.unpack_from, _USED.unpack_from)
    last_used = r.last_used
    for s in range(min(QD, total)):
        r.post(s, next(sectors))
    r.publish()
    r.set_used_event(r.last_used)
    avail_idx = r.avail_idx
    yield KICK
    while done < total:
        yield WAIT
        while True:
            idx = u16_unpack(mem, used_idx_at)[0]
            if idx == last_used:
                break
            old = avail_idx
            while last_used != idx:
                head, _ = used_unpack(mem, used_ring + 8 * (last_used & mask))
                last_used = (last_used + 1) & 0xFFFF
                done += 1
                s = head_slot[head]
                hdr = hdrs + 32 * s
                if mem[hdr + 16] != 0:
                    raise RuntimeError("I/O error")
                nxt = next(sectors, None)
                if nxt is not None:  # Ring.post
                    hdr_pack(mem, hdr, 0, 0, nxt)
                    mem[hdr + 16] = 0xFF
                    u16_pack(mem, avail_ring + 2 * (avail_idx & mask), stride * s)
                    avail_idx = (avail_idx + 1) & 0xFFFF
            mem16[used_event_at >> 1] = last_used
            barrier()  # used_event out before used.idx is read again (Linux: virtio_mb)
            if avail_idx != old:
                mem16[avail_idx_at >> 1] = avail_idx
                barrier()  # avail.idx out before avail_event is read
                if need_event(u16_unpack(mem, avail_event_at)[0], avail_idx, old):
                    yield KICK
    r.avail_idx, r.last_used = avail_idx, last_used


#: per block size, the fastest device-model round's (device-model CPU s, driver CPU s,
#: kicks, interrupts), each per request (driver in its own process only)
stats: dict[int, tuple[float, float, float, float]] = {}


async def measure(image: str, runs: list[tuple[list[int], int]], trapped: bool,
                  profile: str | None, rounds: int, direct: bool = False,
                  same_thread: bool = False) -> list[tuple[float, float, float]]:
    """(device model, preadv into QD buffers, preadv into 1 buffer) seconds per run, each
    the best of ``rounds``; the three alternate so a busy machine slows them alike."""
    sim = SimHypervisor()
    extra = ",no_ioeventfd,no_irqfd" if trapped else ""
    args = ["-m", "512M", "-s", f"3,virtio-blk,{image},modern{extra}", "bench"]
    out = []
    stats.clear()
    async with running(args, hypervisor=sim) as vm:
        guest = Guest(sim, vm, 3, direct)
        await guest.setup()
        prof = cProfile.Profile() if profile else None
        for offs, bs in runs:
            run = guest.run if same_thread else guest.run_in_process
            # warm-up; the first runs on this thread (the irqfd is registered on first use)
            await (guest.run if guest.kick_fd < 0 else run)(offs[: QD * 4], bs)
            best = [float("inf")] * 3
            for _ in range(rounds):
                if prof:
                    prof.enable()
                dm = await run(offs, bs)
                if dm < best[0] and not same_thread:
                    stats[bs] = guest.stats
                if prof:
                    prof.disable()
                times = (dm, baseline(image, offs, bs, QD), baseline(image, offs, bs, 1))
                best = [min(a, b) for a, b in zip(best, times, strict=True)]
            out.append((best[0], best[1], best[2]))
        if prof and profile:
            prof.dump_stats(profile)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default="/var/tmp/acrn-pydm-bench-1g.img")
    ap.add_argument("--size", type=int, default=GiB)
    ap.add_argument("--seq-requests", type=int, default=8192, help="128 KiB reads (1 GiB)")
    ap.add_argument("--rand-requests", type=int, default=50000, help="4 KiB reads")
    ap.add_argument("--trapped", action="store_true",
                    help="kick through the trapped notify register and inject MSIs directly "
                    "(implies --same-thread)")
    ap.add_argument("--same-thread", action="store_true",
                    help="run the guest driver on the device model's thread instead of in "
                    "its own process")
    ap.add_argument("--direct", action="store_true",
                    help="chain each request's 3 descriptors in the ring (Linux without "
                    "INDIRECT_DESC) instead of one indirect table per request")
    ap.add_argument("--profile", help="write a cProfile of the device-model runs here")
    ap.add_argument("--rounds", type=int, default=3,
                    help="repeat every measurement, keep the fastest (a shared machine is noisy)")
    a = ap.parse_args()
    ensure_image(a.image, a.size)
    seq = offsets("seq", a.size, SEQ_BS, a.seq_requests)
    rnd = offsets("rand", a.size, RAND_BS, a.rand_requests)
    (dm_seq, b32_seq, b1_seq), (dm_rnd, b32_rnd, b1_rnd) = trio.run(
        measure, a.image, [(seq, SEQ_BS), (rnd, RAND_BS)], a.trapped, a.profile, a.rounds,
        a.direct, a.same_thread or a.trapped)
    path = "trapped notify + direct MSI" if a.trapped else "ioeventfd + irqfd"
    chains = "direct 3-descriptor chains" if a.direct else "indirect tables"
    where = ("on the device model's thread" if a.same_thread or a.trapped
             else "in its own process (a vCPU on another CPU)")
    print(f"virtio-blk on the sim, modern, queue depth {QD}, {path}, {chains}; "
          f"image {a.image}; best of {a.rounds}")
    print(f"the guest driver runs {where}")
    print(f"baseline: os.preadv one at a time into {QD} buffers in turn (the guest's "
          "footprint); [1 buffer, cache-hot]")
    mb = len(seq) * SEQ_BS / 1e6
    print(f"  sequential 128 KiB: device model {mb / dm_seq:7.0f} MB/s   os.preadv "
          f"{mb / b32_seq:7.0f} MB/s [{mb / b1_seq:7.0f}]   ratio {b32_seq / dm_seq:.2f} "
          f"[{b1_seq / dm_seq:.2f}]")
    n = len(rnd)
    print(f"  random 4 KiB:       device model {n / dm_rnd:7.0f} IOPS  os.preadv "
          f"{n / b32_rnd:7.0f} IOPS [{n / b1_rnd:7.0f}]  ratio {b32_rnd / dm_rnd:.2f} "
          f"[{b1_rnd / dm_rnd:.2f}]")
    for bs, (dm_cpu, drv_cpu, kicks, irqs) in sorted(stats.items(), reverse=True):
        print(f"  per {bs >> 10} KiB request: device-model CPU {dm_cpu * 1e6:.2f} µs, driver "
              f"CPU {drv_cpu * 1e6:.2f} µs, {kicks:.3f} kicks, {irqs:.3f} interrupts "
              "(os.times, 10 ms ticks)")


if __name__ == "__main__":
    main()
