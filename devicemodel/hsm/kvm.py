"""The KVM backend: real guest code on /dev/kvm, with ACRN's request contract.

One thread per vCPU sits in KVM_RUN.  A KVM_EXIT_IO or KVM_EXIT_MMIO becomes a request
in that vCPU's slot of the page handed to ``create_vm``, with the transitions ACRN's
hypervisor and HSM make (acrn-facts §1.5): the slot is written and marked PENDING, the
HSM half (``HsmDispatcher``: CF8/CFC → PCICFG, ioeventfds, clearing) either completes it
or marks it PROCESSING with kernel_handled 0 and wakes ``attach_ioreq_client``; the vCPU
thread sleeps until NOTIFY_REQUEST_FINISH marks it COMPLETE, copies the value back into
``kvm_run`` and frees the slot.  String I/O is one request per element, as ACRN posts it.

Interrupts go to KVM's in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT: INTx through
KVM_IRQ_LINE (with ACRN's pin-level semantics, see ``set_irqline``), MSI through
KVM_SIGNAL_MSI, irqfd through KVM_IRQFD on an MSI routing entry, ioeventfd through
KVM_IOEVENTFD.  A vCPU that cannot go on (triple fault, failed entry, emulation error,
every vCPU halted with interrupts off) stops the VM: ``attach_ioreq_client`` returns
False, which makes vm.py power off; ``exit_reason`` says why.

ctypes carries every ioctl: it releases the GIL around KVM_RUN, and several arguments
are too large for ``fcntl.ioctl`` (guests.md).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import signal
import struct
import threading
import time

import trio

from . import abi
from . import kvm_abi as k
from .base import Hypervisor, HypervisorError, VcpuRegs, VmInfo
from .hsm_dispatch import HsmDispatcher, IoEventFdReg

log = logging.getLogger(__name__)

KVM_DEVICE = "/dev/kvm"
#: sent to a vCPU thread to get it out of KVM_RUN (with kvm_run.immediate_exit set first)
KICK_SIGNAL = signal.SIGRTMIN + 4
#: how often the halt watchdog looks for a VM whose every vCPU halted with IF=0
HALT_CHECK_INTERVAL = 1.0
#: how long RESET_VM / SET_VCPU_REGS wait for every vCPU to leave KVM_RUN
PARK_TIMEOUT = 5.0
#: ACRN's vIOAPIC pin count (acrn-facts §1.3): the GSIs SET_IRQLINE accepts
VIOAPIC_PINS = 48
#: GSIs 0-15 are the ISA IRQs (PIC and IOAPIC); PCI INTx lines start at 16
LEGACY_GSIS = 16
#: an IOAPIC RTE as reset leaves it (masked, everything else 0): never programmed
_RTE_POWER_ON = 1 << 16
#: first GSI given to irqfd MSI routes (0..23 are the PIC/IOAPIC pins)
FIRST_MSI_GSI = k.KVM_IOAPIC_NUM_PINS

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl_fn = _libc.ioctl
_ioctl_fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl_fn.restype = ctypes.c_int

_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
_LE = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
       8: struct.Struct("<Q")}
_U32 = abi.SLOT_U32
_U64 = abi.SLOT_U64
_PROCESSED = abi.SLOT_PROCESSED_OFF
_VALUE = abi.SLOT_VALUE_OFF
_HEADER_ZERO = bytes(abi.SLOT_PROCESSED_OFF)
_FREE = abi.IOREQ_STATE_FREE
_COMPLETE = abi.IOREQ_STATE_COMPLETE
_PROCESSING = abi.IOREQ_STATE_PROCESSING
_PENDING = abi.IOREQ_STATE_PENDING
_PIO = abi.IOREQ_TYPE_PORTIO
_MMIO = abi.IOREQ_TYPE_MMIO
_READ = abi.IOREQ_DIR_READ
_WRITE = abi.IOREQ_DIR_WRITE

# ACRN's SET_VCPU_REGS derives every data segment from CR0.PE (hypervisor vcpu.c).
_PM_DATA_AR, _PM_LIMIT = 0xC093, 0xFFFF_FFFF
_RM_DATA_AR, _RM_LIMIT = 0x0093, 0xFFFF
_TR_AR, _LDTR_AR = 0x008B, 0x0082
#: GSI_* op → the pin levels it drives, in order
_IRQLINE_LEVELS = {
    abi.GSI_SET_HIGH: (1,),
    abi.GSI_SET_LOW: (0,),
    abi.GSI_RAISING_PULSE: (1, 0),
    abi.GSI_FALLING_PULSE: (0, 1),
}


def ioctl(fd: int, request: int, arg: int | ctypes._CData | None = None, what: str = "") -> int:
    """ioctl through ctypes: ``arg`` is an integer passed by value or a structure by address."""
    if arg is None or isinstance(arg, int):
        ret = _ioctl_fn(fd, request, arg)
    else:
        ret = _ioctl_fn(fd, request, ctypes.addressof(arg))
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
        version = _ioctl_fn(fd, k.KVM_GET_API_VERSION, None)
        if version != k.KVM_API_VERSION:
            return f"{device}: KVM API version {version}, need {k.KVM_API_VERSION}"
        for cap, name in ((k.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"),
                          (k.KVM_CAP_SIGNAL_MSI, "SIGNAL_MSI")):
            if _ioctl_fn(fd, k.KVM_CHECK_EXTENSION, cap) <= 0:
                return f"{device}: KVM lacks KVM_CAP_{name}"
        return None
    finally:
        os.close(fd)


def _mmap_address(mm: mmap.mmap) -> int:
    """The user virtual address of a mapping (the export is released at once)."""
    ref = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(ref)
    finally:
        del ref


def _kick_noop(signum: int, frame: object) -> None:
    """Does nothing: the signal only exists to interrupt KVM_RUN."""


def _install_kick_handler() -> bool:
    current = signal.getsignal(KICK_SIGNAL)
    if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _kick_noop)
    return True


def _segment(seg: k.KvmSegment, base: int, limit: int, selector: int, ar: int) -> None:
    """Fill a kvm_segment from a VMX access-rights word, as ACRN's registers carry it."""
    seg.base = base
    seg.limit = limit & 0xFFFF_FFFF
    seg.selector = selector & 0xFFFF
    seg.type = ar & 0xF
    seg.s = (ar >> 4) & 1
    seg.dpl = (ar >> 5) & 3
    seg.present = (ar >> 7) & 1
    seg.avl = (ar >> 12) & 1
    seg.l = (ar >> 13) & 1
    seg.db = (ar >> 14) & 1
    seg.g = (ar >> 15) & 1
    seg.unusable = (ar >> 16) & 1


class _VcpuState:
    """Power-on state of a vCPU, restored by RESET_VM."""

    def __init__(self, fd: int) -> None:
        self.regs = k.KvmRegs()
        self.sregs = k.KvmSregs()
        self.lapic = k.KvmLapicState()
        self.mp = k.KvmMpState()
        ioctl(fd, k.KVM_GET_REGS, self.regs, "KVM_GET_REGS")
        ioctl(fd, k.KVM_GET_SREGS, self.sregs, "KVM_GET_SREGS")
        ioctl(fd, k.KVM_GET_LAPIC, self.lapic, "KVM_GET_LAPIC")
        ioctl(fd, k.KVM_GET_MP_STATE, self.mp, "KVM_GET_MP_STATE")

    def restore(self, fd: int) -> None:
        ioctl(fd, k.KVM_SET_SREGS, self.sregs, "KVM_SET_SREGS")
        ioctl(fd, k.KVM_SET_REGS, self.regs, "KVM_SET_REGS")
        ioctl(fd, k.KVM_SET_LAPIC, self.lapic, "KVM_SET_LAPIC")
        ioctl(fd, k.KVM_SET_MP_STATE, self.mp, "KVM_SET_MP_STATE")


class _Vcpu:
    """One vCPU: its fd, its kvm_run page, its thread and its request handshake."""

    def __init__(self, index: int, fd: int, run: mmap.mmap) -> None:
        self.index = index
        self.fd = fd
        self.run = run
        self.view = memoryview(run)
        self.off = abi.slot_offset(index)
        self.thread: threading.Thread | None = None
        self.alive = False
        #: outside KVM_RUN and not holding a request: safe to change its registers
        self.parked = True
        #: the last exit needs a KVM_RUN (immediate_exit) to finish the instruction
        self.settle = False
        #: a request is waiting for NOTIFY_REQUEST_FINISH (set by the vCPU, cleared by DM)
        self.in_flight = False
        self.done = threading.Lock()
        self.done.acquire()
        self.exits = 0
        self.probe = False
        self.probe_dead: bool | None = None
        self.initial: _VcpuState | None = None

    def close(self) -> None:
        self.view.release()
        try:
            self.run.close()
        except BufferError:
            pass
        os.close(self.fd)


class KvmHypervisor(Hypervisor):
    """One VM on /dev/kvm. ``vcpus=None`` takes the count from CREATE_VM's cpu_affinity."""

    name = "kvm"

    def __init__(self, vcpus: int | None = None, *, device: str = KVM_DEVICE) -> None:
        if vcpus is not None and not 1 <= vcpus <= abi.ACRN_IO_REQUEST_MAX:
            raise ValueError(f"vcpus must be 1..{abi.ACRN_IO_REQUEST_MAX}")
        self._want_vcpus = vcpus
        self._device = device
        self.vcpu_num = 0
        self.vm_name: str | None = None
        self.state = "none"  # none, created, running, paused, destroyed
        #: why the VM stopped by itself (None while it has not)
        self.exit_reason: str | None = None
        self._kvm_fd = -1
        self._vm_fd = -1
        self._efd = -1
        self._page: memoryview | None = None
        self._vcpus: list[_Vcpu] = []
        self._pending: list[bool] = []
        self._slots: list[tuple[int, int, mmap.mmap]] = []
        self._dispatch = HsmDispatcher()
        self._cond = threading.Condition()
        self._running = False
        self._stopping = False
        self._threads_started = False
        self._client = False
        self._client_gone = False
        self._can_kick = False
        self._irqfd_gsi: dict[int, tuple[int, int, int]] = {}  # fd → (gsi, address, data)
        #: registration → its KVM_IOEVENTFD argument (None: matched in the HSM half only)
        self._ioeventfds: dict[IoEventFdReg, k.KvmIoeventfd | None] = {}
        self._chips: list[k.KvmIrqchip] = []
        self._pit: k.KvmPitState2 | None = None
        self._undeliverable: set[int] = set()

    # --- VM lifecycle -----------------------------------------------------------------
    def create_vm(
        self, name: str, ioreq_page: mmap.mmap, *, vm_flag: int = 0, cpu_affinity: int = 0
    ) -> VmInfo:
        if self.state not in ("none", "destroyed"):
            raise HypervisorError("CREATE_VM: this handle already holds a VM", errno.EEXIST)
        if len(name.encode()) >= abi.VM_NAME_FIELD_LEN:
            raise HypervisorError(f"CREATE_VM: VM name {name!r} must be shorter than 16 bytes")
        n = self._want_vcpus or (bin(cpu_affinity).count("1") if cpu_affinity else 1)
        if not 1 <= n <= abi.ACRN_IO_REQUEST_MAX:
            raise HypervisorError("CREATE_VM: too many vCPUs", errno.EINVAL)
        if len(ioreq_page) < abi.IOREQ_PAGE_SIZE:
            raise HypervisorError("CREATE_VM: the request buffer must be 4 KiB", errno.EINVAL)
        try:
            self._create(n, ioreq_page)
        except BaseException:
            self._teardown()
            raise
        self.vcpu_num = n
        self.vm_name = name
        self.state = "created"
        self.exit_reason = None
        log.debug("KVM VM %s created with %d vCPU(s)", name, n)
        return VmInfo(vmid=0, vcpu_num=n)

    def _create(self, n: int, ioreq_page: mmap.mmap) -> None:
        try:
            self._kvm_fd = os.open(self._device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise HypervisorError(f"CREATE_VM: {self._device}: {e.strerror}", e.errno) from e
        kfd = self._kvm_fd
        version = ioctl(kfd, k.KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")
        if version != k.KVM_API_VERSION:
            raise HypervisorError(f"CREATE_VM: KVM API version {version} unsupported")
        max_vcpus = _ioctl_fn(kfd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_MAX_VCPUS)
        if max_vcpus > 0 and n > max_vcpus:
            raise HypervisorError(f"CREATE_VM: KVM allows {max_vcpus} vCPUs", errno.EINVAL)
        self._vm_fd = ioctl(kfd, k.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        vfd = self._vm_fd
        ioctl(vfd, k.KVM_SET_TSS_ADDR, k.TSS_ADDR, "KVM_SET_TSS_ADDR")
        ioctl(vfd, k.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(k.IDENTITY_MAP_ADDR),
              "KVM_SET_IDENTITY_MAP_ADDR")
        ioctl(vfd, k.KVM_CREATE_IRQCHIP, None, "KVM_CREATE_IRQCHIP")
        self._set_routing()  # before the PIT: its GSI 0 must reach IOAPIC pin 2 (the MADT)
        pit = k.KvmPitConfig()
        pit.flags = k.KVM_PIT_SPEAKER_DUMMY
        ioctl(vfd, k.KVM_CREATE_PIT2, pit, "KVM_CREATE_PIT2")
        cpuid = self._supported_cpuid()
        run_size = ioctl(kfd, k.KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")
        for i in range(n):
            fd = ioctl(vfd, k.KVM_CREATE_VCPU, i, "KVM_CREATE_VCPU")
            try:
                run = mmap.mmap(fd, run_size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
            vc = _Vcpu(i, fd, run)
            self._vcpus.append(vc)
            ioctl(fd, k.KVM_SET_CPUID2, self._vcpu_cpuid(cpuid, i, n), "KVM_SET_CPUID2")
            vc.initial = _VcpuState(fd)
        for chip_id in (k.KVM_IRQCHIP_PIC_MASTER, k.KVM_IRQCHIP_PIC_SLAVE,
                        k.KVM_IRQCHIP_IOAPIC):
            chip = k.KvmIrqchip()
            chip.chip_id = chip_id
            ioctl(vfd, k.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
            self._chips.append(chip)
        self._pit = k.KvmPitState2()
        ioctl(vfd, k.KVM_GET_PIT2, self._pit, "KVM_GET_PIT2")
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._page = memoryview(ioreq_page)
        for v in range(abi.ACRN_IO_REQUEST_MAX):
            _U32.pack_into(self._page, abi.slot_offset(v) + _PROCESSED, _FREE)
        self._pending = [False] * n
        self._dispatch = HsmDispatcher()
        self._can_kick = _install_kick_handler()
        if not self._can_kick:
            log.warning("cannot install the vCPU kick signal handler outside the main "
                        "thread; halted vCPUs will only stop at the next exit")
        self._client = False
        self._client_gone = False
        self._running = False
        self._stopping = False
        self._threads_started = False

    def _supported_cpuid(self) -> ctypes.Structure:
        nent = 128
        while True:
            buf = k.kvm_cpuid2(nent)
            ret = _ioctl_fn(self._kvm_fd, k.KVM_GET_SUPPORTED_CPUID, ctypes.addressof(buf))
            if ret >= 0:
                return buf
            err = ctypes.get_errno()
            if err != errno.E2BIG or nent >= 4096:
                raise HypervisorError(f"KVM_GET_SUPPORTED_CPUID: {os.strerror(err)}", err)
            nent *= 2

    @staticmethod
    def _vcpu_cpuid(supported: ctypes.Structure, index: int, count: int) -> ctypes.Structure:
        """The supported CPUID with this vCPU's APIC id and the hypervisor bit filled in."""
        nent = supported.nent
        buf = k.kvm_cpuid2(nent)
        ctypes.memmove(buf.entries, supported.entries, nent * ctypes.sizeof(k.KvmCpuidEntry2))
        for i in range(nent):
            e = buf.entries[i]
            if e.function == 1:
                e.ebx = (e.ebx & 0x0000_FFFF) | (index << 24) | (min(count, 255) << 16)
                e.ecx |= 1 << 31
            elif e.function in (0xB, 0x1F):
                e.edx = index
        return buf

    def destroy_vm(self) -> None:
        if self.state in ("none", "destroyed"):
            return
        self._stop_threads()
        self._client_gone = True
        self._wake_attach()
        self._teardown()
        self.state = "destroyed"

    def _teardown(self) -> None:
        for vc in self._vcpus:
            vc.close()
        self._vcpus = []
        self._pending = []
        for fd_name in ("_efd", "_vm_fd", "_kvm_fd"):
            fd = getattr(self, fd_name)
            if fd >= 0:
                if fd_name == "_efd":
                    try:
                        trio.lowlevel.notify_closing(fd)
                    except RuntimeError:
                        pass  # not inside trio
                os.close(fd)
                setattr(self, fd_name, -1)
        self._slots = []
        self._irqfd_gsi.clear()
        self._ioeventfds.clear()
        self._chips = []
        if self._page is not None:
            self._page.release()
            self._page = None

    def start_vm(self) -> None:
        self._need_vm()
        with self._cond:
            self._dispatch.clearing = False
            self._running = True
            self.state = "running"
            self._cond.notify_all()

    def pause_vm(self) -> None:
        self._need_vm()
        with self._cond:
            self._running = False
            if self.state == "running":
                self.state = "paused"
            self._kick_all()

    def reset_vm(self) -> None:
        """RESET_VM: every vCPU back to its power-on state, irqchips and PIT too, all slots FREE.

        Like ACRN it expects a paused VM; requests still in flight must have been cleared
        with CLEAR_VM_IOREQ first (else the vCPU holding one cannot be reset)."""
        self._need_vm()
        self.pause_vm()
        self._wait_parked("RESET_VM")
        for vc in self._vcpus:
            assert vc.initial is not None
            vc.initial.restore(vc.fd)
            vc.settle = False
        for chip in self._chips:
            ioctl(self._vm_fd, k.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")
        if self._pit is not None:
            ioctl(self._vm_fd, k.KVM_SET_PIT2, self._pit, "KVM_SET_PIT2")
        assert self._page is not None
        for v in range(abi.ACRN_IO_REQUEST_MAX):
            _U32.pack_into(self._page, abi.slot_offset(v) + _PROCESSED, _FREE)
        self._pending = [False] * self.vcpu_num
        self._dispatch.reset()

    def set_vcpu_regs(self, vcpu_id: int, regs: VcpuRegs) -> None:
        self._need_vm()
        if not 0 <= vcpu_id < self.vcpu_num:
            raise HypervisorError(f"SET_VCPU_REGS: no vCPU {vcpu_id}", errno.EINVAL)
        self._wait_parked("SET_VCPU_REGS")
        vc = self._vcpus[vcpu_id]
        sregs = k.KvmSregs()
        ioctl(vc.fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        if regs.cr0 & 1:
            data_ar, limit = _PM_DATA_AR, _PM_LIMIT
        else:
            data_ar, limit = _RM_DATA_AR, _RM_LIMIT
        _segment(sregs.cs, regs.cs_base, regs.cs_limit, regs.cs_sel, regs.cs_ar)
        for seg, sel in ((sregs.ds, regs.ds_sel), (sregs.es, regs.es_sel),
                         (sregs.fs, regs.fs_sel), (sregs.gs, regs.gs_sel),
                         (sregs.ss, regs.ss_sel)):
            _segment(seg, 0, limit, sel, data_ar)
        _segment(sregs.tr, 0, 0xFFFF, regs.tr_sel, _TR_AR)
        _segment(sregs.ldt, 0, 0xFFFF, regs.ldt_sel, _LDTR_AR)
        sregs.gdt.base, sregs.gdt.limit = regs.gdt_base, regs.gdt_limit
        sregs.idt.base, sregs.idt.limit = regs.idt_base, regs.idt_limit
        sregs.cr0, sregs.cr3, sregs.cr4 = regs.cr0, regs.cr3, regs.cr4
        sregs.efer = regs.ia32_efer
        ioctl(vc.fd, k.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
        kregs = k.KvmRegs()
        for name, value in regs.gprs.items():
            if name not in k.KVM_REGS_NAMES or name in ("rip", "rflags"):
                raise HypervisorError(f"SET_VCPU_REGS: unknown register {name!r}",
                                      errno.EINVAL)
            setattr(kregs, name, value)
        kregs.rsp = regs.gprs.get("rsp", regs.rsp)
        kregs.rip = regs.rip
        kregs.rflags = regs.rflags | 0x2
        ioctl(vc.fd, k.KVM_SET_REGS, kregs, "KVM_SET_REGS")
        mp = k.KvmMpState()
        mp.mp_state = k.KVM_MP_STATE_RUNNABLE
        ioctl(vc.fd, k.KVM_SET_MP_STATE, mp, "KVM_SET_MP_STATE")
        vc.settle = False

    # --- memory -----------------------------------------------------------------------
    def set_memseg(self, gpa: int, backing: mmap.mmap, attr: int) -> None:
        self._need_vm()
        size = len(backing)
        if gpa % mmap.PAGESIZE or size % mmap.PAGESIZE or not size:
            raise HypervisorError(f"SET_MEMSEG: {gpa:#x}+{size:#x} is not page aligned",
                                  errno.EINVAL)
        for g, s, _ in self._slots:
            if gpa < g + s and g < gpa + size:
                raise HypervisorError(f"SET_MEMSEG: {gpa:#x}+{size:#x} overlaps {g:#x}",
                                      errno.EEXIST)
        region = k.KvmUserspaceMemoryRegion()
        region.slot = len(self._slots)
        region.flags = 0 if attr & abi.MEM_ACCESS_WRITE else k.KVM_MEM_READONLY
        region.guest_phys_addr = gpa
        region.memory_size = size
        try:
            region.userspace_addr = _mmap_address(backing)
        except TypeError as e:
            raise HypervisorError("SET_MEMSEG: guest RAM must be a writable mapping",
                                  errno.EINVAL) from e
        ioctl(self._vm_fd, k.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        self._slots.append((gpa, size, backing))

    # --- requests ---------------------------------------------------------------------
    def create_ioreq_client(self) -> None:
        self._need_vm()
        if self._client:
            raise HypervisorError("CREATE_IOREQ_CLIENT: client exists", errno.EEXIST)
        self._client = True
        if self.exit_reason is None:
            self._client_gone = False

    async def attach_ioreq_client(self) -> bool:
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

    def destroy_ioreq_client(self) -> None:
        self._client = False
        self._client_gone = True
        self._wake_attach()

    def notify_request_finish(self, vcpu: int) -> None:
        self._need_vm()
        if not 0 <= vcpu < self.vcpu_num:
            raise HypervisorError(f"NOTIFY_REQUEST_FINISH: vcpu {vcpu} invalid", errno.EINVAL)
        self._pending[vcpu] = False
        self._complete(self._vcpus[vcpu])

    def clear_vm_ioreq(self) -> None:
        self._need_vm()
        self._dispatch.clearing = True
        for vc in self._vcpus:
            if self._pending[vc.index]:
                self._pending[vc.index] = False
                self._complete(vc)

    def _complete(self, vc: _Vcpu) -> None:
        # HSM: store-release processed = COMPLETE, then the hypercall wakes the vCPU.
        assert self._page is not None
        _U32.pack_into(self._page, vc.off + _PROCESSED, _COMPLETE)
        if vc.in_flight:
            vc.in_flight = False
            vc.done.release()

    def _wake_attach(self) -> None:
        if self._efd >= 0:
            try:
                os.eventfd_write(self._efd, 1)
            except OSError:
                pass

    # --- interrupts -------------------------------------------------------------------
    def inject_msi(self, address: int, data: int) -> None:
        self._need_vm()
        msi = k.KvmMsi()
        msi.address_lo = address & 0xFFFF_FFFF
        msi.address_hi = address >> 32
        msi.data = data & 0xFFFF_FFFF
        ioctl(self._vm_fd, k.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    def set_irqline(self, gsi: int, op: int) -> None:
        """Drive a GSI's pin level as ACRN's vIOAPIC sees it.

        ACRN delivers by the pin level and the guest's RTE polarity (an active-low pin is
        asserted by GSI_SET_LOW); KVM's KVM_IRQ_LINE takes the asserted state instead, so
        the level is inverted for a pin the guest programmed active-low."""
        self._need_vm()
        levels = _IRQLINE_LEVELS.get(op)
        if levels is None:
            raise HypervisorError(f"SET_IRQLINE: bad op {op}", errno.EINVAL)
        if not 0 <= gsi < VIOAPIC_PINS:
            raise HypervisorError(f"SET_IRQLINE: GSI {gsi} out of range", errno.EINVAL)
        if gsi >= k.KVM_IOAPIC_NUM_PINS:
            # ACRN's vIOAPIC has 48 pins, KVM's 24: such a line cannot reach the guest
            if gsi not in self._undeliverable:
                self._undeliverable.add(gsi)
                log.warning("GSI %d: KVM's IOAPIC has %d pins; this INTx line is dropped",
                            gsi, k.KVM_IOAPIC_NUM_PINS)
            return
        invert = 1 if self._active_low(gsi) else 0
        line = k.KvmIrqLevel()
        line.irq = gsi
        for level in levels:
            line.level = level ^ invert
            ioctl(self._vm_fd, k.KVM_IRQ_LINE, line, "KVM_IRQ_LINE")

    def _active_low(self, gsi: int) -> bool:
        chip = k.KvmIrqchip()
        chip.chip_id = k.KVM_IRQCHIP_IOAPIC
        ioctl(self._vm_fd, k.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        pin = 2 if gsi == 0 else gsi  # see _set_routing
        (rte,) = struct.unpack_from("<Q", chip.chip, k.IOAPIC_REDIRTBL_OFF + 8 * pin)
        if rte == _RTE_POWER_ON:
            # not programmed yet: take the polarity the ACPI tables declare (ISA lines high,
            # _PRT's PCI GSIs low), or an idle PCI line would sit asserted in KVM's IRR
            # and fire as soon as the guest unmasks the pin
            return gsi >= LEGACY_GSIS
        return bool(rte & k.IOAPIC_RTE_POLARITY_LOW)

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
        """KVM_IOEVENTFD for exact-size writes; narrower writes, which KVM would hand to
        user space, match in the HSM half as ACRN's ``len >= size`` rule wants."""
        self._need_vm()
        if length not in (1, 2, 4, 8) or address + length > 1 << 64 or address < 0:
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
            kreg.datamatch = datamatch & _MASK[length]
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
        self._need_vm()
        kirq = k.KvmIrqfd()
        kirq.fd = fd
        if deassign:
            entry = self._irqfd_gsi.pop(fd, None)
            if entry is None:
                raise HypervisorError("IRQFD: no such registration", errno.ENOENT)
            kirq.gsi = entry[0]
            kirq.flags = k.KVM_IRQFD_FLAG_DEASSIGN
            ioctl(self._vm_fd, k.KVM_IRQFD, kirq, "KVM_IRQFD")
            self._set_routing()
            return
        if fd in self._irqfd_gsi:
            raise HypervisorError("IRQFD: already registered", errno.EEXIST)
        used = {g for g, _, _ in self._irqfd_gsi.values()}
        gsi = next(g for g in range(FIRST_MSI_GSI, FIRST_MSI_GSI + 4096) if g not in used)
        self._irqfd_gsi[fd] = (gsi, address, data)
        try:
            self._set_routing()
            kirq.gsi = gsi
            ioctl(self._vm_fd, k.KVM_IRQFD, kirq, "KVM_IRQFD")
        except HypervisorError:
            del self._irqfd_gsi[fd]
            self._set_routing()
            raise

    def _set_routing(self) -> None:
        """KVM_SET_GSI_ROUTING replaces the whole table: the PIC/IOAPIC routes plus one MSI
        route per irqfd.

        KVM's default table would send GSI 0 (where the in-kernel PIT raises ISA IRQ0) to
        IOAPIC pin 0, but the MADT, like acrn-dm's and QEMU's, overrides IRQ0 to GSI 2:
        so GSI 0 goes to PIC pin 0 and IOAPIC pin 2, as QEMU routes it. GSI 2 stays IOAPIC
        pin 2 (no PIC cascade pin), so SET_IRQLINE still drives pin n for every n but 0."""
        entries: list[tuple[int, int, int, int, int]] = []
        for gsi in range(k.KVM_IOAPIC_NUM_PINS):
            if gsi < 16 and gsi != 2:
                chip = k.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else k.KVM_IRQCHIP_PIC_SLAVE
                entries.append((gsi, k.KVM_IRQ_ROUTING_IRQCHIP, chip, gsi % 8, 0))
            pin = 2 if gsi == 0 else gsi
            entries.append((gsi, k.KVM_IRQ_ROUTING_IRQCHIP, k.KVM_IRQCHIP_IOAPIC, pin, 0))
        for gsi, address, data in self._irqfd_gsi.values():
            entries.append((gsi, k.KVM_IRQ_ROUTING_MSI, address, data, 0))
        table = k.kvm_irq_routing(len(entries))
        for i, (gsi, kind, a, b, _) in enumerate(entries):
            e = table.entries[i]
            e.gsi, e.type = gsi, kind
            if kind == k.KVM_IRQ_ROUTING_IRQCHIP:
                e.u.irqchip.irqchip, e.u.irqchip.pin = a, b
            else:
                e.u.msi.address_lo = a & 0xFFFF_FFFF
                e.u.msi.address_hi = a >> 32
                e.u.msi.data = b & 0xFFFF_FFFF
        ioctl(self._vm_fd, k.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    # --- vCPU threads -----------------------------------------------------------------
    async def serve_backend(self) -> None:
        """Runs the vCPU threads (and the halt watchdog) until cancelled; then stops and
        joins them, so no thread outlives the VM's nursery."""
        self._need_vm()
        self._start_threads()
        try:
            await self._watch_halts()
        finally:
            self._stop_threads()

    def _start_threads(self) -> None:
        if self._threads_started:
            return
        self._threads_started = True
        for vc in self._vcpus:
            vc.alive = True
            vc.parked = False  # until the thread itself parks (at once if not running)
            vc.thread = threading.Thread(target=self._vcpu_main, args=(vc,),
                                         name=f"{self.vm_name}-vcpu{vc.index}", daemon=True)
            vc.thread.start()

    def _stop_threads(self) -> None:
        with self._cond:
            self._stopping = True
            self._running = False
            self._cond.notify_all()
            self._kick_all()
        for vc in self._vcpus:
            if vc.in_flight:
                vc.in_flight = False
                vc.done.release()
        for vc in self._vcpus:
            if vc.thread is not None:
                vc.thread.join(timeout=10)
                if vc.thread.is_alive():
                    log.error("vCPU %d thread did not stop", vc.index)
                else:
                    vc.thread = None

    def _kick_all(self) -> None:
        """Get every vCPU out of KVM_RUN (caller holds ``_cond``)."""
        for vc in self._vcpus:
            self._kick(vc)

    def _kick(self, vc: _Vcpu) -> None:
        vc.view[k.RUN_IMMEDIATE_EXIT_OFF] = 1
        thread = vc.thread
        if self._can_kick and vc.alive and thread is not None and thread.ident is not None:
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def _wait_parked(self, what: str) -> None:
        deadline = time.monotonic() + PARK_TIMEOUT
        with self._cond:
            while not all(vc.parked or not vc.alive for vc in self._vcpus):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HypervisorError(f"{what}: a vCPU is still running or holds a "
                                          "request (pause and clear the VM first)", errno.EBUSY)
                self._kick_all()
                self._cond.wait(min(left, 0.05))

    def _vcpu_main(self, vc: _Vcpu) -> None:
        try:
            self._vcpu_loop(vc)
        except Exception as e:  # a bug here must stop the VM, not hang it
            log.exception("vCPU %d thread failed", vc.index)
            self._fatal(f"vCPU {vc.index}: internal error: {e!r}")
        finally:
            with self._cond:
                vc.alive = False
                vc.parked = True
                self._cond.notify_all()

    def _vcpu_loop(self, vc: _Vcpu) -> None:
        run, fd = vc.view, vc.fd
        kvm_run = _ioctl_fn
        while True:
            if not self._running:
                if vc.settle:  # finish the last I/O instruction so the state is whole
                    run[k.RUN_IMMEDIATE_EXIT_OFF] = 1
                    kvm_run(fd, k.KVM_RUN, None)
                    run[k.RUN_IMMEDIATE_EXIT_OFF] = 0
                    vc.settle = False
                with self._cond:
                    vc.parked = True
                    self._cond.notify_all()
                    while not self._running and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        return
                    vc.parked = False
                continue
            ret = kvm_run(fd, k.KVM_RUN, None)
            vc.settle = False
            if ret < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    # EINTR: kicked; EAGAIN: an AP just left wait-for-SIPI (call again)
                    run[k.RUN_IMMEDIATE_EXIT_OFF] = 0
                    if vc.probe:
                        self._probe(vc)
                    continue
                self._fatal(f"vCPU {vc.index}: KVM_RUN failed: {os.strerror(err)}")
                continue
            vc.exits += 1
            (reason,) = k.RUN_U32.unpack_from(run, k.RUN_EXIT_REASON_OFF)
            if reason == k.KVM_EXIT_IO:
                vc.settle = True
                self._exit_io(vc)
            elif reason == k.KVM_EXIT_MMIO:
                vc.settle = True
                self._exit_mmio(vc)
            elif reason in (k.KVM_EXIT_INTR, k.KVM_EXIT_IRQ_WINDOW_OPEN):
                continue
            elif reason == k.KVM_EXIT_HLT:
                if not run[k.RUN_IF_FLAG_OFF]:
                    self._fatal(f"vCPU {vc.index} halted with interrupts disabled")
            else:
                self._fatal(self._describe_exit(vc, reason))

    def _describe_exit(self, vc: _Vcpu, reason: int) -> str:
        run = vc.view
        where = ""
        try:
            regs = k.KvmRegs()
            ioctl(vc.fd, k.KVM_GET_REGS, regs, "KVM_GET_REGS")
            where = f" at rip {regs.rip:#x}"
        except HypervisorError:
            pass
        if reason == k.KVM_EXIT_SHUTDOWN:
            return f"vCPU {vc.index}: shutdown (triple fault){where}"
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            (hw,) = k.RUN_U64.unpack_from(run, k.RUN_EXIT_OFF)
            return f"vCPU {vc.index}: VM entry failed, hardware reason {hw:#x}{where}"
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            sub, ndata = k.RUN_INTERNAL.unpack_from(run, k.RUN_EXIT_OFF)
            ndata = min(ndata, k.RUN_INTERNAL_NDATA_MAX)
            data = [k.RUN_U64.unpack_from(run, k.RUN_INTERNAL_DATA_OFF + 8 * i)[0]
                    for i in range(ndata)]
            return (f"vCPU {vc.index}: KVM internal error, suberror {sub}, data "
                    f"{[hex(d) for d in data]}{where}")
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            (kind,) = k.RUN_U32.unpack_from(run, k.RUN_EXIT_OFF)
            names = {k.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", k.KVM_SYSTEM_EVENT_RESET: "reset",
                     k.KVM_SYSTEM_EVENT_CRASH: "crash"}
            return f"vCPU {vc.index}: system event {names.get(kind, kind)}{where}"
        return f"vCPU {vc.index}: unexpected KVM exit {reason}{where}"

    def _fatal(self, reason: str) -> None:
        """The VM cannot go on: stop every vCPU and make attach return False."""
        if self.exit_reason is None:
            self.exit_reason = reason
            log.error("VM %s stops: %s", self.vm_name, reason)
        with self._cond:
            self._running = False
            self._kick_all()
        self._client_gone = True
        self._wake_attach()

    # --- the exit → slot → completion path (vCPU thread) ------------------------------
    def _exit_io(self, vc: _Vcpu) -> None:
        run = vc.view
        direction, size, port, count, data_off = k.RUN_IO.unpack_from(run, k.RUN_EXIT_OFF)
        fmt = _LE.get(size)
        if fmt is None:
            self._fatal(f"vCPU {vc.index}: port access of size {size}")
            return
        if direction == k.KVM_EXIT_IO_OUT:
            for i in range(count):
                (value,) = fmt.unpack_from(run, data_off + i * size)
                if self._request(vc, _PIO, _WRITE, port, size, value) is None:
                    return
        else:
            for i in range(count):
                value = self._request(vc, _PIO, _READ, port, size, 0)
                if value is None:
                    return
                fmt.pack_into(run, data_off + i * size, value)

    def _exit_mmio(self, vc: _Vcpu) -> None:
        run = vc.view
        gpa, data, length, is_write = k.RUN_MMIO.unpack_from(run, k.RUN_EXIT_OFF)
        if not 1 <= length <= 8:
            self._fatal(f"vCPU {vc.index}: MMIO access of {length} bytes at {gpa:#x}")
            return
        if is_write:
            value = int.from_bytes(data[:length], "little")
            self._request(vc, _MMIO, _WRITE, gpa, length, value)
        else:
            value = self._request(vc, _MMIO, _READ, gpa, length, 0)
            if value is not None:
                run[k.RUN_MMIO_DATA_OFF : k.RUN_MMIO_DATA_OFF + length] = value.to_bytes(
                    length, "little")

    def _request(self, vc: _Vcpu, rtype: int, direction: int, address: int, size: int,
                 value: int) -> int | None:
        """One access through the slot; the value the vCPU sees, or None if the VM is gone."""
        page = self._page
        if page is None or self._stopping:
            return None
        off = vc.off
        # ---- hypervisor: fill the slot, then PENDING ----
        page[off : off + _PROCESSED] = _HEADER_ZERO
        _U32.pack_into(page, off + abi.SLOT_TYPE_OFF, rtype)
        abi.SLOT_ADDR_REQ.pack_into(page, off + abi.SLOT_REQS_OFF, direction, 0, address, size)
        if rtype == _MMIO:
            _U64.pack_into(page, off + _VALUE, value)
        else:
            _U32.pack_into(page, off + _VALUE, value & 0xFFFF_FFFF)
        _U32.pack_into(page, off + _PROCESSED, _PENDING)
        # ---- HSM ----
        if not self._dispatch.dispatch(page, off, rtype, direction, address, size, value):
            _U32.pack_into(page, off + abi.SLOT_KERNEL_HANDLED_OFF, 0)
            vc.in_flight = True
            _U32.pack_into(page, off + _PROCESSED, _PROCESSING)
            self._pending[vc.index] = True
            os.eventfd_write(self._efd, 1)
            # ---- wait for NOTIFY_REQUEST_FINISH ----
            done = vc.done
            while True:
                if (done.acquire(timeout=0.5)
                        and _U32.unpack_from(page, off + _PROCESSED)[0] == _COMPLETE):
                    break
                if self._stopping:
                    return None
        # ---- hypervisor post-work (dm_emulate_io_complete) ----
        if rtype == _MMIO:
            (got,) = _U64.unpack_from(page, off + _VALUE)
        else:
            (got,) = _U32.unpack_from(page, off + _VALUE)
        _U32.pack_into(page, off + _PROCESSED, _FREE)
        return got & _MASK.get(size, 0xFFFF_FFFF_FFFF_FFFF)

    # --- halt watchdog ----------------------------------------------------------------
    async def _watch_halts(self) -> None:
        """With the in-kernel LAPIC a HLT never reaches user space, so a guest that halts
        with interrupts off would sleep forever: look for that when nothing exits."""
        last = -1
        while True:
            await trio.sleep(HALT_CHECK_INTERVAL)
            exits = sum(vc.exits for vc in self._vcpus)
            if not self._running or not self._can_kick or exits != last:
                last = exits
                continue
            with self._cond:
                for vc in self._vcpus:
                    vc.probe_dead = None
                    vc.probe = True
                self._kick_all()
            for _ in range(50):
                await trio.sleep(0.01)
                if all(vc.probe_dead is not None or not vc.alive for vc in self._vcpus):
                    break
            results = [vc.probe_dead for vc in self._vcpus if vc.alive]
            if results and all(results) and self._running:
                self._fatal("every vCPU halted with interrupts disabled")
                return

    def _probe(self, vc: _Vcpu) -> None:
        """On a kick: is this vCPU halted for good (HLT with IF=0, or waiting for SIPI)?"""
        vc.probe = False
        mp = k.KvmMpState()
        regs = k.KvmRegs()
        try:
            ioctl(vc.fd, k.KVM_GET_MP_STATE, mp, "KVM_GET_MP_STATE")
            ioctl(vc.fd, k.KVM_GET_REGS, regs, "KVM_GET_REGS")
        except HypervisorError:
            vc.probe_dead = False
            return
        halted = mp.mp_state == k.KVM_MP_STATE_HALTED and not regs.rflags & 0x200
        vc.probe_dead = halted or (vc.index != 0 and mp.mp_state == k.KVM_MP_STATE_UNINITIALIZED)

    # --- misc -------------------------------------------------------------------------
    def close(self) -> None:
        if self.state not in ("none", "destroyed"):
            self.destroy_vm()

    def _need_vm(self) -> None:
        if self.state in ("none", "destroyed"):
            raise HypervisorError("no VM on this handle", errno.EINVAL)
