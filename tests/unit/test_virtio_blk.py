"""virtio-blk driven by the mock driver: the requests Linux's virtio_blk sends."""

from __future__ import annotations

import errno
import os
import struct
import time

import pytest
import trio

from devicemodel.config import ConfigError
from devicemodel.memory import MiB
from devicemodel.virtio import blk
from devicemodel.virtio.blk import (
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlk,
    parse_blk_options,
)
from devicemodel.virtio.blk.io import image as blk_image
from devicemodel.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from devicemodel.virtio.mock import MockDriver, RecordingInterrupt, wait_used
from tests.support.blk_rig import rig

IMG_SIZE = 8 * MiB
BASE_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(os.urandom(IMG_SIZE))
    return str(path)


async def test_read_write_roundtrip_through_guest_memory(mem, image):
    async with rig(mem, image) as r:
        with open(image, "rb") as f:
            original = f.read(8192)
        status, data, length = await r.do(VIRTIO_BLK_T_IN, 0, in_len=8192)
        assert (status, data, length) == (VIRTIO_BLK_S_OK, original, 8193)
        payload = os.urandom(4096)
        status, _, length = await r.do(VIRTIO_BLK_T_OUT, 16, out=payload, indirect=True)
        assert (status, length) == (VIRTIO_BLK_S_OK, 1)
        with open(image, "rb") as f:
            f.seek(16 * 512)
            assert f.read(4096) == payload
        assert r.irq.queue_irqs, "the driver was never interrupted"


async def test_multi_segment_read_and_any_layout(mem, image):
    async with rig(mem, image) as r:
        with open(image, "rb") as f:
            f.seek(4096)
            want = f.read(3 * 4096)
        hdr = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 8)
        # header split over two descriptors, data over three, status in its own
        head = r.drv.add_chain([hdr[:5], hdr[5:]], [4096, 1024, 4096 + 3072, 1])
        r.dev.queue_notify(0)
        ((h, length),) = await wait_used(r.drv, 1)
        out = r.drv.written(head)
        assert (h, length, out[-1], out[:-1]) == (head, 3 * 4096 + 1, 0, want)


async def test_flush_get_id_and_unsupported(mem, image):
    async with rig(mem, image) as r:
        assert (await r.do(VIRTIO_BLK_T_FLUSH))[0] == VIRTIO_BLK_S_OK
        status, ident, length = await r.do(VIRTIO_BLK_T_GET_ID, in_len=20)
        assert status == VIRTIO_BLK_S_OK and length == 21
        assert ident == blk.disk_ident(image) and ident.startswith(b"ACRN--")
        assert (await r.do(99))[0] == VIRTIO_BLK_S_UNSUPP


async def test_out_of_range_and_misaligned_give_ioerr_not_a_crash(mem, image):
    async with rig(mem, image) as r:
        last = IMG_SIZE // 512
        assert (await r.do(VIRTIO_BLK_T_IN, last - 1, in_len=1024))[0] == VIRTIO_BLK_S_IOERR
        assert (await r.do(VIRTIO_BLK_T_IN, 2**63, in_len=512))[0] == VIRTIO_BLK_S_IOERR
        assert (await r.do(VIRTIO_BLK_T_OUT, 0, out=b"x" * 100))[0] == VIRTIO_BLK_S_IOERR
        assert (await r.do(VIRTIO_BLK_T_IN, last - 1, in_len=512))[0] == VIRTIO_BLK_S_OK
        assert r.dev.failure is None


async def test_host_io_error_becomes_ioerr(mem, image, tmp_path):
    async with rig(mem, image) as r:
        good = r.dev.image.fd
        r.dev.image.fd = os.open(tmp_path, os.O_RDONLY)  # preadv on a directory: EISDIR
        try:
            status, _, length = await r.do(VIRTIO_BLK_T_IN, 0, in_len=512)
            assert (status, length) == (VIRTIO_BLK_S_IOERR, 1)
            assert (await r.do(VIRTIO_BLK_T_OUT, 0, out=b"x" * 512))[0] == VIRTIO_BLK_S_IOERR
            assert r.dev.failure is None
        finally:
            os.close(r.dev.image.fd)
            r.dev.image.fd = good
        assert (await r.do(VIRTIO_BLK_T_IN, 0, in_len=512))[0] == VIRTIO_BLK_S_OK


async def test_ro_refuses_writes(mem, image):
    async with rig(mem, image + ",ro") as r:
        assert r.dev.device_features & VIRTIO_BLK_F_RO
        assert not r.dev.device_features & VIRTIO_BLK_F_WRITE_ZEROES
        assert (await r.do(VIRTIO_BLK_T_OUT, 0, out=b"\0" * 512))[0] == VIRTIO_BLK_S_IOERR
        assert (await r.do(VIRTIO_BLK_T_IN, 0, in_len=512))[0] == VIRTIO_BLK_S_OK


async def test_range_maps_a_window_of_the_file(mem, image):
    async with rig(mem, image + ",range=8/16") as r:
        assert struct.unpack_from("<Q", r.dev.read_config(0, 8))[0] == 16
        with open(image, "rb") as f:
            f.seek(8 * 512)
            want = f.read(512)
        status, data, _ = await r.do(VIRTIO_BLK_T_IN, 0, in_len=512)
        assert (status, data) == (VIRTIO_BLK_S_OK, want)
        assert (await r.do(VIRTIO_BLK_T_IN, 16, in_len=512))[0] == VIRTIO_BLK_S_IOERR


async def test_sectorsize_reported_and_enforced(mem, image):
    async with rig(mem, image + ",sectorsize=4096/8192") as r:
        cfg = r.dev.read_config(0, 60)
        assert struct.unpack_from("<I", cfg, 20)[0] == 4096
        assert cfg[24] == 1  # physical_block_exp: 8192 = 2^1 logical blocks
        assert (await r.do(VIRTIO_BLK_T_IN, 8, in_len=4096))[0] == VIRTIO_BLK_S_OK
        assert (await r.do(VIRTIO_BLK_T_IN, 1, in_len=4096))[0] == VIRTIO_BLK_S_IOERR
        assert (await r.do(VIRTIO_BLK_T_IN, 8, in_len=512))[0] == VIRTIO_BLK_S_IOERR


async def test_config_reports_capacity_seg_max_size_max(mem, image):
    dev = VirtioBlk(parse_blk_options(image))
    try:
        cap, size_max, seg_max = struct.unpack_from("<QII", dev.read_config(0, 16))
        assert (cap, size_max, seg_max) == (IMG_SIZE // 512, blk.SIZE_MAX, blk.SEG_MAX)
        assert dev.read_config(60, 4) == b"\xff" * 4
        assert dev.num_queues == 1 and dev.queue_max_size(0) == blk.QUEUE_SIZE
        assert dev.pci_ids.legacy_device_id == 0x1001 and dev.pci_ids.modern_device_id == 0x1042
    finally:
        dev.close()


async def test_discard_and_write_zeroes_punch_holes(mem, image):
    async with rig(mem, image + ",discard") as r:
        assert r.dev.device_features & VIRTIO_BLK_F_DISCARD
        seg = struct.pack("<QII", 64, 16, 0)
        assert (await r.do(VIRTIO_BLK_T_DISCARD, out=seg))[0] == VIRTIO_BLK_S_OK
        seg = struct.pack("<QII", 128, 8, 1)  # write zeroes with UNMAP
        assert (await r.do(VIRTIO_BLK_T_WRITE_ZEROES, out=seg))[0] == VIRTIO_BLK_S_OK
        seg = struct.pack("<QII", 256, 8, 0)  # write zeroes, keep allocated
        assert (await r.do(VIRTIO_BLK_T_WRITE_ZEROES, out=seg))[0] == VIRTIO_BLK_S_OK
        with open(image, "rb") as f:
            data = f.read()
        assert data[128 * 512 : 136 * 512] == bytes(4096)
        assert data[256 * 512 : 264 * 512] == bytes(4096)
        assert data[64 * 512 : 80 * 512] == bytes(8192)  # tmpfs/ext4 punch hole zeroes
        bad_flag = struct.pack("<QII", 0, 8, 2)
        assert (await r.do(VIRTIO_BLK_T_WRITE_ZEROES, out=bad_flag))[0] == VIRTIO_BLK_S_UNSUPP
        unmap_discard = struct.pack("<QII", 0, 8, 1)
        assert (await r.do(VIRTIO_BLK_T_DISCARD, out=unmap_discard))[0] == VIRTIO_BLK_S_UNSUPP
        beyond = struct.pack("<QII", IMG_SIZE // 512, 8, 0)
        assert (await r.do(VIRTIO_BLK_T_DISCARD, out=beyond))[0] == VIRTIO_BLK_S_IOERR
        two = struct.pack("<QII", 0, 8, 0) * 2
        assert (await r.do(VIRTIO_BLK_T_WRITE_ZEROES, out=two))[0] == VIRTIO_BLK_S_IOERR
        empty = struct.pack("<QII", 64, 0, 0)  # no sectors: nothing to do, not an error
        assert (await r.do(VIRTIO_BLK_T_DISCARD, out=empty))[0] == VIRTIO_BLK_S_OK
        assert (await r.do(VIRTIO_BLK_T_WRITE_ZEROES, out=empty))[0] == VIRTIO_BLK_S_OK


async def test_discard_not_negotiated_is_unsupp(mem, image):
    feats = BASE_FEATURES | VIRTIO_BLK_F_FLUSH
    async with rig(mem, image + ",discard", features=feats) as r:
        seg = struct.pack("<QII", 0, 8, 0)
        assert (await r.do(VIRTIO_BLK_T_DISCARD, out=seg))[0] == VIRTIO_BLK_S_UNSUPP


async def test_nodisk(mem):
    async with rig(mem, "nodisk") as r:
        assert r.dev.read_config(0, 8) == bytes(8)
        assert (await r.do(VIRTIO_BLK_T_IN, 0, in_len=512))[0] == VIRTIO_BLK_S_IOERR
        assert (await r.do(VIRTIO_BLK_T_FLUSH))[0] == VIRTIO_BLK_S_OK
        assert (await r.do(VIRTIO_BLK_T_GET_ID, in_len=20))[0] == VIRTIO_BLK_S_OK


async def test_write_cache_modes(mem, image):
    async with rig(mem, image) as r:  # default writethru
        assert r.dev.read_config(32, 1) == b"\0" and not r.dev.writeback
    async with rig(mem, image + ",writeback") as r:
        assert r.dev.read_config(32, 1) == b"\1" and r.dev.writeback
        r.dev.write_config(32, b"\0")  # the driver switches to writethrough (CONFIG_WCE)
        assert not r.dev.writeback
    feats = BASE_FEATURES  # neither FLUSH nor CONFIG_WCE: must be writethrough
    async with rig(mem, image + ",writeback", features=feats) as r:
        assert not r.dev.writeback
    async with rig(mem, image + ",writeback",
                   features=BASE_FEATURES | VIRTIO_BLK_F_FLUSH) as r:
        assert r.dev.writeback and not r.dev.features & VIRTIO_BLK_F_CONFIG_WCE


def _cache_miss(fd, views, offset):
    raise BlockingIOError


async def test_many_requests_in_flight(mem, image, monkeypatch):
    async with rig(mem, image) as r:
        peak = 0
        real = blk_image.preadv_all

        def slow_preadv(fd, views, offset):
            nonlocal peak
            peak = max(peak, r.dev.limiter.borrowed_tokens)
            time.sleep(0.05)
            real(fd, views, offset)

        monkeypatch.setattr(blk_image, "preadv_nowait", _cache_miss)  # as if nothing is cached
        monkeypatch.setattr(blk_image, "preadv_all", slow_preadv)
        heads = [r.request(VIRTIO_BLK_T_IN, 8 * i, in_len=4096) for i in range(32)]
        t0 = trio.current_time()
        used = await wait_used(r.drv, 32)
        elapsed = trio.current_time() - t0
        assert sorted(h for h, _ in used) == sorted(heads)
        assert peak > 4, f"only {peak} requests ran at once"
        assert elapsed < 32 * 0.05 / 4, f"32 reads took {elapsed:.2f}s: serialized"
        with open(image, "rb") as f:
            data = f.read(32 * 4096)
        for i, h in enumerate(heads):
            assert r.drv.written(h, 4096) == data[i * 4096 : (i + 1) * 4096]


async def test_cached_reads_skip_the_thread_pool(mem, image, monkeypatch):
    async with rig(mem, image + ",writeback") as r:
        payload = os.urandom(4096)
        # ext4 refuses buffered RWF_NOWAIT writes (EOPNOTSUPP): this one may use a thread
        assert (await r.do(VIRTIO_BLK_T_OUT, 40, out=payload))[0] == VIRTIO_BLK_S_OK

        def no_threads(*args):
            raise AssertionError("went to a thread")

        monkeypatch.setattr(blk_image, "preadv_all", no_threads)
        status, data, _ = await r.do(VIRTIO_BLK_T_IN, 40, in_len=4096)
        assert (status, data) == (VIRTIO_BLK_S_OK, payload)


async def test_file_system_without_nowait_falls_back(mem, image, monkeypatch):
    async with rig(mem, image) as r:
        def unsupported(fd, views, offset):
            raise OSError(errno.EOPNOTSUPP, "no")

        monkeypatch.setattr(blk_image, "preadv_nowait", unsupported)
        with open(image, "rb") as f:
            want = f.read(512)
        assert (await r.do(VIRTIO_BLK_T_IN, 0, in_len=512))[:2] == (VIRTIO_BLK_S_OK, want)
        assert not r.dev.image.nowait_read


async def test_reset_in_the_middle_of_io(mem, image):
    async with rig(mem, image) as r:
        real = blk_image.pwritev_all
        gate = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def slow_write(fd, views, offset, sync):
            trio.from_thread.run_sync(gate.set, trio_token=token)
            time.sleep(0.1)
            real(fd, views, offset, sync)

        blk_image.pwritev_all = slow_write
        try:
            for i in range(4):
                r.request(VIRTIO_BLK_T_OUT, 8 * i, out=b"z" * 4096)
            await gate.wait()
            used_before = r.drv.used_idx()
            irqs_before = len(r.irq.queue_irqs)
            r.dev.reset()
            assert not r.dev.quiescent
            with trio.fail_after(5):
                await r.dev.wait_quiescent()
            assert r.dev.quiescent
            await trio.sleep(0.05)
            assert r.drv.used_idx() == used_before, "used ring written after reset"
            assert len(r.irq.queue_irqs) == irqs_before
            assert r.dev.failure is None and r.irq.reset_requests == 0
        finally:
            blk_image.pwritev_all = real
        # the device comes back: a fresh driver on a fresh ring works
        drv2 = MockDriver(mem, 0x900000, 64)
        r.dev.activate(r.dev.device_features, [drv2.queue()], r.irq)
        head = drv2.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
        r.dev.queue_notify(0)
        await wait_used(drv2, 1)
        assert drv2.written(head)[-1] == VIRTIO_BLK_S_OK


async def test_malformed_request_stops_only_this_device(mem, image):
    async with rig(mem, image) as r, rig(mem, image, base=0x800000) as other:
        r.drv.add_chain([b"short"], [1])  # header shorter than 16 bytes
        r.dev.queue_notify(0)
        with trio.fail_after(5):
            while r.irq.reset_requests == 0:
                await trio.sleep(0.001)
        assert "header" in (r.dev.failure or "")
        assert (await other.do(VIRTIO_BLK_T_IN, 0, in_len=512))[0] == VIRTIO_BLK_S_OK
        r.request(VIRTIO_BLK_T_IN, 0, in_len=512)  # a stopped device ignores kicks
        await trio.sleep(0.02)
        assert r.drv.get_used() == []


@pytest.mark.parametrize("text,word", [
    ("", "path"),
    ("/x,bogus", "bogus"),
    ("/x,sectorsize=1000", "sectorsize=1000"),
    ("/x,range=5", "range=5"),
    ("/x,nocache", "nocache"),
    ("/x,aio=io_uring", "aio=io_uring"),
    ("mq=0,/x", "mq=0"),
    ("/x,discard=1:2", "discard=1:2"),
])
def test_bad_options_name_themselves(text, word):
    with pytest.raises(ConfigError, match=word.replace("?", r"\?")):
        parse_blk_options(text)


def test_options_parse():
    o = parse_blk_options("iothread=2,mq=2,/img,writeback,sectorsize=512/4096,range=8/16,"
                          "discard=100:4:8,aio=threads")
    assert (o.path, o.mq, o.writeback, o.sectorsize, o.physical_sectorsize) == \
        ("/img", 2, True, 512, 4096)
    assert (o.range_start, o.range_size, o.max_discard_sectors, o.max_discard_seg,
            o.discard_alignment) == (8, 16, 100, 4, 8)
    assert parse_blk_options("nodisk").path is None


def test_missing_image_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot open"):
        VirtioBlk(parse_blk_options(str(tmp_path / "nope.img")))
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(ConfigError, match="multiple of 512"):
        VirtioBlk(parse_blk_options(str(odd)))


async def test_multiqueue(mem, image):
    dev = VirtioBlk(parse_blk_options("mq=2," + image))
    assert dev.num_queues == 2 and struct.unpack_from("<H", dev.read_config(34, 2))[0] == 2
    q0, q1 = MockDriver(mem, 0x100000, 64), MockDriver(mem, 0x600000, 64, index=1)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run)
            dev.activate(dev.device_features, [q0.queue(), q1.queue()], RecordingInterrupt())
            head = q1.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
            dev.queue_notify(1)
            assert await wait_used(q1, 1) == [(head, 513)]
            nursery.cancel_scope.cancel()
    finally:
        dev.close()
