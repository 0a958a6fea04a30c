"""The block I/O engine (devicemodel/virtio/blk/io) used the way a non-virtio disk would:
an image, guest-memory views, and the engine's calls, with no virtio type in sight."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from devicemodel.errors import ConfigError
from devicemodel.virtio.blk.io import DirectIo, DiskImage, NowaitIo, ThreadIo, run_now

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MiB))
    return path


def _views(buf: bytearray, *sizes: int) -> list[memoryview]:
    out, at, mv = [], 0, memoryview(buf)
    for n in sizes:
        out.append(mv[at : at + n])
        at += n
    return out


async def _on_a_thread(fn, *args):  # noqa: ANN001, ANN002, ANN202 - a device's runner
    return await trio.to_thread.run_sync(fn, *args)


async def test_thread_io_moves_sectors_between_the_image_and_views(disk: Path) -> None:
    image = DiskImage.open(str(disk), range_start=8, range_size=2048, who="ahci")
    try:
        assert (image.base, image.size, image.ro) == (4096, MiB, False)
        io = ThreadIo(image, _on_a_thread)
        data = bytearray(os.urandom(12288))
        await io.write(_views(data, 4096, 8192), 512, True)
        back = bytearray(12288)
        await io.read(_views(back, 512, 11776), 512)
        assert back == data
        assert disk.read_bytes()[4096 + 512 : 4096 + 512 + 12288] == data  # inside the range
        await io.write_zeroes(0, 4096, True, False)
        await io.discard(8192, 4096, False)
        await io.flush()
        await io.read(_views(back, 12288), 0)
        assert back[:4096] == bytes(4096)
        done, error = await io.write_batch([(0, 512, [memoryview(b"a" * 512)]),
                                            (512, 512, [memoryview(b"b" * 512)]),
                                            (4096, 512, [memoryview(b"c" * 512)])], True)
        assert (done, error) == ([True, True, True], None)
        assert disk.read_bytes()[4096 : 4096 + 1024] == b"a" * 512 + b"b" * 512
    finally:
        image.close()


def test_direct_io_runs_on_the_calling_thread_and_never_suspends(disk: Path) -> None:
    image = DiskImage.open(str(disk))
    threads: list[str] = []
    real = image.read

    def read(views, offset):  # noqa: ANN001, ANN202
        threads.append(threading.current_thread().name)
        return real(views, offset)

    image.read = read  # type: ignore[method-assign]
    try:
        buf = bytearray(4096)
        run_now(DirectIo(image).read(_views(buf, 4096), 4096))
        assert bytes(buf) == disk.read_bytes()[4096:8192]
        assert threads == [threading.current_thread().name]
    finally:
        image.close()


def test_the_loops_nowait_reads_use_a_second_cpu_for_big_ones(disk: Path) -> None:
    image = DiskImage.open(str(disk))
    io = NowaitIo(image, "test-disk")
    try:
        want = disk.read_bytes()
        a, b = bytearray(MiB), bytearray(MiB)
        assert io.read_two(_views(a, MiB), 0, _views(b, MiB), 2 * MiB) == (MiB, MiB)
        assert (a, b) == (want[:MiB], want[2 * MiB : 3 * MiB])
        c = bytearray(MiB)
        assert io.read_halves(_views(c, 4096, MiB - 8192, 4096), MiB, MiB) == MiB
        assert c == want[MiB : 2 * MiB]
        assert io.read(_views(c, 512), 4 * MiB) == 0  # past the end: nothing, no error
    finally:
        io.close()
        image.close()


def test_in_range_is_whole_logical_sectors_inside_the_disk(disk: Path) -> None:
    image = DiskImage.open(str(disk), sector_size=4096)
    try:
        assert image.in_range(0, 4096) and image.in_range(4 * MiB - 4096, 4096)
        assert not image.in_range(512, 4096) and not image.in_range(0, 512)
        assert not image.in_range(4 * MiB, 4096) and not image.in_range(2**70, 4096)
    finally:
        image.close()


@pytest.mark.parametrize("case,words", [
    ("missing", "cannot open"),
    ("directory", "not a regular file or block device"),
    ("fifo", "not a regular file or block device"),
    ("odd size", "not a non-zero multiple of 512"),
    ("range", "outside"),
])
def test_an_image_that_cannot_serve_is_one_clear_error(tmp_path: Path, case: str,
                                                       words: str) -> None:
    path, kw = tmp_path / "x", {}
    if case == "directory":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)  # opened without waiting for a writer, then refused
    elif case == "odd size":
        path.write_bytes(bytes(1000))
    elif case == "range":
        path.write_bytes(bytes(MiB))
        kw = {"range_start": 2040, "range_size": 16}
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match=words) as e:
        DiskImage.open(str(path), ro=True, who="ahci", **kw)  # type: ignore[arg-type]
    assert str(e.value).startswith("ahci: ")
    assert set(os.listdir("/proc/self/fd")) <= before  # nothing left open

