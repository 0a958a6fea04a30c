"""The request page and the IoreqServer: one trio task that answers every VM exit.

The handshake (acrn-facts §1.5): wait in ATTACH_IOREQ_CLIENT; scan slots 0..vcpu_num-1;
serve each slot whose state is PROCESSING and kernel_handled == 0; write the read value
at +24 (u32 for PIO/PCICFG, u64 for MMIO); NOTIFY_REQUEST_FINISH.  We never write the
state field: the HSM and the hypervisor own it.

Nothing in a slot can stop the server: unhandled reads get all-ones of the access size,
unhandled writes are dropped, bad sizes and unknown types are completed and counted, and a
handler that raises is logged (rate limited) and answered with all-ones.

One hop at most: while ``serve`` runs, the server offers the backend ``serve_here`` and
``scan_here`` (``hsm.base.InlineServer``). The thread that saw the request (a KVM vCPU
thread, the ACRN waiter thread) answers it itself when the loop sleeps and the handler is
``vcpu_safe`` (``loopgate.py``, ``bus.py``): the same slot protocol, the same handler
code, no wake of the loop. Everything else is handed to the loop as before.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from collections import Counter
from typing import Protocol

import trio

from .bus import Bus, MmioBus, PortBus
from .hsm import abi
from .hsm.base import Hypervisor
from .loopgate import LoopGate
from .ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

_STATE = abi.SLOT_STATE
_TYPE = abi.SLOT_TYPE
_ADDR_REQ = abi.SLOT_ADDR_REQ
_PCI_REQ = abi.SLOT_PCI_REQ
_U32 = abi.SLOT_U32
_U64 = abi.SLOT_U64
_PROCESSING = abi.IOREQ_STATE_PROCESSING
_KH_OFF = abi.SLOT_KERNEL_HANDLED_OFF
_REQS_OFF = abi.SLOT_REQS_OFF
_VALUE_OFF = abi.SLOT_VALUE_OFF
_WRITE = abi.IOREQ_DIR_WRITE
_PORTIO = abi.IOREQ_TYPE_PORTIO
_MMIO = abi.IOREQ_TYPE_MMIO
_ONES64 = 0xFFFF_FFFF_FFFF_FFFF
# type; then (at +64) direction, reserved, address, size; the value read as a u64 (+88)
_HEAD = struct.Struct("<I60xIIQQQ")

#: After serving on the loop, poll the slots this long for the vCPU's next request
#: (ACRN issue 1821's bounded spin): a guest that exits again at once (a driver polling a
#: register, a string of port writes) is answered with no wake of this thread, where a
#: wake of an idle CPU costs 40 µs on a nested VM. Only where the vCPUs are not our
#: threads (ACRN): on KVM they would wait for the GIL the poll holds.
LINGER_NS = 30_000
#: the longest the loop polls before its other tasks get a turn (a guest that never
#: stops exiting cannot keep them waiting)
LINGER_BUDGET_NS = 1_000_000

_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
_PIO_SIZES = (1, 2, 4)
_MMIO_SIZES = (1, 2, 4, 8)


class PciConfigAccess(Protocol):
    """Answers PCICFG requests (the PCI bus). Reads of nothing return all-ones.

    It may also have ``vcpu_safe(bus, dev, func, reg, size, write) -> bool``: whether
    that access may be served behind the loop gate (without it, none is)."""

    def cfg_read(self, bus: int, dev: int, func: int, reg: int, size: int) -> int: ...

    def cfg_write(self, bus: int, dev: int, func: int, reg: int, size: int, value: int) -> None: ...


class _BusKind:
    """What a PIO or MMIO request needs that only its type decides, and how many of
    that type were served."""

    __slots__ = ("bus", "limit", "name", "served", "sizes", "value")

    def __init__(self, bus: Bus, sizes: tuple[int, ...], limit: int, value: struct.Struct,
                 name: str) -> None:
        self.bus, self.sizes, self.limit, self.value, self.name = bus, sizes, limit, value, name
        self.served = 0


class NoPci:
    """No PCI bus: every config read is all-ones, every write dropped."""

    def vcpu_safe(self, bus: int, dev: int, func: int, reg: int, size: int,
                  write: bool) -> bool:
        return True

    def cfg_read(self, bus: int, dev: int, func: int, reg: int, size: int) -> int:
        return _MASK.get(size, 0xFFFF_FFFF)

    def cfg_write(self, bus: int, dev: int, func: int, reg: int, size: int, value: int) -> None:
        pass


def new_ioreq_page() -> mmap.mmap:
    """A page-aligned, zeroed 4 KiB anonymous mapping for the 16 request slots."""
    return mmap.mmap(-1, abi.IOREQ_PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class IoreqServer:
    """Serves the request slots of one VM."""

    def __init__(
        self,
        hv: Hypervisor,
        page: mmap.mmap,
        vcpu_num: int,
        ports: PortBus,
        mmio: MmioBus,
        pci: PciConfigAccess | None = None,
    ) -> None:
        if not 1 <= vcpu_num <= abi.ACRN_IO_REQUEST_MAX:
            raise ValueError(f"vcpu_num {vcpu_num} outside 1..{abi.ACRN_IO_REQUEST_MAX}")
        self.hv = hv
        self.page = memoryview(page)
        self.vcpu_num = vcpu_num
        self.ports = ports
        self.mmio = mmio
        self.pci: PciConfigAccess = pci or NoPci()
        #: what happened besides a request served (unhandled, bad, handler errors, ...);
        #: ``stats`` adds the served counts
        self.events: Counter[str] = Counter()
        #: Set by vm.py when a request asks for reset/suspend: that slot is then left
        #: uncompleted (completing it would let the vCPU run on), as acrn-dm does.
        self.hold_completion = False
        self.held: list[int] = []
        #: how long the loop polls for the next request after serving (``LINGER_NS``;
        #: 0: never), where the hypervisor's vCPUs are not our threads
        self.linger_ns = LINGER_NS
        self._offsets = [abi.slot_offset(v) for v in range(vcpu_num)]
        self._rl = RateLimitedLog(log)
        #: held by the loop while it runs; a request thread that gets it serves there
        self.gate = LoopGate()
        self._buses = {
            _PORTIO: _BusKind(ports, _PIO_SIZES, 0xFFFF, _U32, "pio"),
            _MMIO: _BusKind(mmio, _MMIO_SIZES, _ONES64, _U64, "mmio"),
        }
        self._pcicfg_served = 0

    @property
    def stats(self) -> Counter[str]:
        """Requests seen, by what became of them: served per kind (pio, mmio, pcicfg;
        an unhandled one counts too), unhandled_*, bad_request, unknown_type,
        handler_error. A snapshot: the served counts are plain integers on the hot
        path (a Counter update costs ~0.4 µs, several times that cache-cold)."""
        counts = Counter(self.events)
        for kind in self._buses.values():
            counts[kind.name] += kind.served
        counts["pcicfg"] += self._pcicfg_served
        return +counts  # without the zero entries, as a Counter that was never bumped

    async def serve(self) -> None:
        """Run until the hypervisor says the client is gone (destroy) or we are cancelled."""
        hv = self.hv
        offer = getattr(hv, "set_inline_server", None)  # a stand-in may lack it
        self.gate.install()
        if offer is not None:
            offer(self)
        linger = self.linger_ns if getattr(hv, "vcpus_elsewhere", False) else 0
        try:
            while True:
                if not await hv.attach_ioreq_client():
                    return
                if self.scan() and linger and self._linger(linger):
                    await trio.lowlevel.checkpoint()  # the loop's other tasks run now
        finally:
            if offer is not None:
                offer(None)
            self.gate.remove()

    # --- on the thread that saw the request (behind the loop gate) ------------------------
    def serve_here(self, vcpu: int) -> bool:
        """Answer ``vcpu``'s slot on the calling thread and complete it, if the loop
        sleeps and the access's handler is ``vcpu_safe``; False: hand it to the loop.
        (The hot path of every request on KVM: one call from the vCPU thread down to the
        handler, see ``handle_slot``.)"""
        if not 0 <= vcpu < self.vcpu_num:
            return False
        gate = self.gate
        if not gate.try_enter():
            return False
        try:
            off = self._offsets[vcpu]
            kernel_handled, state = _STATE.unpack_from(self.page, off + _KH_OFF)
            if state != _PROCESSING or kernel_handled or self.hold_completion or self.held:
                return False  # served already, not ours, or a reset holds completions
            if not self.handle_slot(off, True):
                return False  # its handler is not safe here: the loop serves it
            self.hv.notify_request_finish(vcpu)
            return True
        finally:
            gate.leave()

    def scan_here(self) -> bool:
        """``serve_here`` for every slot that is ours; True when none is left for the
        loop (then there is nothing to hand over)."""
        left = False
        for vcpu in range(self.vcpu_num):
            kernel_handled, state = _STATE.unpack_from(self.page,
                                                       self._offsets[vcpu] + _KH_OFF)
            if state == _PROCESSING and not kernel_handled:
                left = not self.serve_here(vcpu) or left
        return not left

    def _linger(self, linger_ns: int) -> bool:
        """Poll the slots up to ``linger_ns`` for the next request and serve it right
        here, again after each one, for at most ``LINGER_BUDGET_NS`` in all; True if
        any was served."""
        page, offsets, unpack = self.page, self._offsets, _STATE.unpack_from
        clock, yield_cpu = time.perf_counter_ns, os.sched_yield
        now = clock()
        deadline, budget_end = now + linger_ns, now + LINGER_BUDGET_NS
        served = False
        while now < deadline:
            for off in offsets:
                kernel_handled, state = unpack(page, off + _KH_OFF)
                if state == _PROCESSING and not kernel_handled:
                    if not self.scan():
                        return served  # held for a reset: nothing to wait for
                    served = True
                    deadline = min(clock() + linger_ns, budget_end)
                    break
            else:
                yield_cpu()  # (lets go of the GIL: a data-plane thread may want it)
            now = clock()
        return served

    def scan(self) -> int:
        """Serve every slot that is ours now; returns how many were served."""
        page = self.page
        served = 0
        for vcpu, off in enumerate(self._offsets):
            kernel_handled, state = _STATE.unpack_from(page, off + _KH_OFF)
            if state != _PROCESSING or kernel_handled:
                continue
            if self.held and vcpu in self.held:
                continue  # answered already; its completion waits for the reset
            self.handle_slot(off)
            served += 1
            if self.hold_completion:
                self.held.append(vcpu)
                continue
            self.hv.notify_request_finish(vcpu)
        return served

    def handle_slot(self, off: int, vcpu_safe_only: bool = False) -> bool:
        """Emulate the access in the slot at byte offset ``off`` and write its result.
        With ``vcpu_safe_only`` (behind the loop gate) an access whose handler is not
        ``vcpu_safe`` is left alone and False returned; else True.

        PIO and MMIO differ only in bus, sizes and the value's width (``value`` is read
        as a u64: the mask keeps what a PIO value has). This is one function on purpose:
        on KVM a vCPU thread runs it for every exit, cache-cold after the guest ran, and
        each call level it saves is measurable (bench/exit_roundtrip.py)."""
        page = self.page
        rtype, direction, _, addr, size, value = _HEAD.unpack_from(page, off)
        kind = self._buses.get(rtype)
        try:
            if kind is None:
                if rtype == abi.IOREQ_TYPE_PCICFG:
                    return self._pcicfg(page, off, vcpu_safe_only)
                self.events["unknown_type"] += 1
                self._rl.warning("request of unknown type %d completed unhandled", rtype)
                return True
            value_view = kind.value
            if size not in kind.sizes or addr > kind.limit:
                self.events["bad_request"] += 1
                if direction != _WRITE:
                    value_view.pack_into(page, off + _VALUE_OFF, _MASK[value_view.size])
                return True
            bus = kind.bus
            r = bus.last  # the last hit first (Bus.lookup's own check, without a call)
            if r is None or not (r.base <= addr and addr + size <= r.end):
                r = bus.lookup(addr, size)
                if r is None:
                    self.events["unhandled_" + kind.name] += 1
                    kind.served += 1
                    if direction != _WRITE:
                        value_view.pack_into(page, off + _VALUE_OFF, _MASK[size])
                    return True
            if vcpu_safe_only and not r.vcpu_safe:
                access = r.vcpu_safe_access
                if access is None or not access(addr - r.base, size, direction == _WRITE):
                    return False
            if direction == _WRITE:
                r.handler.write(addr - r.base, size, value & _MASK[size])
            else:
                value_view.pack_into(page, off + _VALUE_OFF,
                                     r.handler.read(addr - r.base, size) & _MASK[size])
            kind.served += 1
        except Exception:  # a device bug must not take the VM down
            self.events["handler_error"] += 1
            self._rl.error("device handler raised; request answered with all-ones")
            log.debug("handler traceback", exc_info=True)
            if direction != _WRITE:
                if rtype == _MMIO:
                    _U64.pack_into(page, off + _VALUE_OFF, _ONES64)
                else:
                    _U32.pack_into(page, off + _VALUE_OFF, 0xFFFF_FFFF)
        return True

    def _pcicfg(self, page: memoryview, off: int, vcpu_safe_only: bool) -> bool:
        direction, size, value, bus, dev, func, reg = _PCI_REQ.unpack_from(page, off + _REQS_OFF)
        if size not in _PIO_SIZES or bus > 0xFF or dev > 0x1F or func > 7 or reg > 0xFFF:
            self.events["bad_request"] += 1
            if direction != _WRITE:
                _U32.pack_into(page, off + _VALUE_OFF, 0xFFFF_FFFF)
            return True
        if vcpu_safe_only:
            safe = getattr(self.pci, "vcpu_safe", None)
            if safe is None or not safe(bus, dev, func, reg, size, direction == _WRITE):
                return False
        mask = _MASK[size]
        if direction == _WRITE:
            self.pci.cfg_write(bus, dev, func, reg, size, value & mask)
        else:
            result = self.pci.cfg_read(bus, dev, func, reg, size)
            _U32.pack_into(page, off + _VALUE_OFF, result & mask)
        self._pcicfg_served += 1
        return True

    def release_held(self) -> None:
        """Complete the slots held back during a reset/suspend transition."""
        held, self.held = self.held, []
        for vcpu in held:
            self.hv.notify_request_finish(vcpu)


async def serve_forever(server: IoreqServer, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Nursery entry point: reports started, then serves."""
    task_status.started()
    await server.serve()
