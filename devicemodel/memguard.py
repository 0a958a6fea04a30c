"""Guest memory another process can shrink under us: a fault there becomes a device error.

A vhost-user front end maps its guest RAM into us from its own files (memfds, tmpfs or
hugetlbfs files); a vfio-user client does the same with its DMA regions. If the owner
truncates such a file while we have it mapped, the next access to a page past the new end
raises SIGBUS, and the process dies with no message (qemu-storage-daemon 7.2 dies the
same way: see tests/component/test_vhost_memory_shrink.py). Checking the size before each
access is racy, and a memfd sealed against shrinking (F_SEAL_SHRINK, which QEMU's
``memory-backend-memfd`` sets by default) cannot shrink at all, but a hugetlbfs file or
an unsealed memfd can.

Python cannot handle a synchronous SIGBUS itself: its handlers run later, between
bytecodes, and the faulting instruction would fault again at once. So ``guard`` installs
a handler with ``sigaction`` (a ctypes callback, run in the faulting thread) that maps a
private zero page over the faulting page of a guarded region and returns: the access
completes on zeros (a store is lost), the fault is recorded on the region, and the
region's owner is woken through its eventfd to turn it into a device error (the
vhost-user back end drops the front end). User-space accesses to guest memory are Python
code holding the GIL (memoryview copies, struct unpacking), so the callback runs on a
thread that already holds it; accesses the kernel makes for us (``preadv`` into guest
buffers) never raise SIGBUS, they fail with EFAULT.

A fault outside every guarded region goes to the handler that was there before (pytest's
faulthandler, or the default action: the process dies, as it always did).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
#: sizes tried for the zero patch: a small page, then the huge pages of hugetlbfs
_PATCH_SIZES = (PAGE, 2 << 20, 1 << 30)

_libc = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL: the handler must not drop it
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.write.restype = ctypes.c_ssize_t
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_SA_SIGINFO = 0x4
_SA_NODEFER = 0x4000_0000
_SI_ADDR_OFFSET = 16  # siginfo_t: si_signo, si_errno, si_code, padding, then si_addr
_ONE = ctypes.c_uint64(1)
_ONE_PTR = ctypes.addressof(_ONE)


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction (x86-64 and aarch64 layout)."""

    _fields_ = [("sa_sigaction", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


@dataclass(eq=False)
class GuardedRegion:
    """One guarded mapping; ``faults`` are the offsets of the pages patched so far."""

    name: str
    start: int
    size: int
    notify_fd: int
    faults: list[int] = field(default_factory=list)

    @property
    def faulted(self) -> bool:
        return bool(self.faults)


def mapping_address(mm: mmap.mmap) -> int:
    """The address of ``mm`` in our address space (the ctypes export is dropped at once,
    so the mapping can still be closed)."""
    ref = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(ref)
    finally:
        del ref


class _Guard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: the guarded regions, replaced (never changed in place) so the handler can read
        #: it at any moment
        self._regions: tuple[GuardedRegion, ...] = ()
        self._old = _Sigaction()
        self._installed = False
        self._callback = _HANDLER(self._on_sigbus)  # kept alive for the process
        self.patched = 0

    def guard(self, mm: mmap.mmap, name: str, notify_fd: int) -> GuardedRegion:
        region = GuardedRegion(name, mapping_address(mm), len(mm), notify_fd)
        with self._lock:
            if not self._installed:
                self._install()
            self._regions = (*self._regions, region)
        return region

    def unguard(self, region: GuardedRegion) -> None:
        with self._lock:
            self._regions = tuple(r for r in self._regions if r is not region)

    def _install(self) -> None:
        act = _Sigaction()
        act.sa_sigaction = ctypes.cast(self._callback, ctypes.c_void_p).value
        act.sa_flags = _SA_SIGINFO | _SA_NODEFER
        if _libc.sigaction(signal.SIGBUS, ctypes.byref(act), ctypes.byref(self._old)) != 0:
            raise OSError(ctypes.get_errno(), "sigaction(SIGBUS)")
        self._installed = True

    def _on_sigbus(self, signum: int, info: int, context: int) -> None:
        """In the faulting thread, inside the signal: patch the page or give up."""
        addr = ctypes.c_void_p.from_address(info + _SI_ADDR_OFFSET).value or 0
        for region in self._regions:
            if region.start <= addr < region.start + region.size:
                for size in _PATCH_SIZES:
                    page = addr & ~(size - 1)
                    got = _libc.mmap(page, size, mmap.PROT_READ | mmap.PROT_WRITE,
                                     _MAP_FIXED | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
                    if got != _MAP_FAILED:
                        self.patched += 1
                        region.faults.append(page - region.start)
                        _libc.write(region.notify_fd, _ONE_PTR, 8)
                        return
                break
        # not a guarded page (or it cannot be patched): what was there before decides
        _libc.sigaction(signal.SIGBUS, ctypes.byref(self._old), None)
        self._installed = False


_GUARD = _Guard()


def guard(mm: mmap.mmap, name: str, notify_fd: int) -> GuardedRegion:
    """Survive the file behind ``mm`` shrinking: a fault in it is patched with zeros,
    recorded on the region, and ``notify_fd`` (an eventfd) is signalled. Call ``unguard``
    before closing ``mm``."""
    return _GUARD.guard(mm, name, notify_fd)


def unguard(region: GuardedRegion) -> None:
    _GUARD.unguard(region)


def patched_pages() -> int:
    """Pages patched in this process so far (tests, counters)."""
    return _GUARD.patched


def shrink_sealed(fd: int) -> bool:
    """Whether the file behind ``fd`` can no longer shrink (F_SEAL_SHRINK)."""
    import fcntl

    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False


def seal_size(fd: int) -> None:
    """Seal a memfd of ours against shrinking and growing, as QEMU's memory-backend-memfd
    does, so no process it is shared with can make our own mappings fault."""
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError as e:  # created without MFD_ALLOW_SEALING, or not a memfd
        log.debug("cannot seal fd %d: %s", fd, os.strerror(e.errno or 0))


__all__ = ["GuardedRegion", "guard", "mapping_address", "patched_pages", "seal_size",
           "shrink_sealed", "unguard"]
