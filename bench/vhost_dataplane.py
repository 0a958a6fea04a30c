"""The vhost-user blk data-plane thread's CPU and latency per request, without a guest.

    python bench/vhost_dataplane.py [--requests 20000] [--reps 3]

bench/vhost_blk.py measures through a QEMU TCG guest, whose noise on a shared machine is
±15 % run to run; this drives the same thread (virtio/dataplane.py serving
``ring_thread.serve_blocking``, its interrupts written through a vhost-user ``Vring`` and
``peerfd``) directly. A driver thread posts requests in the shapes Linux sends for the
guest bench's O_DIRECT reads (a 4 KiB read: a 3-entry indirect table; a 1 MiB read, split
at our seg_max of 126: two 128-entry tables and a 6-entry one posted together), kicks the ring's
eventfd and waits for the call eventfd. The thread's on-CPU time comes from
/proc/self/task/TID/schedstat; the wall time per guest read (kick to interrupt) is what a
guest waiting for its read sees, here with the driver in the same process (its GIL).

Baseline, measured in the same run: a bare Python responder thread woken by the same
eventfds that reads the same bytes into one contiguous buffer per request and signals
with os.eventfd_write: no ring, no descriptors, no guard. The ratio is ours / bare.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import select
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devicemodel.memory import GuestMemory  # noqa: E402
from devicemodel.ratelimit import RateLimitedLog  # noqa: E402
from devicemodel.vhost_user.backend import Vring  # noqa: E402
from devicemodel.virtio.blk import ring_thread  # noqa: E402
from devicemodel.virtio.blk.io import DiskImage, NowaitIo  # noqa: E402
from devicemodel.virtio.blk.io.engine import DirectIo  # noqa: E402
from devicemodel.virtio.dataplane import Dataplane  # noqa: E402
from devicemodel.virtio.queue import Virtqueue  # noqa: E402

MiB = 1 << 20
IMAGE = 64 * MiB
RING = 128
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
TABLES, HEADERS = 0x100000, 0x300000  # a table slot per ring slot (8 KiB each), headers
#: each test: the data pages of the requests posted together for one guest read
SHAPES = {"4 KiB read": (1,), "1 MiB read (126 + 126 + 4 pages)": (126, 126, 4)}


#: the longest the driver waits for one interrupt: a data plane that stopped is an error
WAIT_S = 10.0


class Device:
    """What ``serve_blocking`` uses of VirtioBlk (``ring_thread.ThreadDevice``);
    interrupts through a vhost-user Vring."""

    glog = RateLimitedLog(logging.getLogger("bench"))
    writeback = True

    def __init__(self, image: DiskImage, ring: Vring) -> None:
        self.image = image
        self.direct = DirectIo(image)
        self.nowait = NowaitIo(image, "bench")
        self._ring = ring

    def signal(self, q: Virtqueue) -> None:
        if q.needs_notification():
            self._ring.signal("call_fd")

    async def execute(self, req: object, io: object) -> tuple[int, int]:
        raise AssertionError("every request here takes the fast path")

    def io_error(self, error: OSError) -> None:
        raise error


class Driver:
    """The guest's side: indirect tables of scattered pages, the avail ring, kicks."""

    def __init__(self, lo: memoryview, kick: int, call: int, failures: list[str]) -> None:
        self.lo, self.kick, self.call = lo, kick, call
        self.failures = failures
        self.poller = select.poll()
        self.poller.register(call, select.POLLIN)
        self.idx = 0
        self.pages = random.sample(range(0x1000, 0xE000), 256)

    def post(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """Post one request per entry of ``shape``; kick; the (sector, pages) read."""
        lo, reads = self.lo, []
        for ndata in shape:
            slot = self.idx % RING
            table, hdr = TABLES + slot * 0x2000, HEADERS + slot * 32
            n = ndata + 2
            ents = [(hdr, 16, 1, 1)]
            ents += [(p << 12, 4096, 3, j + 2) for j, p in enumerate(self.pages[:ndata])]
            ents.append((hdr + 16, 1, 2, 0))
            struct.pack_into("<" + "QIHH" * n, lo, table, *(f for e in ents for f in e))
            sector = random.randrange(0, (IMAGE - ndata * 4096) // 4096) * 8
            struct.pack_into("<IIQ", lo, hdr, 0, 0, sector)
            struct.pack_into("<QIHH", lo, DESC + 16 * slot, table, 16 * n, 4, 0)
            struct.pack_into("<H", lo, AVAIL + 4 + 2 * slot, slot)
            self.idx = (self.idx + 1) & 0xFFFF
            reads.append((sector, ndata))
        struct.pack_into("<H", lo, AVAIL + 4 + 2 * RING, (self.idx - 1) & 0xFFFF)  # used_event
        struct.pack_into("<H", lo, AVAIL + 2, self.idx)
        os.eventfd_write(self.kick, 1)
        return reads

    def run(self, shape: tuple[int, ...], count: int) -> None:
        for _ in range(count):
            self.post(shape)
            # one interrupt per guest read (used_event); bounded: a stopped thread is an error
            if not self.poller.poll(int(WAIT_S * 1000)) or self.failures:
                raise RuntimeError(f"no interrupt from the data plane in {WAIT_S:.0f} s"
                                   f" ({'; '.join(self.failures) or 'no failure reported'})")
            os.eventfd_read(self.call)


def on_cpu_ns(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def thread_id(name: str) -> int:
    for t in threading.enumerate():
        if t.name == name and t.native_id is not None:
            return t.native_id
    raise RuntimeError(f"no thread {name}")


def measure_ours(image: DiskImage, shape: tuple[int, ...], count: int) -> tuple[float, float]:
    """The data-plane thread's CPU µs per guest read, and the driver's wall µs per guest
    read (kick to interrupt)."""
    mem = GuestMemory(256 * MiB)
    q = Virtqueue(mem, 0, RING)
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    q.start(event_idx=True, indirect=True)
    lo = q.low_ram[1]
    assert lo is not None
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0)
    ring = Vring(0, call_fd=call)
    dev = Device(image, ring)
    failures: list[str] = []
    dp = Dataplane("bench-dp", q, os.dup(kick),
                   lambda qq: ring_thread.serve_blocking(dev, qq), failures.append)
    try:
        driver = Driver(lo, kick, call, failures)
        driver.run(shape, 100)  # warm-up
        tid = thread_id("bench-dp")
        c0 = on_cpu_ns(tid)
        t0 = time.perf_counter()
        driver.run(shape, count)
        wall = time.perf_counter() - t0
        c1 = on_cpu_ns(tid)
    finally:
        dp.stop()
        ring.close_fds()
        os.close(kick)
        mem.close()
    if failures:
        raise RuntimeError(f"the data plane failed: {failures}")
    return (c1 - c0) / count / 1000, wall / count * 1e6


def measure_bare(image: DiskImage, shape: tuple[int, ...], count: int) -> tuple[float, float]:
    """A bare responder's CPU µs per guest read (poll, read the kick, one preadv per
    request into a contiguous buffer, os.eventfd_write) and the wall µs per read."""
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0)
    stop = os.eventfd(0, os.EFD_NONBLOCK)
    buf = bytearray(max(shape) * 4096)
    views = {n: memoryview(buf)[: n * 4096] for n in shape}
    pending: list[list[tuple[int, int]]] = []

    def serve() -> None:
        poller = select.poll()
        poller.register(kick, select.POLLIN)
        poller.register(stop, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == stop:
                    return
                os.read(kick, 8)
                while pending:
                    for sector, n in pending.pop():
                        os.preadv(image.fd, [views[n]], sector * 512)
                    os.eventfd_write(call, 1)

    t = threading.Thread(target=serve, name="bench-bare", daemon=True)
    t.start()
    rng = random.Random(1)

    poller = select.poll()
    poller.register(call, select.POLLIN)

    def one() -> None:
        pending.append([(rng.randrange(0, (IMAGE - n * 4096) // 4096) * 8, n) for n in shape])
        os.eventfd_write(kick, 1)
        if not poller.poll(int(WAIT_S * 1000)):
            raise RuntimeError(f"no answer from the bare responder in {WAIT_S:.0f} s")
        os.eventfd_read(call)

    try:
        for _ in range(100):
            one()
        tid = thread_id("bench-bare")
        c0 = on_cpu_ns(tid)
        t0 = time.perf_counter()
        for _ in range(count):
            one()
        wall = time.perf_counter() - t0
        c1 = on_cpu_ns(tid)
    finally:
        os.eventfd_write(stop, 1)
        t.join()
        for fd in (kick, call, stop):
            os.close(fd)
    return (c1 - c0) / count / 1000, wall / count * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000,
                    help="4 KiB reads per test (a tenth as many 1 MiB reads)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.requests < 1 or args.reps < 1:
        print("vhost_dataplane: --requests and --reps must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vhost-dp-bench-", dir="/dev/shm"
                                     if os.path.isdir("/dev/shm") else None) as d:
        path = Path(d) / "disk.img"
        with open(path, "wb") as f:
            f.write(os.urandom(IMAGE))
        image = DiskImage.open(str(path))
        try:
            print(f"vhost-user blk data-plane thread, no guest; CPU µs and wall µs (kick to "
                  f"interrupt) per guest read, median of {args.reps} interleaved runs "
                  f"({args.requests} 4 KiB reads, {args.requests // 10} 1 MiB reads)")
            print(f"{'test':30} {'CPU ours':>8} {'bare':>8} {'ratio':>6}   "
                  f"{'wall ours':>9} {'bare':>8} {'ratio':>6}")
            for name, shape in SHAPES.items():
                count = max(1, args.requests // (1 if sum(shape) < 16 else 10))
                ours, bare = [], []
                for _ in range(args.reps):
                    ours.append(measure_ours(image, shape, count))
                    bare.append(measure_bare(image, shape, count))
                (co, wo), (cb, wb) = (
                    (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
                    for runs in (ours, bare))
                print(f"{name:30} {co:8.1f} {cb:8.1f} {co / cb:6.2f}   "
                      f"{wo:9.1f} {wb:8.1f} {wo / wb:6.2f}")
        finally:
            image.close()
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    try:
        rc = main()
    except RuntimeError as e:
        print(f"vhost_dataplane: {e}", file=sys.stderr)
        rc = 1
    print(f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    raise SystemExit(rc)
