"""virtio-blk's data-plane loop with the lone request inlined (virtio/blk/lane.py).

A driver with one request in flight at a time is served by the lane's own code when the
request is Linux's plain read or write, and by the general path otherwise. Whatever the
driver posts, one request at a time, the lane must give exactly what the general path
gives: the same used entries, the same bytes in the guest's buffers, the same image, the
interrupts EVENT_IDX asks for and no others. The loop runs here on the test's thread: a
stand-in for the data-plane thread posts the driver's next request where the thread
would sleep.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicemodel.memory import MiB
from devicemodel.virtio.blk import VirtioBlk, parse_blk_options
from devicemodel.virtio.blk import lane as lane_mod
from devicemodel.virtio.blk.lane import run_lane
from devicemodel.virtio.mock import Buffer, GuardedMemory, MockDriver
from devicemodel.virtio.queue import Virtqueue
from tests.support.hostile_rings import LaneHost

IMAGE_SECTORS = 2048  # a 1 MiB image
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


@dataclass
class Req:
    """One request as the driver posts it."""

    rtype: int
    sector: int
    lens: list[int]  # data buffer lengths
    indirect: bool = True
    fill: int = 0  # a write's byte value

    @property
    def plain(self) -> bool:
        """Whether the lane serves it itself (Linux's plain read or write, in range)."""
        return (self.indirect and len(self.lens) == 1 and self.rtype in (T_IN, T_OUT)
                and self.lens[0] % 512 == 0
                and (self.sector + self.lens[0] // 512) <= IMAGE_SECTORS)


def _post(drv: MockDriver, r: Req) -> int:
    hdr = struct.pack("<IIQ", r.rtype, 0, r.sector)
    if r.rtype == T_OUT:
        return drv.add_chain(readable=[hdr] + [bytes([r.fill]) * n for n in r.lens],
                             writable=[1], indirect=r.indirect)
    return drv.add_chain(readable=[hdr], writable=[*r.lens, 1], indirect=r.indirect)


@dataclass
class Outcome:
    used: list[tuple[int, int]] = field(default_factory=list)
    written: list[bytes] = field(default_factory=list)
    interrupts: list[int] = field(default_factory=list)  # used idx at each
    general: int = 0  # batches the general path served
    image: bytes = b""


def _device(tmp: Path, image: str, *, ro: bool = False, size: int = 16
            ) -> tuple[VirtioBlk, MockDriver, Virtqueue]:
    """A blk device on a copy of the test disk, with Linux's ring features, and the
    driver of its started queue (in guarded RAM at GPA 0)."""
    img = tmp / image
    shutil.copyfile(tmp / "disk.img", img)
    dev = VirtioBlk(parse_blk_options(f"{img},{'ro' if ro else 'writeback'}"))
    dev.features = dev.device_features
    drv = MockDriver(GuardedMemory([(0, 8 * MiB)], spans=True), 0x10000, size)
    q = drv.queue()
    q.start(event_idx=True, indirect=True)
    return dev, drv, q


def _serve(tmp: Path, reqs: list[Req], *, lane: bool, used_event_ahead: int = 0,
           monkeypatch: pytest.MonkeyPatch | None = None, ro: bool = False) -> Outcome:
    """Post ``reqs`` one at a time (the next once the previous one is used) to a blk
    device served by the lane or by the general path; what the driver saw."""
    # one image path for both: GET_ID answers with its serial
    dev, drv, q = _device(tmp, "served.img", ro=ro)
    out = Outcome()
    pending = list(reqs)

    def post_next() -> bool:
        for head, length in drv.get_used():
            out.used.append((head, length))
            out.written.append(drv.written(head))
        if not pending:
            return False
        drv.set_used_event((q.used_idx + used_event_ahead) & 0xFFFF)
        _post(drv, pending.pop(0))
        return True

    def signal() -> None:
        out.interrupts.append(q.used_idx)

    real = lane_mod.serve_blocking

    def counting(dev: VirtioBlk, q: Virtqueue) -> bool:
        served = real(dev, q)
        out.general += served
        return served

    try:
        if lane:
            assert monkeypatch is not None
            monkeypatch.setattr(lane_mod, "serve_blocking", counting)
            host = LaneHost(q, post_next)
            assert run_lane(host, dev, signal)  # type: ignore[arg-type]
            assert host.looked_again == []
        else:
            while post_next():
                while dev.serve_blocking(q):
                    pass
    finally:
        dev.close()
    out.image = (tmp / "served.img").read_bytes()
    return out


reqs = st.builds(
    Req,
    rtype=st.sampled_from([T_IN, T_OUT, T_IN, T_OUT, T_FLUSH, T_GET_ID, 99]),
    sector=st.one_of(st.integers(0, IMAGE_SECTORS - 8),
                     st.sampled_from([IMAGE_SECTORS - 1, IMAGE_SECTORS, 2**64 - 1])),
    lens=st.one_of(st.just([4096]), st.lists(st.sampled_from([512, 4096, 100, 0]),
                                              min_size=0, max_size=3)),
    indirect=st.booleans() | st.just(True),
    fill=st.integers(1, 255),
)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    (tmp_path / "disk.img").write_bytes(bytes(range(256)) * (IMAGE_SECTORS * 2))
    return tmp_path


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.lists(reqs, min_size=1, max_size=12), ro=st.booleans())
def test_one_request_at_a_time_the_lane_gives_what_the_general_path_gives(
        disk: Path, monkeypatch: pytest.MonkeyPatch, script: list[Req], ro: bool) -> None:
    """Any request a driver posts, one at a time, on a writable or a read-only disk:
    same used entries, same bytes in its buffers, same image; the plain ones never reach
    the general path (a write to a read-only disk is not plain)."""
    with monkeypatch.context() as m:
        fast = _serve(disk, script, lane=True, monkeypatch=m, ro=ro)
    general = _serve(disk, script, lane=False, ro=ro)
    assert fast.used == general.used
    assert fast.written == general.written
    assert fast.image == general.image
    assert fast.general == sum(not r.plain or (ro and r.rtype == T_OUT) for r in script)


def test_plain_reads_and_writes_land(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of 4 KiB at scattered sectors, each read back: data on the image and in
    the guest, status OK, lengths as the spec says, no general path at all."""
    script: list[Req] = []
    for i, sector in enumerate((8, 512, 1000, 2040, 8)):
        script += [Req(T_OUT, sector, [4096], fill=i + 1), Req(T_IN, sector, [4096])]
    out = _serve(disk, script, lane=True, monkeypatch=monkeypatch)
    assert out.general == 0
    assert [n for _, n in out.used] == [1, 4097] * 5
    for i, written in enumerate(out.written[1::2]):  # each read after its write
        assert written == bytes([i + 1]) * 4096 + b"\0"
    assert out.image[8 * 512 : 8 * 512 + 4096] == b"\5" * 4096  # written twice
    assert out.image[1000 * 512 : 1000 * 512 + 4096] == b"\3" * 4096
    assert out.image[2040 * 512 : 2048 * 512] == b"\4" * 4096


@pytest.mark.parametrize("ahead", [0, 2, -1])
def test_interrupts_are_the_ones_event_idx_asks_for(disk: Path, monkeypatch: pytest.MonkeyPatch,
                                                    ahead: int) -> None:
    """used_event = the used idx the driver has seen (ahead 0: an interrupt for every
    request); set further on, none until the used idx passes it; left behind (-1: the
    driver asked for one it already had), none."""
    script = [Req(T_IN, 8 * i, [4096]) for i in range(6)]
    out = _serve(disk, script, lane=True, used_event_ahead=ahead, monkeypatch=monkeypatch)
    assert len(out.used) == 6
    if ahead == 0:
        assert out.interrupts == [1, 2, 3, 4, 5, 6]
    else:  # used_event u + 2 or u - 1: the used idx goes from u to u + 1, never past it
        assert out.interrupts == []


def test_a_lone_read_that_falls_short_is_done_the_careful_way(
        disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image shrank under us (a short preadv): the general path retries and reports;
    the lane does not complete the request itself."""
    calls: list[int] = []
    real = os.preadv

    def short_once(fd: int, views: list[memoryview], offset: int, *a: int) -> int:
        if not calls:
            calls.append(offset)
            return 0
        return real(fd, views, offset, *a)

    monkeypatch.setattr(os, "preadv", short_once)
    out = _serve(disk, [Req(T_IN, 8, [4096])], lane=True, monkeypatch=monkeypatch)
    assert calls == [8 * 512]
    assert out.general == 1
    assert [n for _, n in out.used] == [4097]
    assert out.written == [out.image[8 * 512 : 8 * 512 + 4096] + b"\0"]


def test_a_request_the_driver_posts_without_buffers_in_ram(
        disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain-shaped read whose data buffer lies past the end of RAM is not the lane's:
    the general path fails the device (VirtqueueError), nothing is written anywhere."""
    from devicemodel.virtio.queue import VirtqueueError

    dev, drv, q = _device(disk, "x.img")
    mem = drv.mem
    hdr = drv.alloc(16)
    mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 8))
    status = drv.alloc(1)
    drv.add_buffers([Buffer(hdr, 16, False), Buffer(8 * MiB - 2048, 4096, True),
                     Buffer(status, 1, True)], indirect=True)
    before = mem.snapshot()
    try:
        with pytest.raises(VirtqueueError):
            run_lane(LaneHost(q), dev, lambda: None)  # type: ignore[arg-type]
    finally:
        dev.close()
    assert mem.snapshot() == before


@pytest.mark.parametrize("count", [2, 40])
def test_requests_that_come_while_one_is_served_share_its_interrupt(
        disk: Path, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """A guest with several threads posts its next read while the previous one is being
    read: the lane serves it before interrupting, so one interrupt covers both (at most
    a batch of 16 per interrupt), and the last one is never left without one."""
    dev, drv, q = _device(disk, "x.img", size=64)
    left = [Req(T_IN, 8 * i, [4096]) for i in range(count)]
    interrupts: list[int] = []
    real = os.preadv

    def post_next() -> bool:
        if not left:
            return False
        drv.set_used_event(q.used_idx)  # the driver wants to hear of every completion
        _post(drv, left.pop(0))
        return True

    def reading(fd: int, views: list[memoryview], offset: int, *a: int) -> int:
        post_next()  # another guest thread, meanwhile
        return real(fd, views, offset, *a)

    monkeypatch.setattr(os, "preadv", reading)
    try:
        post_next()
        host = LaneHost(q)
        assert run_lane(host, dev, lambda: interrupts.append(q.used_idx))  # type: ignore[arg-type]
    finally:
        dev.close()
    assert [n for _, n in drv.get_used()] == [4097] * count
    assert interrupts == ([2] if count == 2 else [16, 32, 40])


def test_a_broken_request_after_a_good_one_still_lets_the_good_one_be_told(
        disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver posts a request with a head out of range while a good read is served:
    the device fails (VirtqueueError), but the read it completed gets its interrupt."""
    from devicemodel.virtio.queue import VirtqueueError

    dev, drv, q = _device(disk, "x.img")
    interrupts: list[int] = []
    real = os.preadv

    def reading(fd: int, views: list[memoryview], offset: int, *a: int) -> int:
        drv.set_avail_entry(drv.avail_idx, 999)  # no such descriptor
        drv.set_avail_idx(drv.avail_idx + 1)
        return real(fd, views, offset, *a)

    monkeypatch.setattr(os, "preadv", reading)
    try:
        drv.set_used_event(0)
        _post(drv, Req(T_IN, 8, [4096]))
        with pytest.raises(VirtqueueError):
            run_lane(LaneHost(q), dev,  # type: ignore[arg-type]
                     lambda: interrupts.append(q.used_idx))
    finally:
        dev.close()
    assert [n for _, n in drv.get_used()] == [4097]
    assert interrupts == [1]
