"""A software hypervisor: owns the request page and guest RAM the way ACRN does, and gives
tests (and demos) a scriptable guest.

A ``SimVcpu`` access posts a request with the exact state transitions of acrn-facts §1.5:
the "hypervisor" writes the slot and marks it PENDING; the "HSM" converts CF8/CFC port
accesses to PCICFG (or completes them in the kernel), matches ioeventfds, and marks the
slot PROCESSING for the device model; the DM answers and calls NOTIFY_REQUEST_FINISH,
which marks it COMPLETE; the vCPU copies the value back and frees the slot.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from dataclasses import dataclass, field

import trio

from ..loopgate import call_on
from ..memory import MemoryMap, RamRegion
from . import abi
from .base import (
    Hypervisor,
    HypervisorError,
    MessageSource,
    MmioDevAssignment,
    PciDevAssignment,
    PtdevIntx,
    RemapperFactory,
    VcpuRegs,
    VdevSpec,
    VmInfo,
)
from .hsm_dispatch import PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA, HsmDispatcher, IoEventFdReg
from .sim_hv import SimHvSide
from .sim_remap import SimRemapEntry, SimRemapper

_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class SimVmGone(Exception):
    """The VM was destroyed (or its client went away) while a guest access was in flight."""


@dataclass
class _IrqFd:
    fd: int
    address: int
    data: int
    cancel: trio.CancelScope | None = None
    taken: bool = False  # read by someone else now (take_irqfd), not injected by us


@dataclass
class IrqLineEvent:
    gsi: int
    op: int


@dataclass
class _Vcpu:
    done: trio.Event = field(default_factory=trio.Event)
    busy: bool = False


class SimHypervisor(Hypervisor):
    """One simulated VM. ``vcpus=None`` takes the count from CREATE_VM's cpu_affinity."""

    name = "sim"

    def __init__(self, vcpus: int | None = None) -> None:
        if vcpus is not None and not 1 <= vcpus <= abi.ACRN_IO_REQUEST_MAX:
            raise ValueError(f"vcpus must be 1..{abi.ACRN_IO_REQUEST_MAX}")
        self._want_vcpus = vcpus
        self.vcpu_num = 0
        self.vm_name: str | None = None
        self.page: memoryview | None = None
        self.memory = MemoryMap()
        self.state = "none"  # none, created, running, paused, destroyed
        self.msis: list[tuple[int, int]] = []
        self._msi_cursor = 0
        self._msi_event = trio.Event()
        #: (thread id, token) of the loop serving the backend (or waiting in ``next_msi``):
        #: interrupts from another thread (a data plane's) reach trio through the token
        self._loop: tuple[int, trio.lowlevel.TrioToken] | None = None
        self.irqlines: dict[int, int] = {}
        self.irqline_events: list[IrqLineEvent] = []
        self.vcpu_regs: dict[int, VcpuRegs] = {}
        self.assigned: list[PciDevAssignment] = []
        self.ptdev_intx: list[PtdevIntx] = []
        #: interrupt remapping: (source id, handle) → entry; consulted by ``remap_msi``
        self.remap_table: dict[tuple[str, int], SimRemapEntry] = {}
        self.remap_reserved: set[int] = set()
        self.calls: list[str] = []
        self._client = False
        self._client_destroyed = False
        self._pending: set[int] = set()
        self._wake = trio.Event()
        self._running = trio.Event()
        self._vcpus: list[_Vcpu] = []
        self.hsm = HsmDispatcher()
        self._irqfds: dict[int, _IrqFd] = {}
        self._nursery: trio.Nursery | None = None
        self._irqfd_queue: list[_IrqFd] = []
        #: what the hypervisor answers itself: its vdevs, mapped memory, PM and storm data
        self.hv_side = SimHvSide()
        #: CREATE_VM's vm_flag (GUEST_FLAG_*)
        self.vm_flag = 0
        #: host MMIO mapped into the guest (SET_MEMSEG MMIO): gpa -> (hpa, length)
        self.mmio_maps: dict[int, tuple[int, int]] = {}

    # --- guest side -------------------------------------------------------------------
    def guest(self, vcpu: int = 0) -> SimVcpu:
        if not 0 <= vcpu < max(self.vcpu_num, 1):
            raise ValueError(f"no vCPU {vcpu} (the VM has {self.vcpu_num})")
        return SimVcpu(self, vcpu)

    async def next_msi(self) -> tuple[int, int]:
        """The next MSI not yet returned by this call, waiting for it if need be."""
        self._loop = (threading.get_ident(), trio.lowlevel.current_trio_token())
        while self._msi_cursor >= len(self.msis):
            self._msi_event = trio.Event()
            await self._msi_event.wait()
        msi = self.msis[self._msi_cursor]
        self._msi_cursor += 1
        return msi

    # --- VM lifecycle -----------------------------------------------------------------
    def create_vm(
        self, name: str, ioreq_page: mmap.mmap, *, vm_flag: int = 0, cpu_affinity: int = 0
    ) -> VmInfo:
        self.calls.append("create_vm")
        if self.state not in ("none", "destroyed"):
            raise HypervisorError("CREATE_VM: this handle already holds a VM", errno.EEXIST)
        if len(name.encode()) >= abi.VM_NAME_FIELD_LEN:
            raise HypervisorError(f"CREATE_VM: VM name {name!r} must be shorter than 16 bytes")
        n = self._want_vcpus or (bin(cpu_affinity).count("1") if cpu_affinity else 1)
        if n > abi.ACRN_IO_REQUEST_MAX:
            raise HypervisorError("CREATE_VM: too many vCPUs", errno.EINVAL)
        self.vcpu_num = n
        self.vm_name = name
        self.vm_flag = vm_flag
        self.memory = MemoryMap()  # a new VM on this handle starts with no RAM mapped
        self._client = False
        self.page = memoryview(ioreq_page)
        for v in range(abi.ACRN_IO_REQUEST_MAX):
            self._set_state(v, abi.IOREQ_STATE_FREE)
        self._vcpus = [_Vcpu() for _ in range(n)]
        self.state = "created"
        self._client_destroyed = False
        return VmInfo(vmid=0, vcpu_num=n)

    def destroy_vm(self) -> None:
        self.calls.append("destroy_vm")
        self.state = "destroyed"
        self._client_destroyed = True
        self._wake.set()
        self._running.set()  # wake guests waiting to run so they see the VM is gone
        for vc in self._vcpus:
            vc.done.set()
        for irqfd in self._irqfds.values():
            if irqfd.cancel:
                irqfd.cancel.cancel()
        self._irqfds.clear()
        self.hsm = HsmDispatcher()
        self.hv_side.reset()

    def start_vm(self) -> None:
        self.calls.append("start_vm")
        self._need_vm()
        self.state = "running"
        self.hsm.clearing = False
        self._running.set()

    def pause_vm(self) -> None:
        self.calls.append("pause_vm")
        self._need_vm()
        if self.state == "running":
            self.state = "paused"
            self._running = trio.Event()

    def reset_vm(self) -> None:
        self.calls.append("reset_vm")
        self._need_vm()
        for v in range(abi.ACRN_IO_REQUEST_MAX):
            self._set_state(v, abi.IOREQ_STATE_FREE)
        self._pending.clear()
        self.hsm.reset()

    def set_vcpu_regs(self, vcpu_id: int, regs: VcpuRegs) -> None:
        self.calls.append("set_vcpu_regs")
        self._need_vm()
        self.vcpu_regs[vcpu_id] = regs

    def set_memseg(self, gpa: int, backing: mmap.mmap, attr: int) -> None:
        self.calls.append("set_memseg")
        self._need_vm()
        self.memory.add(RamRegion(gpa=gpa, size=len(backing), mm=backing))

    def map_mmio(self, gpa: int, hpa: int, length: int) -> None:
        self._need_vm()
        self.mmio_maps[gpa] = (hpa, length)

    def unset_mmio(self, gpa: int, length: int) -> None:
        self._need_vm()
        self.mmio_maps.pop(gpa, None)

    # --- requests ---------------------------------------------------------------------
    def create_ioreq_client(self) -> None:
        self.calls.append("create_ioreq_client")
        self._need_vm()
        if self._client:
            raise HypervisorError("CREATE_IOREQ_CLIENT: client exists", errno.EEXIST)
        self._client = True
        self._client_destroyed = False

    async def attach_ioreq_client(self) -> bool:
        while True:
            if self._client_destroyed or not self._client:
                return False
            if self._pending:
                await trio.lowlevel.checkpoint()
                return not self._client_destroyed
            self._wake = trio.Event()
            await self._wake.wait()

    def destroy_ioreq_client(self) -> None:
        self.calls.append("destroy_ioreq_client")
        self._client = False
        self._client_destroyed = True
        self._wake.set()

    def notify_request_finish(self, vcpu: int) -> None:
        self._need_vm()
        if not 0 <= vcpu < self.vcpu_num:
            raise HypervisorError(f"NOTIFY_REQUEST_FINISH: vcpu {vcpu} invalid", errno.EINVAL)
        self._pending.discard(vcpu)
        self._complete(vcpu)

    def clear_vm_ioreq(self) -> None:
        self.calls.append("clear_vm_ioreq")
        self._need_vm()
        self.hsm.clearing = True
        for vcpu in sorted(self._pending):
            self._complete(vcpu)
        self._pending.clear()

    # --- interrupts -------------------------------------------------------------------
    def inject_msi(self, address: int, data: int) -> None:
        self._need_vm()
        self.msis.append((address, data))
        self._on_loop(self._wake_msi_waiter)

    def _wake_msi_waiter(self) -> None:
        self._msi_event.set()

    def _on_loop(self, fn) -> None:
        """``fn()`` (a trio call) now on the loop thread, else queued for the loop (an
        interrupt sent from a data-plane thread)."""
        call_on(self._loop, fn)

    def set_irqline(self, gsi: int, op: int) -> None:
        self._need_vm()
        self.irqline_events.append(IrqLineEvent(gsi, op))
        if op == abi.GSI_SET_HIGH:
            self.irqlines[gsi] = 1
        elif op == abi.GSI_SET_LOW or op == abi.GSI_RAISING_PULSE:
            self.irqlines[gsi] = 0
        elif op == abi.GSI_FALLING_PULSE:
            self.irqlines[gsi] = 1
        else:
            raise HypervisorError(f"SET_IRQLINE: bad op {op}", errno.EINVAL)

    def remap_msi(self, source: str, handle: int) -> tuple[int, int] | None:
        """Deliver a remappable message through the remap table, as VT-d would."""
        entry = self.remap_table.get((source, handle))
        if entry is None:
            return None
        self.inject_msi(entry.address, entry.data)
        return entry.address, entry.data

    def interrupt_remapper(self) -> RemapperFactory:
        """Passthrough MSI goes through the remap table (sim_remap.py)."""

        def factory(source: MessageSource, count: int) -> SimRemapper:
            return SimRemapper(self, source, count)

        return factory

    @property
    def reaches_host_devices(self) -> bool:
        """A real device's interrupts and DMA cannot reach a simulated guest."""
        return False

    # --- fast paths -------------------------------------------------------------------
    @property
    def supports_eventfds(self) -> bool:
        return True

    def ioeventfd(
        self,
        fd: int,
        address: int,
        length: int,
        *,
        pio: bool,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        if length not in (1, 2, 4, 8) or address + length > 1 << 64:
            raise HypervisorError("IOEVENTFD: bad length or range", errno.EINVAL)
        reg = IoEventFdReg(fd, address, length, pio, datamatch)
        existing = self.hsm.find_ioeventfd(reg)
        if deassign:
            if existing is None:
                raise HypervisorError("IOEVENTFD: no such registration", errno.ENOENT)
            self.hsm.remove_ioeventfd(existing)
            return
        if existing is not None:
            raise HypervisorError("IOEVENTFD: already registered", errno.EEXIST)
        self.hsm.add_ioeventfd(reg)

    @property
    def ioeventfds(self) -> list[IoEventFdReg]:
        """The ioeventfd registrations the device model made, in order."""
        return list(self.hsm.ioeventfds)

    _ioeventfds = ioeventfds

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None:
        if deassign:
            reg = self._irqfds.pop(fd, None)
            if reg is None:
                raise HypervisorError("IRQFD: no such registration", errno.ENOENT)
            if reg.cancel:
                self._on_loop(reg.cancel.cancel)
            return
        if fd in self._irqfds:
            raise HypervisorError("IRQFD: already registered", errno.EEXIST)
        reg = _IrqFd(fd, address, data)
        self._irqfds[fd] = reg
        self._on_loop(lambda: self._start_irqfd_watch(reg))

    def _start_irqfd_watch(self, reg: _IrqFd) -> None:
        if self._irqfds.get(reg.fd) is not reg:
            return  # deassigned before the loop got here
        if self._nursery is not None:
            self._nursery.start_soon(self._watch_irqfd, reg)
        else:
            self._irqfd_queue.append(reg)

    def take_irqfd(self, address: int, data: int) -> int:
        """Stop turning the irqfd of MSI (address, data) into ``msis`` and return its fd.

        Whoever takes it reads the eventfd itself, as a guest vCPU on another CPU receives
        the interrupt without the sim's scripted guest: e.g. a benchmark's guest driver in
        another process. The registration stays (the device model still owns it).
        """
        for reg in self._irqfds.values():
            if reg.address == address and reg.data == data and not reg.taken:
                reg.taken = True
                if reg.cancel is not None:
                    reg.cancel.cancel()
                return reg.fd
        raise HypervisorError(f"IRQFD: none registered for MSI {address:#x}/{data:#x}",
                              errno.ENOENT)

    async def serve_backend(self) -> None:
        """Background work of the backend: the irqfd watchers."""
        self._loop = (threading.get_ident(), trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for reg in self._irqfd_queue:
                nursery.start_soon(self._watch_irqfd, reg)
            self._irqfd_queue.clear()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _watch_irqfd(self, reg: _IrqFd) -> None:
        with trio.CancelScope() as scope:
            reg.cancel = scope
            while self._irqfds.get(reg.fd) is reg and not reg.taken:
                await trio.lowlevel.wait_readable(reg.fd)
                try:
                    os.eventfd_read(reg.fd)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if self.state != "destroyed":
                    self.inject_msi(reg.address, reg.data)

    # --- passthrough ------------------------------------------------------------------
    def assign_pcidev(self, dev: PciDevAssignment) -> None:
        self._need_vm()
        self.assigned.append(dev)

    def deassign_pcidev(self, dev: PciDevAssignment) -> None:
        self._need_vm()
        self.assigned = [d for d in self.assigned if d.virt_bdf != dev.virt_bdf]

    def set_ptdev_intr(self, intx: PtdevIntx) -> None:
        self._need_vm()
        self.ptdev_intx.append(intx)

    def reset_ptdev_intr(self, intx: PtdevIntx) -> None:
        self._need_vm()
        self.ptdev_intx = [i for i in self.ptdev_intx if i.virt_bdf != intx.virt_bdf]

    # --- what the hypervisor does itself (sim_hv.py) ------------------------------------
    def create_vdev(self, vdev: VdevSpec) -> None:
        self.calls.append("create_vdev")
        self._need_vm()
        self.hv_side.create_vdev(vdev)

    def destroy_vdev(self, vdev: VdevSpec) -> None:
        self.calls.append("destroy_vdev")
        self._need_vm()
        self.hv_side.destroy_vdev(vdev)

    def assign_mmiodev(self, dev: MmioDevAssignment) -> None:
        self._need_vm()
        self.hv_side.assign_mmiodev(dev)

    def deassign_mmiodev(self, dev: MmioDevAssignment) -> None:
        self._need_vm()
        self.hv_side.deassign_mmiodev(dev)

    def intr_monitor(self, page: mmap.mmap) -> None:
        self._need_vm()
        self.hv_side.intr_monitor(page)

    def pm_get_cpu_state(self, cmd: int, size: int) -> bytes:
        self._need_vm()
        return self.hv_side.pm_get_cpu_state(cmd, size, self.vcpu_num)

    def close(self) -> None:
        if self.state not in ("none", "destroyed"):
            self.destroy_vm()

    # --- internals --------------------------------------------------------------------
    def _need_vm(self) -> None:
        if self.state in ("none", "destroyed"):
            raise HypervisorError("no VM on this handle", errno.EINVAL)

    def _set_state(self, vcpu: int, state: int) -> None:
        assert self.page is not None
        abi.SLOT_U32.pack_into(self.page, abi.slot_offset(vcpu) + abi.SLOT_PROCESSED_OFF, state)

    def _get_state(self, vcpu: int) -> int:
        assert self.page is not None
        return abi.SLOT_U32.unpack_from(self.page, abi.slot_offset(vcpu) + abi.SLOT_PROCESSED_OFF)[
            0
        ]

    def _complete(self, vcpu: int) -> None:
        # HSM: store-release processed = COMPLETE, then the hypercall wakes the vCPU.
        self._set_state(vcpu, abi.IOREQ_STATE_COMPLETE)
        if vcpu < len(self._vcpus):
            self._vcpus[vcpu].done.set()

    async def _post(self, vcpu: int, rtype: int, direction: int, address: int, size: int,
                    value: int) -> int:
        """The hypervisor and HSM halves of one access; returns the value the vCPU sees."""
        await self._running.wait()
        if self.state == "destroyed":
            raise SimVmGone("the VM is gone")
        own = self.hv_side.emulate(rtype, direction, address, size, value, self.memory)
        if own is not None:  # the hypervisor's own device or mapped memory: no exit
            await trio.lowlevel.checkpoint()
            return own & _MASK.get(size, 0xFFFF_FFFF_FFFF_FFFF)
        vc = self._vcpus[vcpu]
        if vc.busy or self._get_state(vcpu) != abi.IOREQ_STATE_FREE:
            raise RuntimeError(f"vCPU {vcpu} already has a request in flight")
        vc.busy = True
        try:
            return await self._post_locked(vcpu, vc, rtype, direction, address, size, value)
        finally:
            vc.busy = False

    async def _post_locked(self, vcpu: int, vc: _Vcpu, rtype: int, direction: int,
                           address: int, size: int, value: int) -> int:
        assert self.page is not None
        page = self.page
        off = abi.slot_offset(vcpu)
        page[off : off + abi.SLOT_PROCESSED_OFF] = bytes(abi.SLOT_PROCESSED_OFF)
        abi.SLOT_U32.pack_into(page, off + abi.SLOT_TYPE_OFF, rtype)
        if self.vm_flag & abi.GUEST_FLAG_IO_COMPLETION_POLLING:  # as ACRN marks the slot
            abi.SLOT_U32.pack_into(page, off + abi.SLOT_POLLING_OFF, 1)
        abi.SLOT_ADDR_REQ.pack_into(page, off + abi.SLOT_REQS_OFF, direction, 0, address, size)
        if rtype == abi.IOREQ_TYPE_MMIO:
            abi.SLOT_U64.pack_into(page, off + abi.SLOT_VALUE_OFF, value & _MASK.get(size, ~0))
        else:
            abi.SLOT_U32.pack_into(page, off + abi.SLOT_VALUE_OFF, value & 0xFFFF_FFFF)
        vc.done = trio.Event()
        self._set_state(vcpu, abi.IOREQ_STATE_PENDING)

        # ---- HSM dispatch (acrn_ioreq_dispatch) ----
        result = self._hsm_dispatch(vcpu, rtype, direction, address, size, value)
        if result is None:
            abi.SLOT_U32.pack_into(page, off + abi.SLOT_KERNEL_HANDLED_OFF, 0)
            self._set_state(vcpu, abi.IOREQ_STATE_PROCESSING)
            self._pending.add(vcpu)
            self._wake.set()
            await vc.done.wait()
            if self.state == "destroyed":
                raise SimVmGone("the VM was destroyed while the request was in flight")
            if self._get_state(vcpu) != abi.IOREQ_STATE_COMPLETE:
                raise RuntimeError("slot woken without COMPLETE")
        # ---- hypervisor post-work (dm_emulate_io_complete) ----
        if rtype == abi.IOREQ_TYPE_MMIO:
            got = abi.SLOT_U64.unpack_from(page, off + abi.SLOT_VALUE_OFF)[0]
        else:
            got = abi.SLOT_U32.unpack_from(page, off + abi.SLOT_VALUE_OFF)[0]
        self._set_state(vcpu, abi.IOREQ_STATE_FREE)
        return got & _MASK.get(size, 0xFFFF_FFFF_FFFF_FFFF)

    def _hsm_dispatch(self, vcpu: int, rtype: int, direction: int, address: int, size: int,
                      value: int) -> int | None:
        """Kernel-side handling. Returns a value if completed in the kernel, else None."""
        assert self.page is not None
        done = self.hsm.dispatch(self.page, abi.slot_offset(vcpu), rtype, direction, address,
                                 size, value)
        return 0 if done else None


class SimVcpu:
    """One guest vCPU: every call is one VM exit."""

    def __init__(self, sim: SimHypervisor, vcpu: int) -> None:
        self.sim = sim
        self.vcpu = vcpu

    async def pio_read(self, port: int, size: int) -> int:
        return await self.sim._post(self.vcpu, abi.IOREQ_TYPE_PORTIO, abi.IOREQ_DIR_READ, port,
                                    size, 0)

    async def pio_write(self, port: int, size: int, value: int) -> None:
        await self.sim._post(self.vcpu, abi.IOREQ_TYPE_PORTIO, abi.IOREQ_DIR_WRITE, port, size,
                             value & _MASK.get(size, 0xFFFF_FFFF))

    async def mmio_read(self, gpa: int, size: int) -> int:
        return await self.sim._post(self.vcpu, abi.IOREQ_TYPE_MMIO, abi.IOREQ_DIR_READ, gpa,
                                    size, 0)

    async def mmio_write(self, gpa: int, size: int, value: int) -> None:
        await self.sim._post(self.vcpu, abi.IOREQ_TYPE_MMIO, abi.IOREQ_DIR_WRITE, gpa, size,
                             value & _MASK.get(size, 0xFFFF_FFFF_FFFF_FFFF))

    @staticmethod
    def _cf8(bus: int, dev: int, func: int, reg: int) -> int:
        return (
            0x8000_0000
            | ((reg & 0xF00) << 16)
            | ((bus & 0xFF) << 16)
            | ((dev & 0x1F) << 11)
            | ((func & 0x7) << 8)
            | (reg & 0xFC)
        )

    async def pci_cfg_read(self, bus: int, dev: int, func: int, reg: int, size: int) -> int:
        await self.pio_write(PCI_CONFIG_ADDRESS, 4, self._cf8(bus, dev, func, reg))
        return await self.pio_read(PCI_CONFIG_DATA + (reg & 3), size)

    async def pci_cfg_write(self, bus: int, dev: int, func: int, reg: int, size: int,
                            value: int) -> None:
        await self.pio_write(PCI_CONFIG_ADDRESS, 4, self._cf8(bus, dev, func, reg))
        await self.pio_write(PCI_CONFIG_DATA + (reg & 3), size, value)
