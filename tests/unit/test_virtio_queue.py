"""The split virtqueue against the mock driver, including every hostile driver we know."""

from __future__ import annotations

import pytest

from devicemodel.memory import MiB
from devicemodel.virtio.mock import GuardedMemory, MockDriver
from devicemodel.virtio.pci.legacy import legacy_ring_layout
from devicemodel.virtio.queue import (
    MAX_INDIRECT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
)

HIGH = 0x1_0000_0000


@pytest.fixture
def guarded_mem() -> GuardedMemory:
    return GuardedMemory([(0, 8 * MiB), (HIGH, 64 * 1024)])


def started(drv: MockDriver, *, event_idx: bool = False, indirect: bool = True) -> Virtqueue:
    q = drv.queue()
    q.start(event_idx=event_idx, indirect=indirect)
    return q


def test_direct_and_indirect_chains(guarded_mem):
    drv = MockDriver(guarded_mem, 0x10000, 16)
    q = started(drv)
    h1 = drv.add_chain([b"head", b"er"], [8, 2])
    h2 = drv.add_chain([b"x" * 100], [4096], indirect=True)
    c1, c2 = q.pop(), q.pop()
    assert q.pop() is None
    assert (c1.head, [bytes(v) for v in c1.readable], c1.readable_len, c1.writable_len) == \
        (h1, [b"head", b"er"], 6, 10)
    assert (c2.head, bytes(c2.readable[0]), c2.writable_len) == (h2, b"x" * 100, 4096)
    c2.writable[0][:5] = b"hello"
    q.add_used(c2.head, 5)
    q.add_used(c1.head, 0)
    assert drv.get_used() == [(h2, 5), (h1, 0)]
    assert drv.written(h2, 5) == b"hello"


def test_views_alias_guest_memory(guarded_mem):
    drv = MockDriver(guarded_mem, 0x10000, 8)
    q = started(drv)
    head = drv.add_chain([], [16])
    chain = q.pop()
    chain.writable[0][:] = b"0123456789abcdef"
    assert drv.written(head) == b"0123456789abcdef"


def test_index_wraps_at_16_bits(guarded_mem):
    drv = MockDriver(guarded_mem, 0x10000, 4)
    q = drv.queue()
    q.last_avail_idx = q.used_idx = 0xFFFE
    drv.set_avail_idx(0xFFFE)
    drv.last_used_idx = 0xFFFE
    guarded_mem.write_u16(drv.used_addr + 2, 0xFFFE)
    q.start(event_idx=False, indirect=False)
    heads = []
    for round_ in range(3):
        for _ in range(3):
            heads.append(drv.add_chain([], [8]))
        for _ in range(3):
            c = q.pop()
            q.add_used(c.head, 8)
        got = drv.get_used()
        assert [h for h, _ in got] == heads[-3:], round_
    assert q.last_avail_idx == q.used_idx == (0xFFFE + 9) & 0xFFFF
    assert drv.used_idx() == q.used_idx


def test_event_idx_suppression_both_directions(guarded_mem):
    drv = MockDriver(guarded_mem, 0x10000, 8)
    q = started(drv, event_idx=True)
    # device → driver: interrupt only when used idx crosses used_event
    drv.set_used_event(1)
    for _ in range(3):
        drv.add_chain([], [4])
    q.add_used(q.pop().head, 0)
    assert not q.needs_notification()  # new=1, event=1: not crossed yet
    q.add_used(q.pop().head, 0)
    assert q.needs_notification()  # new=2 passed event 1
    q.add_used(q.pop().head, 0)
    assert not q.needs_notification()  # already told past event 1
    drv.set_used_event(2)
    assert not q.needs_notification()  # nothing new
    # driver → device: avail_event tells the driver when to kick
    assert not q.enable_notification()
    assert drv.avail_event() == q.last_avail_idx == 3
    drv.add_chain([], [4])
    assert q.enable_notification()  # a buffer arrived: do not sleep


def test_no_event_idx_uses_flags(guarded_mem):
    drv = MockDriver(guarded_mem, 0x10000, 8)
    q = started(drv)
    drv.add_chain([], [4])
    q.add_used(q.pop().head, 0)
    assert q.needs_notification()
    drv.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT
    assert not q.needs_notification()
    q.disable_notification()
    assert drv.used_flags() & 1
    q.enable_notification()
    assert not drv.used_flags() & 1


def test_legacy_layout():
    desc, avail, used = legacy_ring_layout(0x5000, 256)
    assert (desc, avail, used) == (0x5000, 0x6000, 0x7000)
    assert legacy_ring_layout(0, 64)[2] == 4096


def test_reset_and_stop(guarded_mem):
    drv = MockDriver(guarded_mem, 0x10000, 8)
    q = started(drv)
    drv.add_chain([], [4])
    q.stop()
    assert q.pop() is None and not q.has_available()
    q.add_used(0, 1)  # harmless after stop
    assert drv.used_idx() == 0
    q.reset()
    assert (q.size, q.ready, q.desc_addr, q.last_avail_idx) == (8, False, 0, 0)


def test_undo_pop(guarded_mem):
    drv = MockDriver(guarded_mem, 0x10000, 8)
    q = started(drv)
    a = drv.add_chain([], [4])
    drv.add_chain([], [4])
    q.pop()
    q.pop()
    q.undo_pop(2)
    assert q.pop().head == a


# -- hostile drivers -------------------------------------------------------------------


def hostile(guarded_mem, setup, *, indirect: bool = True, size: int = 8) -> str:
    drv = MockDriver(guarded_mem, 0x10000, size)
    q = started(drv, indirect=indirect)
    setup(drv)
    with pytest.raises(VirtqueueError) as e:
        q.pop()
    return str(e.value)


def test_head_index_out_of_range(guarded_mem):
    def setup(d):
        d.set_avail_entry(0, 8)
        d.set_avail_idx(1)
    assert "head index 8" in hostile(guarded_mem, setup)


def test_next_index_out_of_range(guarded_mem):
    def setup(d):
        d.write_desc(0, d.data_base, 16, VIRTQ_DESC_F_NEXT, 99)
        d.publish(0)
    assert "next index 99" in hostile(guarded_mem, setup)


def test_descriptor_loop(guarded_mem):
    def setup(d):
        d.write_desc(0, d.data_base, 16, VIRTQ_DESC_F_NEXT, 1)
        d.write_desc(1, d.data_base, 16, VIRTQ_DESC_F_NEXT, 0)
        d.publish(0)
    assert "loops" in hostile(guarded_mem, setup)


def test_self_loop(guarded_mem):
    def setup(d):
        d.write_desc(3, d.data_base, 16, VIRTQ_DESC_F_NEXT, 3)
        d.publish(3)
    assert "loops" in hostile(guarded_mem, setup)


def test_indirect_loop_and_oversized_table(guarded_mem):
    def loop(d):
        t = d.alloc(32)
        d.write_desc(0, d.data_base, 8, VIRTQ_DESC_F_NEXT, 1, table=t)
        d.write_desc(1, d.data_base, 8, VIRTQ_DESC_F_NEXT, 0, table=t)
        d.write_desc(0, t, 32, VIRTQ_DESC_F_INDIRECT, 0)
        d.publish(0)
    assert "loops" in hostile(guarded_mem, loop)

    def big(d):
        d.write_desc(0, d.data_base, 16 * (MAX_INDIRECT + 1), VIRTQ_DESC_F_INDIRECT, 0)
        d.publish(0)
    assert "indirect table length" in hostile(guarded_mem, big)

    def odd(d):
        d.write_desc(0, d.data_base, 24, VIRTQ_DESC_F_INDIRECT, 0)
        d.publish(0)
    assert "indirect table length" in hostile(guarded_mem, odd)


def test_nested_indirect(guarded_mem):
    def setup(d):
        inner = d.alloc(16)
        d.write_desc(0, d.data_base, 8, 0, 0, table=inner)
        outer = d.alloc(16)
        d.write_desc(0, inner, 16, VIRTQ_DESC_F_INDIRECT, 0, table=outer)
        d.write_desc(0, outer, 16, VIRTQ_DESC_F_INDIRECT, 0)
        d.publish(0)
    assert "nested" in hostile(guarded_mem, setup)


def test_indirect_without_feature_or_with_next(guarded_mem):
    def setup(d):
        t = d.alloc(16)
        d.write_desc(0, d.data_base, 8, 0, 0, table=t)
        d.write_desc(0, t, 16, VIRTQ_DESC_F_INDIRECT, 0)
        d.publish(0)
    assert "without INDIRECT_DESC" in hostile(guarded_mem, setup, indirect=False)

    def with_next(d):
        t = d.alloc(16)
        d.write_desc(0, d.data_base, 8, 0, 0, table=t)
        d.write_desc(0, t, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
        d.write_desc(1, d.data_base, 8, 0, 0)
        d.publish(0)
    assert "with NEXT" in hostile(guarded_mem, with_next)


@pytest.mark.parametrize("addr,length", [
    (8 * MiB - 8, 16),  # runs off the end of low RAM
    (8 * MiB, 1),  # the hole after low RAM
    (HIGH - 1, 2),  # straddles the hole into high RAM
    (HIGH + 64 * 1024 - 4, 8),
    (2**64 - 8, 16),  # wraps 2^64
    (2**64 - 1, 0xFFFF_FFFF),
])
def test_buffer_outside_ram(guarded_mem, addr, length):
    def setup(d):
        d.write_desc(0, addr, length, VIRTQ_DESC_F_WRITE, 0)
        d.publish(0)
    assert "outside guest RAM" in hostile(guarded_mem, setup)


def test_buffer_in_high_ram_is_fine(guarded_mem):
    drv = MockDriver(guarded_mem, 0x10000, 8)
    q = started(drv)
    drv.write_desc(0, HIGH + 100, 200, VIRTQ_DESC_F_WRITE, 0)
    drv.publish(0)
    assert q.pop().writable_len == 200


def test_readable_after_writable(guarded_mem):
    def setup(d):
        d.write_desc(0, d.data_base, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
        d.write_desc(1, d.data_base, 8, 0, 0)
        d.publish(0)
    assert "readable descriptor after" in hostile(guarded_mem, setup)


def test_avail_idx_jump(guarded_mem):
    def setup(d):
        d.add_chain([], [4], publish=False)
        d.set_avail_idx(9)  # 9 ahead on a queue of 8
    assert "ahead" in hostile(guarded_mem, setup)


def test_chain_longer_than_queue_needs_a_loop(guarded_mem):
    # a chain of exactly `size` descriptors is legal, one more cannot exist without a loop
    drv = MockDriver(guarded_mem, 0x10000, 8)
    q = started(drv)
    drv.add_chain([b"a"] * 8)
    assert len(q.pop().readable) == 8


@pytest.mark.parametrize("field,value,word", [
    ("desc_addr", 8 * MiB - 16, "outside"),
    ("used_addr", 2**64 - 4, "outside"),
    ("avail_addr", 0x10001, "misaligned"),
    ("desc_addr", 0x10008, "misaligned"),
    ("size", 6, "power of two"),
    ("size", 16, "power of two"),  # above max_size
])
def test_bad_ring_configuration(guarded_mem, field, value, word):
    drv = MockDriver(guarded_mem, 0x10000, 8)
    q = drv.queue()
    setattr(q, field, value)
    with pytest.raises(VirtqueueError, match=word):
        q.start(event_idx=True, indirect=True)
    assert not q.started and q.pop() is None


def test_guard_pages_are_armed(guarded_mem):
    # the PROT_NONE pages exist: the view just past a region is refused before any access
    with pytest.raises(Exception, match="not RAM"):
        guarded_mem.view(8 * MiB, 1)
    assert guarded_mem.in_ram(8 * MiB - 1, 1) and not guarded_mem.in_ram(8 * MiB - 1, 2)


def test_describe_shows_both_sides_indices(guarded_mem):
    """The stall report's line: a buffer the driver added that we have not taken (what a
    lost kick leaves) and a used one past the driver's used_event (a withheld interrupt)
    are readable from it."""
    drv = MockDriver(guarded_mem, 0x10000, 8)
    q = drv.queue()
    assert q.describe() == "queue 0: not started"
    q.start(event_idx=True, indirect=False)
    for _ in range(3):
        drv.add_chain([], [16])
    drv.set_used_event(5)
    for _ in range(2):
        q.add_used(q.pop().head, 16)
    assert not q.needs_notification()  # used idx 2 has not reached used_event 5
    assert q.enable_notification()  # one is still waiting: avail_event = 2
    line = q.describe()
    assert line.startswith("queue 0: size 8, event_idx 1; ")
    assert "avail idx 3 flags 0x0, popped to 2, avail_event 2" in line
    assert "used idx 2 flags 0x0 (ours 2), used_event 5, last interrupt check at 2" in line
