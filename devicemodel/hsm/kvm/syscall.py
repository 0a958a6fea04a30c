"""The system-call layer of the KVM backend: ioctl(2) through ctypes, and the device probe.

ctypes carries every ioctl: it releases the GIL around a call that blocks (KVM_RUN), and
several arguments are too large for ``fcntl.ioctl`` (guests.md).
"""

from __future__ import annotations

import ctypes
import mmap
import os

from ..base import HypervisorError
from . import uapi as k

KVM_DEVICE = "/dev/kvm"

_libc = ctypes.CDLL(None, use_errno=True)

raw_ioctl = _libc.ioctl
"""libc's ``ioctl(fd, request, arg)`` as a ctypes function, for loops that cannot afford the
checks of :func:`ioctl` (KVM_RUN on a vCPU thread).  ``arg`` is an int, an address, or
None; it returns -1 with the error in ``ctypes.get_errno()`` instead of raising, and
releases the GIL while the call blocks."""
raw_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
raw_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: int | ctypes._CData | None = None, what: str = "") -> int:
    """ioctl through ctypes: ``arg`` is an integer passed by value or a structure by address.

    Raises HypervisorError naming ``what`` (or the request number) and the errno."""
    if arg is None or isinstance(arg, int):
        ret = raw_ioctl(fd, request, arg)
    else:
        ret = raw_ioctl(fd, request, ctypes.addressof(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise HypervisorError(f"{what or hex(request)}: {os.strerror(err)}", err)
    return ret


def kvm_usable(device: str = KVM_DEVICE) -> str | None:
    """None if ``device`` opens and speaks API 12 with the capabilities we need; else why not."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{device}: {e.strerror}"
    try:
        version = raw_ioctl(fd, k.KVM_GET_API_VERSION, None)
        if version != k.KVM_API_VERSION:
            return f"{device}: KVM API version {version}, need {k.KVM_API_VERSION}"
        for cap, name in ((k.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"),
                          (k.KVM_CAP_SIGNAL_MSI, "SIGNAL_MSI")):
            if raw_ioctl(fd, k.KVM_CHECK_EXTENSION, cap) <= 0:
                return f"{device}: KVM lacks KVM_CAP_{name}"
        return None
    finally:
        os.close(fd)


def mmap_address(mm: mmap.mmap) -> int:
    """The user virtual address of a mapping (the export is released at once).

    Raises TypeError for a read-only mapping."""
    ref = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(ref)
    finally:
        del ref
