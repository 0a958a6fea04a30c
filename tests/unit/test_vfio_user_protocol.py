"""vfio-user's pure parts: the wire layouts, the parsers under hostile bytes, the client's
eventfd table (SET_IRQS rules) and its DMA map (no access outside a mapping, ever)."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.memory import GuestMemoryError
from devicemodel.vfio_user import protocol as p
from devicemodel.vfio_user.device import _pieces
from devicemodel.vfio_user.dma import DmaMemory
from devicemodel.vfio_user.irqs import ClientIrqs
from devicemodel.vfio_user.protocol import DmaMap, Fatal, IrqSet, Refused
from tests.support.fds import fd_targets, open_fds


def _leaked(before: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """New descriptors since ``before`` (a listing without a collection, which is slow;
    one only if something looks left over, in case garbage still holds it)."""
    new = fd_targets() - before
    return open_fds() - before if new else new


u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 2**64 - 1)


# --- the struct twins of the construct layouts ---------------------------------------------
@given(u16, u16, u32, u32, u32)
def test_header_twin_matches_construct(i: int, c: int, size: int, flags: int, err: int) -> None:
    raw = p.HEADER.pack(i, c, size, flags, err)
    h = p.header.parse(raw)
    assert (h.id, h.command, h.size, h.flags, h.error) == (i, c, size, flags, err)
    assert p.header.sizeof() == p.HEADER.size == 16


@given(u64, u32, u32, st.binary(max_size=16))
def test_region_access_twin_matches_construct(off: int, region: int, count: int,
                                              data: bytes) -> None:
    a = p.region_access.parse(p.region_access_payload(off, region, count, data))
    assert (a.offset, a.region, a.count, a.data) == (off, region, count, data)


@given(u64, u32, st.integers(1, 8), st.binary(min_size=8, max_size=8))
def test_write_one_twin_matches_construct(off: int, region: int, count: int,
                                          data: bytes) -> None:
    w = p.write_one.parse(p.WRITE_ONE.pack(off, region, count, data))
    assert (w.offset, w.region, w.count, w.data) == (off, region, count, data)
    multi = p.write_multi.parse(p.write_multi_payload([(off, region, data[:count])]))
    assert multi.wr_cnt == 1 and multi.wrs[0].data[:count] == data[:count]
    assert p.parse_write_multi(p.write_multi_payload([(off, region, data[:count])])) == [
        (off, region, count, data[:count])]


def test_replies_and_version_payload() -> None:
    h = p.Header(7, p.Cmd.REGION_READ, 32, 0, 0)
    assert p.HEADER.unpack_from(p.reply(h, b"abcd")) == (7, 9, 20, p.TYPE_REPLY, 0)
    assert p.HEADER.unpack(p.error_reply(h, errno.EINVAL)) == (7, 9, 16, p.TYPE_REPLY | p.ERROR,
                                                               errno.EINVAL)
    payload = p.version_payload(0, 1, {"max_msg_fds": 16})
    assert payload.endswith(b"\0")
    v = p.parse_version(payload)
    assert (v.major, v.minor, v.capabilities) == (0, 1, {"max_msg_fds": 16})
    with pytest.raises(Fatal) as e:
        p.parse_header(p.HEADER.pack(1, 2, 15, 0, 0))
    assert e.value.header is not None and e.value.header.id == 1


# --- parsers never fail but with Refused --------------------------------------------------
@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_parsers_refuse_garbage_cleanly(data: bytes) -> None:
    for fn in (p.parse_version, p.parse_dma_map, p.parse_dma_unmap, p.parse_irq_set,
               p.parse_write_multi, lambda d: p.parse_region_access(d, write=True),
               lambda d: p.parse_region_access(d, write=False)):
        try:
            fn(data)
        except Refused as e:
            assert e.errno in (errno.EINVAL, errno.E2BIG), e


@given(st.text(max_size=40), st.sampled_from([b"", b"\0", b"\0garbage"]))
def test_version_json_garbage(text: str, tail: bytes) -> None:
    try:
        p.parse_version(struct.pack("<HH", 0, 0) + text.encode() + tail)
    except Refused as e:
        assert e.errno == errno.EINVAL


def test_pieces_are_naturally_aligned_and_cover_the_range() -> None:
    for off in range(0, 16):
        for n in range(1, 20):
            pieces = _pieces(off, n)
            assert sum(s for _, s in pieces) == n
            assert all(o % s == 0 and s in (1, 2, 4, 8) for o, s in pieces)
            assert pieces[0][0] == off
            assert all(a[0] + a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
    assert _pieces(8, 8) == [(8, 8)]
    assert _pieces(4, 8) == [(4, 4), (8, 4)]


# --- the client's eventfds ------------------------------------------------------------------
def _irqs() -> tuple[ClientIrqs, list[bool]]:
    level = [False]
    return ClientIrqs({0: 1, 1: 4, 2: 8, 3: 1, 4: 1}, lambda: level[0]), level


TRIGGER = p.SET_DATA_EVENTFD | p.SET_ACTION_TRIGGER


def test_signal_goes_to_the_vectors_eventfd() -> None:
    irqs, _ = _irqs()
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    try:
        irqs.set_irqs(IrqSet(20, TRIGGER, 2, 5, 3, b""), [os.dup(f) for f in fds])
        assert not irqs.signal(2, 4)  # no eventfd for vector 4
        assert irqs.signal(2, 6)
        assert os.eventfd_read(fds[1]) == 1
        assert not irqs.signal(2, 8) and not irqs.signal(2, -1)
    finally:
        irqs.close()
        for fd in fds:
            os.close(fd)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 0x3F), st.integers(0, 10),
                          st.integers(0, 10), st.integers(0, 4), st.binary(max_size=12),
                          st.booleans()), max_size=8))
def test_set_irqs_never_fails_but_with_refused_and_never_leaks(
        reqs: list[tuple[int, int, int, int, int, bytes, bool]]) -> None:
    before = fd_targets()
    irqs, level = _irqs()
    for index, flags, start, count, nfds, data, up in reqs:
        level[0] = up
        fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(nfds)]
        try:
            irqs.set_irqs(IrqSet(20, flags, index, start, count, data), fds)
        except Refused as e:
            assert e.errno in (errno.EINVAL, errno.EBADF)
        irqs.intx_changed(up)
        for i in range(p.NUM_IRQS):
            for v in range(9):
                irqs.signal(i, v)
    irqs.close()
    assert _leaked(before) == set()


# --- DMA mappings -------------------------------------------------------------------------
@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("t")
    os.ftruncate(fd, 1 << 20)
    yield fd
    os.close(fd)


def test_dma_memory_accessible_only_inside_read_write_fd_maps(memfd: int) -> None:
    mem = DmaMemory()
    mem.map(DmaMap(3, 0x1000, 0x10000, 0x4000), os.dup(memfd))
    mem.map(DmaMap(1, 0, 0x20000, 0x1000), os.dup(memfd))  # read-only
    mem.map(DmaMap(3, 0, 0x30000, 0x1000), None)  # no fd
    os.pwrite(memfd, b"hello", 0x1000)
    assert mem.read(0x10000, 5) == b"hello"
    for gpa, n in ((0x10000 - 1, 2), (0x13FFF, 2), (0x20000, 1), (0x30000, 1), (0, 1),
                   (2**64 - 1, 1)):
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, n)
    with pytest.raises(Refused) as e:
        mem.map(DmaMap(3, 0, 0x13000, 0x2000), os.dup(memfd))
    assert e.value.errno == errno.EEXIST
    assert mem.spans() is None  # every access is checked against the current map
    mem.close()
    assert mem.maps == [] and not mem.contains(0x10000)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.integers(0, 8),
                          st.integers(0, 3), st.booleans()), max_size=12))
def test_dma_map_unmap_sequences_keep_the_invariants(
        ops: list[tuple[bool, int, int, int, bool]]) -> None:
    fd = os.memfd_create("t")
    os.ftruncate(fd, 8 * 0x1000)
    before = fd_targets()
    mem = DmaMemory()
    try:
        for is_map, page, pages, flags, with_fd in ops:
            try:
                if is_map:
                    mem.map(DmaMap(flags, 0, page * 0x1000, pages * 0x1000),
                            os.dup(fd) if with_fd else None)
                else:
                    for m in mem.within(page * 0x1000, pages * 0x1000):
                        mem.unmap(m)
            except Refused:
                pass
            spans = sorted((m.address, m.end) for m in mem.maps)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
            for page_no in range(24):
                inside = any(m.address <= page_no * 0x1000 < m.end and m.accessible
                             for m in mem.maps)
                assert mem.contains(page_no * 0x1000, 1) == inside
    finally:
        mem.close()
        os.close(fd)
    assert _leaked(before) == set()
