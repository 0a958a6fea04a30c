"""The request page and the IoreqServer: one trio task that answers every VM exit.

The handshake (acrn-facts §1.5): wait in ATTACH_IOREQ_CLIENT; scan slots 0..vcpu_num-1;
serve each slot whose state is PROCESSING and kernel_handled == 0; write the read value
at +24 (u32 for PIO/PCICFG, u64 for MMIO); NOTIFY_REQUEST_FINISH.  We never write the
state field: the HSM and the hypervisor own it.

Nothing in a slot can stop the server: unhandled reads get all-ones of the access size,
unhandled writes are dropped, bad sizes and unknown types are completed and counted, and a
handler that raises is logged (rate limited) and answered with all-ones.
"""

from __future__ import annotations

import logging
import mmap
import struct
from collections import Counter
from typing import Protocol

import trio

from .bus import Bus, MmioBus, PortBus
from .hsm import abi
from .hsm.base import Hypervisor
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

_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
_PIO_SIZES = (1, 2, 4)
_MMIO_SIZES = (1, 2, 4, 8)


class PciConfigAccess(Protocol):
    """Answers PCICFG requests (the PCI bus). Reads of nothing return all-ones."""

    def cfg_read(self, bus: int, dev: int, func: int, reg: int, size: int) -> int: ...

    def cfg_write(self, bus: int, dev: int, func: int, reg: int, size: int, value: int) -> None: ...


class NoPci:
    """No PCI bus: every config read is all-ones, every write dropped."""

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
        self.stats: Counter[str] = Counter()
        #: Set by vm.py when a request asks for reset/suspend: that slot is then left
        #: uncompleted (completing it would let the vCPU run on), as acrn-dm does.
        self.hold_completion = False
        self.held: list[int] = []
        self._offsets = [abi.slot_offset(v) for v in range(vcpu_num)]
        self._rl = RateLimitedLog(log)

    async def serve(self) -> None:
        """Run until the hypervisor says the client is gone (destroy) or we are cancelled."""
        hv = self.hv
        while True:
            if not await hv.attach_ioreq_client():
                return
            self.scan()

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

    def handle_slot(self, off: int) -> None:
        """Emulate the access in the slot at byte offset ``off`` and write its result."""
        page = self.page
        (rtype,) = _TYPE.unpack_from(page, off)
        try:
            if rtype == abi.IOREQ_TYPE_PORTIO:
                self._portio(page, off)
            elif rtype == abi.IOREQ_TYPE_MMIO:
                self._mmio(page, off)
            elif rtype == abi.IOREQ_TYPE_PCICFG:
                self._pcicfg(page, off)
            else:
                self.stats["unknown_type"] += 1
                self._rl.warning("request of unknown type %d completed unhandled", rtype)
        except Exception:  # a device bug must not take the VM down
            self.stats["handler_error"] += 1
            self._rl.error("device handler raised; request answered with all-ones")
            log.debug("handler traceback", exc_info=True)
            direction = _U32.unpack_from(page, off + _REQS_OFF)[0]
            if direction != _WRITE:
                if rtype == abi.IOREQ_TYPE_MMIO:
                    _U64.pack_into(page, off + _VALUE_OFF, 0xFFFF_FFFF_FFFF_FFFF)
                else:
                    _U32.pack_into(page, off + _VALUE_OFF, 0xFFFF_FFFF)

    def _portio(self, page: memoryview, off: int) -> None:
        self._bus_access(page, off, self.ports, _PIO_SIZES, 0xFFFF, _U32, "pio")

    def _mmio(self, page: memoryview, off: int) -> None:
        self._bus_access(page, off, self.mmio, _MMIO_SIZES, 0xFFFF_FFFF_FFFF_FFFF, _U64, "mmio")

    def _bus_access(self, page: memoryview, off: int, bus: Bus, sizes: tuple[int, ...],
                    limit: int, value_view: struct.Struct, kind: str) -> None:
        """A PIO or MMIO request: the two differ only in bus, sizes and the value's width."""
        direction, _, addr, size = _ADDR_REQ.unpack_from(page, off + _REQS_OFF)
        if size not in sizes or addr > limit:
            self.stats["bad_request"] += 1
            if direction != _WRITE:
                value_view.pack_into(page, off + _VALUE_OFF, _MASK[value_view.size])
            return
        mask = _MASK[size]
        if direction == _WRITE:
            value = value_view.unpack_from(page, off + _VALUE_OFF)[0] & mask
            if not bus.write(addr, size, value):
                self.stats["unhandled_" + kind] += 1
        else:
            value = bus.read(addr, size)
            if value is None:
                self.stats["unhandled_" + kind] += 1
                value = mask
            value_view.pack_into(page, off + _VALUE_OFF, value & mask)
        self.stats[kind] += 1

    def _pcicfg(self, page: memoryview, off: int) -> None:
        direction, size, value, bus, dev, func, reg = _PCI_REQ.unpack_from(page, off + _REQS_OFF)
        if size not in _PIO_SIZES or bus > 0xFF or dev > 0x1F or func > 7 or reg > 0xFFF:
            self.stats["bad_request"] += 1
            if direction != _WRITE:
                _U32.pack_into(page, off + _VALUE_OFF, 0xFFFF_FFFF)
            return
        mask = _MASK[size]
        if direction == _WRITE:
            self.pci.cfg_write(bus, dev, func, reg, size, value & mask)
        else:
            result = self.pci.cfg_read(bus, dev, func, reg, size)
            _U32.pack_into(page, off + _VALUE_OFF, result & mask)
        self.stats["pcicfg"] += 1

    def release_held(self) -> None:
        """Complete the slots held back during a reset/suspend transition."""
        held, self.held = self.held, []
        for vcpu in held:
            self.hv.notify_request_finish(vcpu)


async def serve_forever(server: IoreqServer, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Nursery entry point: reports started, then serves."""
    task_status.started()
    await server.serve()
