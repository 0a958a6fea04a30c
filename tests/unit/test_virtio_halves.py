"""virtio/blk/halves.py: a big read split over a data-plane thread and its helper.

Whatever the buffers' sizes, every byte must land where one preadv would have put it, the
helper must really read the second half (on its own thread), and a read that falls short
in either half must say so (the caller then redoes it the general way). Off a data-plane
thread, or when small, the read is one call as before."""

from __future__ import annotations

import os
import random
import struct
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.memory import GuestMemory
from devicemodel.virtio import dataplane
from devicemodel.virtio.blk import halves
from devicemodel.virtio.blk.io.image import DiskImage
from devicemodel.virtio.bulk import Bulk, bulk_of
from devicemodel.virtio.dataplane import Dataplane
from devicemodel.virtio.queue import Virtqueue

MiB = 1 << 20
HDR, STATUS = 0x20_0000, 0x20_0100
IMAGE = 4 * MiB


@pytest.fixture(scope="module")
def ram():  # noqa: ANN201
    mem = GuestMemory(128 * MiB, name="halves-test")
    q = Virtqueue(mem, 0, 256)
    q.desc_addr, q.avail_addr, q.used_addr = 0x10000, 0x11000, 0x12000
    q.start(event_idx=True, indirect=True)
    yield q
    q.stop()
    mem.close()


class _Image(tuple):
    def __repr__(self) -> str:  # hypothesis prints fixtures: not the 4 MiB of content
        return "<image>"


@pytest.fixture(scope="module")
def image(tmp_path_factory):  # noqa: ANN201
    path = tmp_path_factory.mktemp("halves") / "img"
    content = os.urandom(IMAGE)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    yield _Image((DiskImage(fd, IMAGE), content))
    os.close(fd)


def _read_table(q: Virtqueue, sizes: list[int], seed: int) -> tuple[Bulk, list[int]]:
    """A read of buffers of ``sizes`` (≤ 64 KiB) scattered over RAM above 3 MiB, apart."""
    slots = random.Random(seed).sample(range(0x30, 0x7F0), len(sizes))
    addrs = [s << 16 for s in slots]
    data = [(a, n, 3, j + 2) for j, (a, n) in enumerate(zip(addrs, sizes, strict=True))]
    ents = [(HDR, 16, 1, 1), *data, (STATUS, 1, 2, 0)]
    raw = b"".join(struct.pack("<QIHH", *e) for e in ents)
    b = bulk_of(5, raw, q.low_ram[0], q._lo_base)
    assert b is not None
    return b, addrs


def _on_dataplane(fn: Callable[[], object]) -> object:
    """Run ``fn`` on a real data-plane thread (once) and return what it returned."""
    out: list[object] = []
    done = threading.Event()

    class Ring:
        def enable_notification(self) -> bool:
            return False

        def disable_notification(self) -> None:
            pass

    def serve(_q: object) -> bool:
        if not done.is_set():
            try:
                out.append(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the test
                out.append(e)
            done.set()
        return False

    kick = os.eventfd(0, os.EFD_NONBLOCK)
    dp = Dataplane("halves-dp", Ring(), kick, serve, lambda why: None)  # type: ignore[arg-type]
    try:
        assert done.wait(10), "the data-plane thread never served"
    finally:
        dp.stop()
    assert not any(t.name.startswith("halves-dp") for t in threading.enumerate()), \
        "the data-plane thread or its helper outlived stop()"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 16).map(lambda k: 512 * k), min_size=2, max_size=80),
       big=st.integers(0, 3), sector=st.integers(0, 64), seed=st.integers(0, 1 << 16))
def test_every_byte_lands_where_one_read_puts_it(ram, image, monkeypatch_threads, sizes,
                                                 big, sector, seed):
    img, content = image
    sizes = sizes + [64 * 1024] * big * 4  # from a few KiB to well past SPLIT_MIN
    b, addrs = _read_table(ram, sizes, seed)
    lo = ram.low_ram[1]
    for a, n in zip(addrs, sizes, strict=True):
        lo[a : a + n] = bytes(n)
    offset = sector * 512
    assert _on_dataplane(lambda: halves.read_bulk(img, b, offset)) is True
    pos = offset
    for a, n in zip(addrs, sizes, strict=True):
        assert bytes(lo[a : a + n]) == content[pos : pos + n], f"buffer at {a:#x}"
        pos += n
    split = b.length >= halves.SPLIT_MIN
    assert ("halves-dp-helper" in monkeypatch_threads) == split, monkeypatch_threads
    monkeypatch_threads.clear()


@pytest.fixture(scope="module")
def monkeypatch_threads():  # noqa: ANN201
    """The names of the threads that call halves.transfer_iov (the two halves' CPUs)."""
    seen: set[str] = set()
    real = halves.transfer_iov

    def spy(*args: object) -> int:
        seen.add(threading.current_thread().name)
        return real(*args)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setattr(halves, "transfer_iov", spy)
    yield seen
    mp.undo()


@pytest.mark.parametrize("short_half", ["first", "second"])
def test_a_half_that_falls_short_fails_the_read(ram, image, monkeypatch, short_half):
    img, _ = image
    b, _ = _read_table(ram, [4096] * 128, 1)
    real = halves.transfer_iov

    def short(write: bool, fd: int, iov: bytes, count: int, offset: int) -> int:
        on_helper = threading.current_thread().name.endswith("-helper")
        n = real(write, fd, iov, count, offset)
        return n - 512 if on_helper == (short_half == "second") else n

    monkeypatch.setattr(halves, "transfer_iov", short)
    assert _on_dataplane(lambda: halves.read_bulk(img, b, 0)) is False


def test_the_helpers_exception_reaches_the_data_plane_thread(ram, image, monkeypatch):
    img, _ = image
    b, _ = _read_table(ram, [4096] * 128, 2)
    real = halves.transfer_iov

    def boom(*args: object) -> int:
        if threading.current_thread().name.endswith("-helper"):
            raise OSError(5, "injected")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(halves, "transfer_iov", boom)
    with pytest.raises(OSError, match="injected"):
        _on_dataplane(lambda: halves.read_bulk(img, b, 0))


def test_off_a_data_plane_thread_the_read_is_one_call(ram, image, monkeypatch):
    img, content = image
    b, addrs = _read_table(ram, [4096] * 128, 3)
    assert dataplane.helper() is None
    calls: list[int] = []
    real = img.transfer_iov
    monkeypatch.setattr(img, "transfer_iov", lambda *a: calls.append(1) or real(*a))
    assert halves.read_bulk(img, b, 8192)
    assert calls == [1]
    assert bytes(ram.low_ram[1][addrs[0] : addrs[0] + 4096]) == content[8192 : 8192 + 4096]
