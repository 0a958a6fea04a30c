"""A driver on another CPU never sees a ring index we store half-done.

A guest's driver reads used.idx (and avail_event) while the device model writes them.
``struct.pack_into`` zeroes its destination before packing, so an index stored that way
reads as 0 for a moment: the virtio-blk bench's driver once read used.idx 0 mid-run and
overran the ring. Here a C reader on the other CPU spins on the index in the same memfd
the guest RAM lives in while the queue publishes tens of thousands of indices, none of
them 0, and counts the zeros it saw.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from devicemodel.memory import GuestMemory
from devicemodel.virtio.mock import MockDriver
from devicemodel.virtio.queue import Virtqueue

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the reader"),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the reader needs its own CPU"),
]

READER_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

/* reader FD OFFSET STOP: spin on the u16 at OFFSET of memfd FD until the u16 at STOP
   is 0xFFFF; print how often it read 0 once it had read something else */
int main(int argc, char **argv) {
    int fd = atoi(argv[1]);
    long off = atol(argv[2]), stop = atol(argv[3]);
    long end = (off > stop ? off : stop) + 2;
    volatile uint8_t *m = mmap(0, end, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 1; }
    volatile uint16_t *idx = (volatile uint16_t *)(m + off);
    volatile uint16_t *done = (volatile uint16_t *)(m + stop);
    long zeros = 0, reads = 0; int seen = 0;
    puts("ready"); fflush(stdout);
    while (*done != 0xFFFF) {
        uint16_t v = *idx;
        reads++;
        if (v) seen = 1; else if (seen) zeros++;
    }
    printf("%ld %ld\n", zeros, reads);
    return 0;
}
"""

STORES = 60_000  # used.idx runs 1..60000: never 0 by right


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("reader")
    (d / "reader.c").write_text(READER_C)
    subprocess.run(["gcc", "-O2", "-o", str(d / "reader"), str(d / "reader.c")], check=True)
    return d / "reader"


def _race(reader: Path, mem: GuestMemory, offset: int, store) -> int:  # noqa: ANN001
    """Zeros the reader saw at ``offset`` while ``store(i)`` ran for i in 1..STORES."""
    fd = mem.regions[0].fd
    stop = 0x8000
    proc = subprocess.Popen([str(reader), str(fd), str(offset), str(stop)],
                            pass_fds=(fd,), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for i in range(1, STORES + 1):
            store(i)
    finally:
        mem.write_u16(stop, 0xFFFF)
        out, _ = proc.communicate(timeout=30)
    zeros, reads = map(int, out.split())
    assert reads > STORES  # it really was reading all along
    return zeros


@pytest.fixture
def mem():  # noqa: ANN201
    mem = GuestMemory(128 << 20, name="torn-test")
    queues: list[Virtqueue] = []
    mem.queues = queues  # type: ignore[attr-defined]
    yield mem
    for q in queues:
        q.stop()  # its ring views go before the RAM does
    mem.close()


def _queue(mem: GuestMemory, *, event_idx: bool) -> tuple[Virtqueue, MockDriver]:
    drv = MockDriver(mem, 0x10000, 256)
    q = drv.queue()
    q.start(event_idx=event_idx, indirect=True)
    mem.queues.append(q)  # type: ignore[attr-defined]
    return q, drv


def test_used_idx_is_never_seen_torn(reader: Path, mem: GuestMemory) -> None:
    q, drv = _queue(mem, event_idx=False)
    zeros = _race(reader, mem, drv.used_addr + 2,
                  lambda i: q.add_used_batch([(0, 1)]) if i & 1 else q.add_used(0, 1))
    assert q.used_idx == STORES
    assert zeros == 0, f"the driver read used.idx 0 {zeros} times"


def test_avail_event_is_never_seen_torn(reader: Path, mem: GuestMemory) -> None:
    q, drv = _queue(mem, event_idx=True)

    def store(i: int) -> None:
        q.last_avail_idx = i
        q.enable_notification()

    zeros = _race(reader, mem, drv.used_addr + 4 + 8 * 256, store)
    assert zeros == 0, f"the driver read avail_event 0 {zeros} times"


def test_guest_memory_u16_stores_are_whole(reader: Path, mem: GuestMemory) -> None:
    """``write_u16`` (the mock driver's avail.idx) is one store too."""
    zeros = _race(reader, mem, 0x100, lambda i: mem.write_u16(0x100, i))
    assert zeros == 0
