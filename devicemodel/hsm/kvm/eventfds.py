"""The fast paths: ioeventfds (a guest write signals an eventfd, no request) and irqfds
(an eventfd write injects an MSI), with ACRN's matching rules on top of KVM's."""

from __future__ import annotations

import errno
import logging
import threading

from ..base import HypervisorError
from ..hsm_dispatch import HsmDispatcher, IoEventFdReg
from . import uapi as k
from .irqchip import Irqchip
from .syscall import ioctl

log = logging.getLogger(__name__)

_ACCESS_SIZES = (1, 2, 4, 8)


class EventFds:
    """The VM's ioeventfd and irqfd registrations.

    An ioeventfd is registered twice: with KVM_IOEVENTFD for exact-size writes (no exit
    at all), and in the HSM half (``dispatcher``), which matches the narrower writes KVM
    hands to user space, as ACRN's ``len >= size`` rule wants."""

    def __init__(self, vm_fd: int, dispatcher: HsmDispatcher, irqchip: Irqchip) -> None:
        self._vm_fd = vm_fd
        self._dispatch = dispatcher
        self._irqchip = irqchip
        #: registration → its KVM_IOEVENTFD argument (None: matched in the HSM half only)
        self._ioeventfds: dict[IoEventFdReg, k.KvmIoeventfd | None] = {}
        #: irqfd → the GSI of its MSI route
        self._irqfds: dict[int, int] = {}
        #: irqfd routes are assigned on first use, which may be on a data-plane thread
        #: while the loop (re)routes another function's vector: one at a time
        self._irqfd_lock = threading.Lock()

    def ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        if length not in _ACCESS_SIZES or address + length > 1 << 64 or address < 0:
            raise HypervisorError("IOEVENTFD: bad length or range", errno.EINVAL)
        reg = IoEventFdReg(fd, address, length, pio, datamatch)
        existing = self._dispatch.find_ioeventfd(reg)
        if deassign:
            if existing is None:
                raise HypervisorError("IOEVENTFD: no such registration", errno.ENOENT)
            kreg = self._ioeventfds.pop(existing)
            self._dispatch.remove_ioeventfd(existing)
            if kreg is not None:
                kreg.flags |= k.KVM_IOEVENTFD_FLAG_DEASSIGN
                ioctl(self._vm_fd, k.KVM_IOEVENTFD, kreg, "KVM_IOEVENTFD")
            return
        if existing is not None:
            raise HypervisorError("IOEVENTFD: already registered", errno.EEXIST)
        kreg = k.KvmIoeventfd()
        kreg.addr = address
        kreg.len = length
        kreg.fd = fd
        kreg.flags = k.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            kreg.flags |= k.KVM_IOEVENTFD_FLAG_DATAMATCH
            kreg.datamatch = datamatch & ((1 << 8 * length) - 1)
        try:
            ioctl(self._vm_fd, k.KVM_IOEVENTFD, kreg, "KVM_IOEVENTFD")
        except HypervisorError as e:
            if e.errno != errno.EEXIST:
                raise
            # KVM lets a wildcard collide with any data at the same address; ACRN does
            # not: this one is matched in the HSM half only (the write exits to us)
            log.debug("ioeventfd %#x: KVM refuses the overlap, matching in user space",
                      address)
            self._ioeventfds[reg] = None
        else:
            self._ioeventfds[reg] = kreg
        self._dispatch.add_ioeventfd(reg)

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None:
        """KVM_IRQFD on a GSI whose routing entry is the MSI (address, data)."""
        with self._irqfd_lock:
            self._irqfd(fd, address, data, deassign)

    def _irqfd(self, fd: int, address: int, data: int, deassign: bool) -> None:
        kirq = k.KvmIrqfd()
        kirq.fd = fd
        if deassign:
            gsi = self._irqfds.pop(fd, None)
            if gsi is None:
                raise HypervisorError("IRQFD: no such registration", errno.ENOENT)
            kirq.gsi = gsi
            kirq.flags = k.KVM_IRQFD_FLAG_DEASSIGN
            try:
                ioctl(self._vm_fd, k.KVM_IRQFD, kirq, "KVM_IRQFD")
            finally:
                self._irqchip.remove_msi_route(gsi)
            return
        if fd in self._irqfds:
            raise HypervisorError("IRQFD: already registered", errno.EEXIST)
        gsi = self._irqchip.add_msi_route(address, data)
        kirq.gsi = gsi
        try:
            ioctl(self._vm_fd, k.KVM_IRQFD, kirq, "KVM_IRQFD")
        except HypervisorError:
            self._irqchip.remove_msi_route(gsi)
            raise
        self._irqfds[fd] = gsi
