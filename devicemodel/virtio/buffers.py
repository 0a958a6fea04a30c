"""Copying into a driver's device-writable buffers (a chain's ``writable`` views)."""

from __future__ import annotations

from collections.abc import Sequence


def copy_into(views: Sequence[memoryview], data: bytes | bytearray | memoryview) -> int:
    """Copy ``data`` to the start of the buffer list, across view boundaries: how many
    bytes fitted (all of them, unless the buffers are smaller)."""
    done, total = 0, len(data)
    for v in views:
        n = min(len(v), total - done)
        v[:n] = data[done : done + n]
        done += n
        if done == total:
            break
    return done
