"""The layout of a split ring's entries, and the views of a started ring that a data
plane's inlined hot path works on."""

from __future__ import annotations

import struct
from typing import NamedTuple

DESC = struct.Struct("<QIHH")  #: a descriptor: addr, len, flags, next
USED_ELEM = struct.Struct("<II")  #: a used element: id, len
TABLE3 = struct.Struct("<" + "QIHH" * 3)  #: an indirect table of three descriptors


class HotRing(NamedTuple):
    """A started ring's views, for a data plane's inlined hot path (``blk/lane.py``),
    which keeps ``last_avail_idx``, ``used_idx`` and ``signalled_used`` as the methods
    do. Valid while the queue stays started (a data plane is stopped before that ends)."""

    avail16: memoryview  #: the avail ring as u16s: flags, idx, ring[size], used_event
    desc: memoryview  #: the descriptor table
    low: memoryview  #: the RAM at GPA 0
    low_end: int  #: its end: a buffer [a, a + n) is in it if a + n <= low_end
    used: memoryview  #: the used ring
    used16: memoryview  #: the used ring as u16s (one store each)
    used_event: int  #: used_event's index in ``avail16``
    avail_event: int  #: avail_event's index in ``used16``
