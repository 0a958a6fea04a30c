"""The test process's open file descriptors, for leak checks."""

from __future__ import annotations

import gc
import os


def open_fds() -> set[tuple[str, str]]:
    """Open descriptors with what each points at, after a full garbage collection.

    Collecting first means an earlier test's garbage closing its descriptors meanwhile
    cannot pass for (or hide) a leak; comparing targets, not only numbers, catches a leak
    that reuses a number freed in between. Use as ``open_fds() - before`` (new ones only).
    """
    gc.collect()
    return fd_targets()


def fd_targets() -> set[tuple[str, str]]:
    """Open descriptors with what each points at, as they are (no collection: cheap).

    Garbage not yet collected may still hold some; a hot loop lists with this and calls
    ``open_fds`` only when the difference is not empty."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:  # the listing's own descriptor, closed already
            pass
    return fds
