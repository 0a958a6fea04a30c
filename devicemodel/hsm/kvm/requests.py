"""The request hand-off: what ACRN's hypervisor and HSM do between a vCPU's exit and the
device model, played here between the vCPU threads and the trio loop.

A vCPU thread calls ``Requests.post``: the slot is written and marked PENDING (the
hypervisor's half), ``HsmDispatcher`` answers what the HSM answers itself (CF8/CFC →
PCICFG, ioeventfds, clearing); anything left is marked PROCESSING with kernel_handled 0,
the loop is woken through an eventfd (``attach``), and the thread sleeps until
NOTIFY_REQUEST_FINISH (``finish``) marks the slot COMPLETE; then it takes the value and
frees the slot (acrn-facts §1.5).

The two hand-offs (the eventfd wake of ``attach``, the completion lock ``post`` sleeps
on) are all in this module. Most requests need neither: while the request server runs it
offers ``serve_here`` (``set_inline``), and the vCPU thread answers the slot itself when
the loop sleeps and the handler is safe off the loop; NOTIFY_REQUEST_FINISH then comes
from this very thread and the wait below returns at once.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Callable

import trio

from .. import abi
from ..hsm_dispatch import HsmDispatcher

_U32 = abi.SLOT_U32
_U64 = abi.SLOT_U64
_STATE = abi.SLOT_STATE  # kernel_handled, processed
_PROCESSED = abi.SLOT_PROCESSED_OFF
_KERNEL_HANDLED = abi.SLOT_KERNEL_HANDLED_OFF
_VALUE = abi.SLOT_VALUE_OFF
# the whole slot header as the hypervisor writes it, reserved bytes zero: type; direction,
# reserved, address, size, value (u32 PIO/PCICFG, u64 MMIO); kernel_handled; state
_PIO_HEAD = struct.Struct("<I60xIIQQI40xII")
_MMIO_HEAD = struct.Struct("<I60xIIQQQ36xII")
assert _PIO_HEAD.size == _MMIO_HEAD.size == abi.SLOT_PROCESSED_OFF + 4
_FREE = abi.IOREQ_STATE_FREE
_COMPLETE = abi.IOREQ_STATE_COMPLETE
_PROCESSING = abi.IOREQ_STATE_PROCESSING
_PENDING = abi.IOREQ_STATE_PENDING
_MMIO = abi.IOREQ_TYPE_MMIO
_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
#: how often a vCPU waiting for its completion looks whether the VM is going away
_COMPLETION_POLL = 0.5


class _Waiter:
    """One vCPU's side of the hand-off: its slot and the lock it sleeps on."""

    __slots__ = ("done", "in_flight", "off")

    def __init__(self, index: int) -> None:
        self.off = abi.slot_offset(index)
        #: a request is waiting for NOTIFY_REQUEST_FINISH (set by the vCPU, cleared by DM)
        self.in_flight = False
        self.done = threading.Lock()
        self.done.acquire()


class Requests:
    """The request page of one VM and the wakes across it, for ``vcpus`` vCPUs."""

    def __init__(self, page: mmap.mmap, vcpus: int, dispatcher: HsmDispatcher) -> None:
        self._page: memoryview | None = memoryview(page)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._dispatch = dispatcher
        self._waiters = [_Waiter(i) for i in range(vcpus)]
        #: per vCPU: its slot waits for the device model (PROCESSING, not yet finished)
        self._pending = [False] * vcpus
        self._client = False
        self._client_gone = False
        #: the VM stopped by itself: no client may attach again
        self._vm_dead = False
        #: the vCPU threads are going away: posts fail, waiters give up
        self._stopping = False
        #: the request server's ``serve_here`` while it runs (None: always hand over)
        self.inline: Callable[[int], bool] | None = None
        self._free_all_slots()

    def _free_all_slots(self) -> None:
        assert self._page is not None
        for v in range(abi.ACRN_IO_REQUEST_MAX):
            _U32.pack_into(self._page, abi.slot_offset(v) + _PROCESSED, _FREE)

    # --- the vCPU thread's side -------------------------------------------------------
    def post(self, vcpu: int, rtype: int, direction: int, address: int, size: int,
             value: int) -> int | None:
        """One access through vCPU ``vcpu``'s slot; the value the vCPU sees, or None if
        the VM is going away.  Blocks until the request completes."""
        page = self._page
        if page is None or self._stopping:
            return None
        waiter = self._waiters[vcpu]
        off = waiter.off
        d = self._dispatch
        claimed = d.clearing or address in (d.claimed_mmio if rtype == _MMIO
                                             else d.claimed_pio)
        # ---- hypervisor: fill the slot, then PENDING; HSM: PROCESSING for the device
        # model, unless it claims the request. Only the HSM half looks at a PENDING slot,
        # on this very thread: for what it cannot claim (nearly every request) the slot
        # is filled once, PROCESSING with kernel_handled 0, as it leaves the HSM ----
        state = _PENDING if claimed else _PROCESSING
        waiter.in_flight = not claimed  # before PROCESSING: the loop may finish it at once
        if rtype == _MMIO:
            _MMIO_HEAD.pack_into(page, off, rtype, direction, 0, address, size, value, 0,
                                 state)
        else:
            _PIO_HEAD.pack_into(page, off, rtype, direction, 0, address, size,
                                value & 0xFFFF_FFFF, 0, state)
        ours = not claimed
        if claimed and not d.dispatch(page, off, rtype, direction, address, size, value):
            ours = waiter.in_flight = True
            _STATE.pack_into(page, off + _KERNEL_HANDLED, 0, _PROCESSING)
        if ours:
            self._pending[vcpu] = True
            inline = self.inline
            if inline is None or not inline(vcpu):
                os.eventfd_write(self._efd, 1)  # the loop serves it
            # ---- wait for NOTIFY_REQUEST_FINISH (at once if it came from here) ----
            done = waiter.done
            acquired = done.acquire(False)  # no timeout to parse: served here, it is free
            while True:
                if acquired and _U32.unpack_from(page, off + _PROCESSED)[0] == _COMPLETE:
                    break
                if self._stopping:
                    return None
                acquired = done.acquire(timeout=_COMPLETION_POLL)
        # ---- hypervisor post-work (dm_emulate_io_complete) ----
        if rtype == _MMIO:
            (got,) = _U64.unpack_from(page, off + _VALUE)
        else:
            (got,) = _U32.unpack_from(page, off + _VALUE)
        _U32.pack_into(page, off + _PROCESSED, _FREE)
        return got & _MASK.get(size, 0xFFFF_FFFF_FFFF_FFFF)

    # --- the device model's side (HSM ioctls) -----------------------------------------
    def create_client(self) -> bool:
        """CREATE_IOREQ_CLIENT; False if one exists already."""
        if self._client:
            return False
        self._client = True
        if not self._vm_dead:
            self._client_gone = False
        return True

    async def attach(self) -> bool:
        """ATTACH_IOREQ_CLIENT: wait until a slot waits for the device model.  False: the
        client or the VM is gone."""
        waited = False
        while True:
            if self._client_gone or not self._client:
                return False
            if True in self._pending:
                if not waited:  # every call is a checkpoint, but one is enough
                    await trio.lowlevel.checkpoint()
                return not self._client_gone
            try:
                await trio.lowlevel.wait_readable(self._efd)
            except trio.ClosedResourceError:
                return False  # the VM was destroyed under us
            waited = True
            try:
                os.eventfd_read(self._efd)  # drain before looking at the slots again
            except BlockingIOError:
                pass

    def destroy_client(self) -> None:
        self._client = False
        self._client_gone = True
        self._wake_attach()

    def finish(self, vcpu: int) -> None:
        """NOTIFY_REQUEST_FINISH for ``vcpu``'s slot: the HSM's store-release of
        COMPLETE, then the hypercall that wakes the vCPU."""
        self._pending[vcpu] = False
        waiter = self._waiters[vcpu]
        assert self._page is not None
        _U32.pack_into(self._page, waiter.off + _PROCESSED, _COMPLETE)
        if waiter.in_flight:
            waiter.in_flight = False
            waiter.done.release()

    def clear(self) -> None:
        """CLEAR_VM_IOREQ: complete every request still waiting for the device model."""
        for vcpu, pending in enumerate(self._pending):
            if pending:
                self.finish(vcpu)

    def _wake_attach(self) -> None:
        if self._efd >= 0:
            try:
                os.eventfd_write(self._efd, 1)
            except OSError:
                pass

    # --- the VM's lifetime ------------------------------------------------------------
    def reset(self) -> None:
        """RESET_VM: every slot FREE, nothing pending, the HSM half forgets CF8."""
        self._free_all_slots()
        self._pending = [False] * len(self._waiters)
        self._dispatch.reset()

    def vm_stopped(self) -> None:
        """The VM stopped by itself: a waiting attach returns False, and so do later ones."""
        self._vm_dead = True
        self._client_gone = True
        self._wake_attach()

    def stop_posting(self) -> None:
        """The vCPU threads are being stopped: new posts fail at once (call with the vCPU
        run lock held, so no thread sees a half-stopped VM)."""
        self._stopping = True

    def release_waiters(self) -> None:
        """Wake every vCPU sleeping on a completion (after ``stop_posting``): it gives up."""
        for waiter in self._waiters:
            if waiter.in_flight:
                waiter.in_flight = False
                waiter.done.release()

    def close(self) -> None:
        """At VM destroy: a waiting attach returns False, the page is let go."""
        self._client_gone = True
        self._wake_attach()
        if self._efd >= 0:
            try:
                trio.lowlevel.notify_closing(self._efd)
            except RuntimeError:
                pass  # not inside trio
            os.close(self._efd)
            self._efd = -1
        if self._page is not None:
            self._page.release()
            self._page = None
