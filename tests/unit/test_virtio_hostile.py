"""Hypothesis-generated hostile rings against real devices (the rings and the properties are
tests/support/hostile_rings.py's)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
    VirtqueueError,
)
from tests.support.hostile_rings import (
    COMMON,
    DATA,
    SIZE,
    TABLES,
    addresses,
    against_blk,
    check_data_plane,
    flags,
    lay_out,
    lengths,
    make_queue,
    pop_never_raises_anything_else,
    rings,
    rings_vs_blk,
    rings_vs_console,
    rings_vs_net,
    rings_vs_rnd,
)


@COMMON
@given(rings)
def test_hostile_rings_vs_rnd(r):
    rings_vs_rnd(r)


@COMMON
@given(r=rings, rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 99]))
def test_hostile_rings_vs_blk(hostile_image, r, rtype):
    rings_vs_blk(hostile_image, r, rtype)


@COMMON
@given(r=rings, rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 99]))
def test_hostile_rings_vs_blk_on_a_data_plane(hostile_image, r, rtype):
    against_blk(check_data_plane, hostile_image, r, rtype)


@settings(max_examples=300, deadline=None)
@given(rings)
def test_pop_never_raises_anything_else(r):
    pop_never_raises_anything_else(r)


@COMMON
@given(r=rings, rx=st.booleans(), frames=st.lists(st.binary(min_size=0, max_size=3000),
                                                   max_size=4))
def test_hostile_rings_vs_net(r, rx, frames):
    rings_vs_net(r, rx, frames)


@COMMON
@given(r=rings, index=st.sampled_from([1, 3, 5]))
def test_hostile_rings_vs_console(tmp_path_factory, r, index):
    rings_vs_console(tmp_path_factory, r, index)


def _chain_key(chain) -> tuple:
    return (chain.head, tuple(chain.addrs), tuple(chain.lens), chain.nreadable,
            chain.readable_len, chain.writable_len, chain.low)


def _pops(r, batch: bool) -> list:
    """Every chain (or the error that ended it) that pop() / pop_batch() returns."""
    lay_out(r)
    q = make_queue(r)
    q.start(event_idx=r["event_idx"], indirect=r["indirect"])
    out: list = []
    for _ in range(SIZE + 2):
        try:
            got = q.pop_batch(3) if batch else [c for c in [q.pop()] if c is not None]
        except VirtqueueError as e:
            out.append(("error", str(e).split(":")[0]))
            return out
        if not got:
            return out
        out += [_chain_key(c) for c in got]
    return out


@st.composite
def _in_order_table(draw) -> list:
    """An indirect table the way Linux builds one (entries chained 0 → 1 → … in order,
    readable ones first), sometimes with one field broken."""
    n = draw(st.sampled_from([1, 2, 3, 3, 3, 4, 5, 16]))
    nread = draw(st.integers(0, n))
    in_ram = st.integers(DATA, DATA + 0x8000)
    table = []
    for i in range(n):
        flags = (0 if i < nread else VIRTQ_DESC_F_WRITE) | (1 if i < n - 1 else 0)
        table.append([draw(st.one_of(*[in_ram] * 9, addresses)),
                      draw(st.sampled_from([16, 1, 512, 4096])), flags, i + 1 if i < n - 1 else 0])
    if draw(st.booleans()):  # break one field
        i, field = draw(st.integers(0, n - 1)), draw(st.integers(0, 3))
        table[i][field] = draw([addresses, lengths, flags_strategy, st.integers(0, 17)][field])
    return [tuple(d) for d in table]


flags_strategy = flags
linux_like_rings = st.builds(
    lambda r, ind0, ind1, heads, avail, n: {
        **r, "ind0": ind0, "ind1": ind1, "desc": heads + r["desc"][2:], "indirect": True,
        "avail": avail, "avail_idx": n},
    rings, _in_order_table(), _in_order_table(),
    st.lists(st.tuples(st.sampled_from(TABLES),
                       st.one_of(st.sampled_from([16, 32, 48, 64, 256]), st.integers(0, 300)),
                       st.sampled_from([VIRTQ_DESC_F_INDIRECT] * 6 + [5, 6, 7, 0x14]),
                       st.integers(0, 15)), min_size=2, max_size=2),
    st.lists(st.sampled_from([0, 1, 0, 1, 2, 9]), min_size=SIZE, max_size=SIZE),
    st.integers(1, SIZE))


@settings(max_examples=500, deadline=None)
@given(st.one_of(rings, linux_like_rings))
def test_pop_batch_checks_exactly_what_pop_checks(r):
    """pop_batch has its own path for Linux's usual indirect request; on any ring it must
    accept the same chains and refuse at the same place as the general walk."""
    assert _pops(r, batch=True) == _pops(r, batch=False)
