"""Hostile virtqueue descriptor tables for every device (and the bare queue walker).

The properties and the ring layout are ``tests/test_virtio_hostile.py``'s: guest RAM
between PROT_NONE guard pages, nothing escapes the device but a NEEDS_RESET, nothing
hangs (``trio.fail_after``), and the device writes guest RAM only inside device-writable
buffers and the used ring. Here they get the fuzz settings (a long mode) and a count.
The same hostile rings through the virtio-pci transport are in tests/test_adversarial.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import test_virtio_hostile as h

from ._common import count, fuzz_settings

image = pytest.fixture(scope="module")(h.image.__wrapped__)


def _inner(test):
    return test.hypothesis.inner_test


@fuzz_settings(150)
@given(h.rings)
def test_queue_walker(r):
    count("virtqueue.walker")
    _inner(h.test_pop_never_raises_anything_else)(r)


@fuzz_settings(40)
@given(h.rings)
def test_rnd(r):
    count("virtqueue.rnd")
    _inner(h.test_hostile_rings_vs_rnd)(r)


@fuzz_settings(40)
@given(r=h.rings, rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 99]))
def test_blk(image, r, rtype):
    count("virtqueue.blk")
    _inner(h.test_hostile_rings_vs_blk)(image, r, rtype)


@fuzz_settings(40)
@given(r=h.rings, rx=st.booleans(),
       frames=st.lists(st.binary(min_size=0, max_size=3000), max_size=4))
def test_net(r, rx, frames):
    count("virtqueue.net")
    _inner(h.test_hostile_rings_vs_net)(r, rx, frames)


@fuzz_settings(40)
@given(r=h.rings, index=st.sampled_from([0, 1, 2, 3, 4, 5]))
def test_console(tmp_path_factory, r, index):
    count("virtqueue.console")
    _inner(h.test_hostile_rings_vs_console)(tmp_path_factory, r, index)
