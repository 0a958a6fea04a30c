"""The client's interrupts: one eventfd per vector of each IRQ index, as SET_IRQS set them.

The rules are those of Linux's vfio-pci (vfio.h ``VFIO_DEVICE_SET_IRQS``), which QEMU's
client is written against:

* INTx is level-triggered and *automasked*: when our line rises and the index is
  unmasked we signal the trigger eventfd once and mask; the client unmasks (an UNMASK
  action, or a write to the unmask eventfd it gave us) after the guest's EOI, and if our
  line is still up then, we signal again. That is how a level line survives an edge
  eventfd.
* MSI and MSI-X: vector ``i`` of the device signals trigger eventfd ``i``. The client
  owns the message address/data (QEMU emulates the MSI and MSI-X capabilities and the
  MSI-X table itself), so only the vector number crosses the socket. The device raises
  them through the interrupt layer's ``EventfdVectors`` (any thread); the fds a SET_IRQS
  installs go there before the ones they replace are closed.
* ERR and REQ: one eventfd each, never signalled by our emulated devices.

DATA_EVENTFD with no fds de-assigns the vectors named (the protocol's stand-in for fd -1);
DATA_NONE with count 0 disables the whole index; DATA_NONE/DATA_BOOL with TRIGGER makes
us signal the vectors (a loopback test the client may run). INTx, ERR/REQ and the
loopback triggers are signalled on the event loop's thread, the one that swaps the fds.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

from .. import peerfd
from ..irq.delivery import EventfdVectors
from . import protocol as p
from .protocol import IrqSet, Refused


def _close(fd: int) -> None:
    """Close a client's fd; a task waiting on it (the unmask watcher) is woken first."""
    try:
        trio.lowlevel.notify_closing(fd)
    except RuntimeError:
        pass  # not inside trio (a unit test driving ClientIrqs directly)
    os.close(fd)


def signal_eventfd(fd: int) -> None:
    """Add 1 to the client's eventfd without ever blocking (peerfd: a full one already has
    a wake-up pending; a failure is the client's problem, it went away)."""
    peerfd.signal_fd(fd)


@dataclass
class IrqIndex:
    """One IRQ index: its vectors' trigger eventfds and (INTx) mask state."""

    index: int
    count: int
    triggers: list[int | None] = field(default_factory=list)
    #: INTx only: masked by the client or by our automask after a trigger
    masked: bool = False
    #: INTx only: the client's unmask eventfd (ACTION_UNMASK with DATA_EVENTFD)
    unmask_fd: int | None = None
    #: vectors signalled, for tests and the demo's summary
    signalled: int = 0

    def __post_init__(self) -> None:
        self.triggers = [None] * self.count

    @property
    def info_flags(self) -> int:
        if self.index == p.INTX_IRQ:
            return p.IRQ_INFO_EVENTFD | p.IRQ_INFO_MASKABLE | p.IRQ_INFO_AUTOMASKED
        if self.index == p.MSI_IRQ:
            return p.IRQ_INFO_EVENTFD | p.IRQ_INFO_NORESIZE
        return p.IRQ_INFO_EVENTFD

    def close(self) -> None:
        for i, fd in enumerate(self.triggers):
            if fd is not None:
                os.close(fd)
                self.triggers[i] = None
        if self.unmask_fd is not None:
            _close(self.unmask_fd)
            self.unmask_fd = None


class ClientIrqs:
    """Every IRQ index of one device, and what a SET_IRQS does to them.

    ``on_unmask_fd`` is called when the INTx unmask eventfd changes (the session watches
    it); ``intx_level`` tells whether the device's INTx line is up now; ``vectors`` are
    the per-index ``EventfdVectors`` the device raises MSI / MSI-X vectors through.
    """

    def __init__(self, counts: dict[int, int], intx_level: Callable[[], bool],
                 on_unmask_fd: Callable[[int | None], None] | None = None,
                 vectors: Mapping[int, EventfdVectors] | None = None) -> None:
        self.indexes = [IrqIndex(i, counts.get(i, 0)) for i in range(p.NUM_IRQS)]
        self._intx_level = intx_level
        self._on_unmask_fd = on_unmask_fd
        self._vectors = dict(vectors or {})

    # --- signalling (from the device) ---------------------------------------------------
    def signal(self, index: int, vector: int) -> bool:
        """Signal ``vector`` of ``index``; False if the client gave no eventfd for it."""
        irq = self.indexes[index]
        if not 0 <= vector < irq.count:
            return False
        fd = irq.triggers[vector]
        if fd is None:
            return False
        signal_eventfd(fd)
        irq.signalled += 1
        return True

    def intx_changed(self, level: bool) -> None:
        """Our INTx line went up (signal unless masked, then automask) or down."""
        irq = self.indexes[p.INTX_IRQ]
        if level and not irq.masked and self.signal(p.INTX_IRQ, 0):
            irq.masked = True

    def intx_unmask(self) -> None:
        irq = self.indexes[p.INTX_IRQ]
        irq.masked = False
        if self._intx_level():
            self.intx_changed(True)

    # --- SET_IRQS ---------------------------------------------------------------------
    def set_irqs(self, req: IrqSet, fds: list[int]) -> None:
        """Apply one SET_IRQS. Takes ownership of ``fds`` (kept or closed, even on error)."""
        try:
            self._set_irqs(req, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _set_irqs(self, req: IrqSet, fds: list[int]) -> None:
        for fd in fds:  # never block on a peer's fd (a full eventfd, a pipe, a FUSE file)
            try:
                peerfd.adopt(fd, "SET_IRQS")
            except peerfd.PeerFdError as e:
                raise Refused(errno.EINVAL, str(e)) from None
        what = f"SET_IRQS {p.IRQ_NAMES[req.index] if req.index < p.NUM_IRQS else req.index}"
        if req.index >= p.NUM_IRQS:
            raise Refused(errno.EINVAL, f"SET_IRQS: no IRQ index {req.index}")
        data, action = req.data_kind, req.action
        if bin(data).count("1") != 1 or bin(action).count("1") != 1 \
                or req.flags & ~(p.SET_DATA_MASK | p.SET_ACTION_MASK_ALL):
            raise Refused(errno.EINVAL, f"{what}: flags {req.flags:#x} need exactly one "
                          "DATA and one ACTION bit")
        irq = self.indexes[req.index]
        if req.start + req.count > irq.count and not (req.count == 0 and req.start == 0):
            raise Refused(errno.EINVAL, f"{what}: vectors {req.start}+{req.count} "
                          f"beyond the {irq.count} the index has")
        if data != p.SET_DATA_EVENTFD and fds:
            raise Refused(errno.EINVAL, f"{what}: file descriptors without DATA_EVENTFD")
        if data == p.SET_DATA_EVENTFD and fds and len(fds) != req.count:
            raise Refused(errno.EINVAL, f"{what}: {len(fds)} eventfds for {req.count} vectors")
        mask: list[bool] = [True] * req.count
        if data == p.SET_DATA_BOOL:
            if len(req.data) < req.count:
                raise Refused(errno.EINVAL, f"{what}: {len(req.data)} booleans for "
                              f"{req.count} vectors")
            mask = [b != 0 for b in req.data[: req.count]]
        if action == p.SET_ACTION_TRIGGER:
            self._trigger(irq, req, data, fds, mask, what)
        elif req.index != p.INTX_IRQ:
            raise Refused(errno.EINVAL, f"{what}: only INTx can be masked and unmasked "
                          "(the client owns the MSI and MSI-X masks)")
        elif req.count == 0 or req.start != 0 or req.count > 1:
            raise Refused(errno.EINVAL, f"{what}: INTx has one vector (start 0, count 1)")
        elif action == p.SET_ACTION_MASK:
            if data == p.SET_DATA_EVENTFD:
                raise Refused(errno.EINVAL, f"{what}: MASK with an eventfd is not supported")
            if mask[0]:
                irq.masked = True
        elif data == p.SET_DATA_EVENTFD:  # UNMASK: an eventfd that unmasks when written
            self._set_unmask_fd(irq, fds[0] if fds else None)
        elif mask[0]:
            self.intx_unmask()

    def _trigger(self, irq: IrqIndex, req: IrqSet, data: int, fds: list[int],
                 mask: list[bool], what: str) -> None:
        if data == p.SET_DATA_EVENTFD:
            if req.index in (p.INTX_IRQ, p.ERR_IRQ, p.REQ_IRQ) and (req.start or req.count > 1):
                raise Refused(errno.EINVAL, f"{what}: one vector only (start 0, count 1)")
            new: list[int | None] = list(fds) if fds else [None] * req.count
            vectors = self._vectors.get(req.index)
            if vectors is not None:  # the device signals the new fds from now on
                vectors.set_fds(req.start, new)
            for i in range(req.count):
                old = irq.triggers[req.start + i]
                irq.triggers[req.start + i] = new[i]
                if old is not None:
                    os.close(old)
            if req.index == p.INTX_IRQ:
                irq.masked = False
                if fds and self._intx_level():
                    self.intx_changed(True)
            return
        if req.count == 0:
            if data != p.SET_DATA_NONE:
                raise Refused(errno.EINVAL, f"{what}: count 0 needs DATA_NONE")
            self.disable(req.index)
            return
        for i in range(req.count):
            if mask[i]:
                self.signal(req.index, req.start + i)

    def _set_unmask_fd(self, irq: IrqIndex, fd: int | None) -> None:
        if irq.unmask_fd is not None:
            if self._on_unmask_fd is not None:
                self._on_unmask_fd(None)
            _close(irq.unmask_fd)
        irq.unmask_fd = fd
        if fd is not None and self._on_unmask_fd is not None:
            self._on_unmask_fd(fd)

    def disable(self, index: int) -> None:
        irq = self.indexes[index]
        if irq.unmask_fd is not None:
            self._set_unmask_fd(irq, None)
        vectors = self._vectors.get(index)
        if vectors is not None:
            vectors.set_fds(0, [None] * irq.count)
        irq.close()
        irq.masked = False

    def close(self) -> None:
        """Close every fd the client gave (it went away)."""
        for i in range(p.NUM_IRQS):
            self.disable(i)
