"""Crash consistency of virtio-blk: SIGKILL in the middle of a write stream.

A child process runs a sim VM with virtio-blk (legacy virtio-pci, through the request
slots) and a guest driver (devicemodel/guestkit/virtio_guest.py's) that writes numbered
4 KiB blocks, up to 8 in flight, and a FLUSH after every 16. Each completion the guest
sees is reported over a pipe as it happens: ``W n`` (write of block n acknowledged),
``F n`` (a flush completed after the writes up to n were acknowledged). The child also
reports, through recording wrappers, each ``pwritev`` the device model issues (``P first
last`` blocks, once it returned) and each ``fsync``/``fdatasync`` (``s`` when it starts,
``S`` when it returned).
The parent SIGKILLs the child at a random point while it writes, then checks the image:

* writeback: every block acknowledged before a completed flush holds its data, and the
  data of every such block had been written and then synced before the flush completed;
* writethrough (the default): every acknowledged block holds its data, and had been
  written and then synced before it was acknowledged (one sync may cover a batch).

A SIGKILL keeps the page cache, so the image shows what the device model handed to the
kernel: the check proves no acknowledgment ran ahead of the pwritev (nothing buffered in
the process) and, through the sync records, that the durability barrier a power loss
needs was issued before the acknowledgment.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.paths import REPO as ROOT

BLOCK = 4096
BLOCKS = 2048
FLUSH_EVERY = 16
IN_FLIGHT = 8


def pattern(n: int) -> bytes:
    return struct.pack("<QQ", n, 0xC0FFEE ^ n) * (BLOCK // 16)


# --- the child ---------------------------------------------------------------------------
def child_main(argv: list[str]) -> None:
    image, mode, fd_text = argv
    out = int(fd_text)

    def report(line: str) -> None:
        os.write(out, line.encode() + b"\n")

    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def recording(fd: int, _real=real, _name=name) -> None:
            report(f"s {_name}")  # what was written before this point is covered
            _real(fd)
            report(f"S {_name}")

        setattr(os, name, recording)
    real_pwritev = os.pwritev

    def recording_pwritev(fd: int, buffers, offset: int, *flags: int) -> int:
        n = real_pwritev(fd, buffers, offset, *flags)
        if n > 0:
            report(f"P {offset // BLOCK} {(offset + n - 1) // BLOCK}")
        return n

    os.pwritev = recording_pwritev

    import trio

    from devicemodel.guestkit.virtio_guest import VirtioGuest, wait_used
    from devicemodel.hsm.sim import SimHypervisor
    from devicemodel.vm import running

    async def main() -> None:
        args = ["-m", "128M", "-s", "0:0,hostbridge", "-s", f"4,virtio-blk,{image},{mode}",
                "crashvm"]
        sim = SimHypervisor()
        async with running(args, hypervisor=sim) as vm:
            g = VirtioGuest(vm, sim.guest(0), 4, modern=False, ram_base=0x0100_0000)
            await g.init()
            drv = g.drivers[0]
            n = 0
            while n < BLOCKS:
                heads = {}
                for _ in range(IN_FLIGHT):
                    head = drv.add_chain([struct.pack("<IIQ", 1, 0, n * BLOCK // 512),
                                          pattern(n)], [1])
                    heads[head] = n
                    n += 1
                await g.notify(0)
                got = await wait_used(drv, len(heads), timeout=30)
                assert got is not None, "writes never completed"
                for head, _ in got:
                    assert drv.written(head)[0] == 0, "write failed"
                    report(f"W {heads[head]}")
                if n % FLUSH_EVERY == 0:
                    head = drv.add_chain([struct.pack("<IIQ", 4, 0, 0)], [1])
                    await g.notify(0)
                    got = await wait_used(drv, 1, timeout=30)
                    assert got is not None and drv.written(head)[0] == 0, "flush failed"
                    report(f"F {n - 1}")
            report("DONE")

    trio.run(main)


# --- the parent --------------------------------------------------------------------------
def run_and_kill(tmp_path: Path, mode: str, seed: int) -> tuple[list[str], Path]:
    image = tmp_path / f"{mode}.img"
    with open(image, "wb") as f:
        f.truncate(BLOCKS * BLOCK)
    r, w = os.pipe()
    code = ("import sys; from tests.component.test_blk_crash import child_main; "
            "child_main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(image), mode, str(w)],
                            cwd=ROOT, pass_fds=(w,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    os.close(w)
    rng = random.Random(seed)
    kill_after = rng.randrange(40, 400)  # acknowledged writes before the kill
    events: list[str] = []
    buf = b""
    deadline = time.monotonic() + 60
    try:
        with os.fdopen(r, "rb", buffering=0) as pipe:
            while time.monotonic() < deadline:
                data = pipe.read(4096)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                events += [x.decode() for x in lines]
                writes = sum(e.startswith("W") for e in events)
                if writes >= kill_after:
                    time.sleep(rng.random() * 0.01)  # land somewhere inside a batch
                    proc.send_signal(signal.SIGKILL)
                    # what the child managed to report before it died still counts
                    rest = pipe.read()
                    while rest:
                        buf += rest
                        rest = pipe.read()
                    *lines, buf = buf.split(b"\n")
                    events += [x.decode() for x in lines]
                    break
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert "DONE" not in events, "the child finished before the kill; raise BLOCKS"
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    return events, image


def block_ok(image: Path, n: int) -> bool:
    with open(image, "rb") as f:
        f.seek(n * BLOCK)
        return f.read(BLOCK) == pattern(n)


@pytest.mark.parametrize("seed", [1, 2])
def test_writeback_flushed_writes_survive_sigkill(tmp_path: Path, seed: int) -> None:
    events, image = run_and_kill(tmp_path, "writeback", seed)
    flushed = [int(e.split()[1]) for e in events if e.startswith("F")]
    assert flushed, f"no flush completed before the kill: {events[-5:]}"
    for n in range(flushed[-1] + 1):
        assert block_ok(image, n), f"block {n} was flushed but is not on the image"
    durable = synced_blocks(events)
    for e, done in zip(events, durable, strict=True):
        if e.startswith("F"):
            n = int(e.split()[1])
            missing = [b for b in range(n + 1) if b not in done]
            assert not missing, f"flush acknowledged before blocks {missing[:10]} were synced"


def synced_blocks(events: list[str]) -> list[frozenset[int]]:
    """For each event, the blocks that were written and then covered by a
    completed sync that started after the write returned, at the time of that event."""
    written: set[int] = set()
    synced: set[int] = set()
    started: list[frozenset[int]] = []  # snapshots at each sync start, FIFO
    out: list[frozenset[int]] = []
    for e in events:
        kind, *rest = e.split()
        if kind == "P":
            written |= set(range(int(rest[0]), int(rest[1]) + 1))
        elif kind == "s":
            started.append(frozenset(written))
        elif kind == "S" and started:
            synced |= started.pop(0)
        out.append(frozenset(synced))
    return out


@pytest.mark.parametrize("seed", [3, 4])
def test_writethrough_acknowledged_writes_survive_sigkill(tmp_path: Path, seed: int) -> None:
    events, image = run_and_kill(tmp_path, "writethru", seed)
    acked = [int(e.split()[1]) for e in events if e.startswith("W")]
    assert len(acked) >= 40
    missing = [n for n in acked if not block_ok(image, n)]
    assert not missing, f"acknowledged blocks missing from the image: {missing[:10]}"
    # writethrough: each acknowledged block had been written, then synced, before its ack
    durable = synced_blocks(events)
    for e, done in zip(events, durable, strict=True):
        if e.startswith("W"):
            n = int(e.split()[1])
            assert n in done, f"block {n} acknowledged before a sync covered it"
