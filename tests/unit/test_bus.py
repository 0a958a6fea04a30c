"""PortBus and MmioBus: overlap errors, lookups, unregistering, the last-hit cache."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.bus import BusError, MmioBus, PortBus
from tests.support.served import Recorder


def test_overlapping_registration_is_refused_with_both_names():
    bus = PortBus()
    bus.register(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(BusError, match="com1"):
        bus.register(0x3FC, 8, Recorder(), "other")
    with pytest.raises(BusError):
        bus.register(0x3F0, 9, Recorder(), "other")
    bus.register(0x3F0, 8, Recorder(), "adjacent-below")
    bus.register(0x400, 8, Recorder(), "adjacent-above")


def test_out_of_range_registration_is_refused():
    with pytest.raises(BusError):
        PortBus().register(0xFFFC, 8, Recorder())
    with pytest.raises(BusError):
        MmioBus().register(0, 0, Recorder())


def test_lookup_returns_offset_relative_to_base_and_respects_ends():
    bus = MmioBus()
    a, b = Recorder(answer=1), Recorder(answer=2)
    bus.register(0x1000, 0x100, a, "a")
    bus.register(0x2000, 0x100, b, "b")
    assert bus.read(0x1010, 4) == 1 and a.log[-1][:3] == ("r", 0x10, 4)
    assert bus.read(0x20FC, 4) == 2
    assert bus.read(0x20FE, 4) is None  # straddles the end
    assert bus.read(0x1800, 4) is None  # gap
    assert bus.read(0x0, 1) is None
    assert bus.write(0x2000, 8, 5) and b.log[-1] == ("w", 0, 8, 5)


def test_unregister_invalidates_the_last_hit_cache():
    bus = MmioBus()
    bus.register(0x1000, 0x100, Recorder(answer=1))
    assert bus.read(0x1000, 4) == 1  # caches
    bus.unregister(0x1000)
    assert bus.read(0x1000, 4) is None
    with pytest.raises(BusError):
        bus.unregister(0x1000)


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(1, 64)), max_size=40),
       st.lists(st.integers(0, 0xFFFF), max_size=40))
def test_lookup_agrees_with_a_linear_scan(regs, probes):
    bus = PortBus()
    accepted = []
    for base, length in regs:
        try:
            bus.register(base, length, Recorder(answer=base))
            accepted.append((base, length))
        except BusError:
            assert base + length > 0x10000 or any(
                base < b + n and b < base + length for b, n in accepted
            )
    for p in probes:
        expect = next((b for b, n in accepted if b <= p < b + n), None)
        assert bus.read(p, 1) == expect
