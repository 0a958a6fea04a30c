"""``KvmHypervisor``: the HSM calls on /dev/kvm, assembled from the package's parts.

It owns the fds and the VM's state machine (none → created → running ⇄ paused →
destroyed) and hands each call to the part that does it: ``cpu`` (CPUID, registers),
``irqchip`` (INTx, MSI, routing), ``eventfds`` (ioeventfd, irqfd), ``requests`` (the
request page and its hand-offs), ``runner`` (the vCPU threads) and ``watchdog``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from dataclasses import dataclass, field

from .. import abi
from ..base import Hypervisor, HypervisorError, InlineServer, VcpuRegs, VmInfo
from ..hsm_dispatch import HsmDispatcher
from . import uapi as k
from .cpu import PowerOnState, load_acrn_regs, supported_cpuid, vcpu_cpuid
from .eventfds import EventFds
from .irqchip import Irqchip
from .requests import Requests
from .runner import VcpuRunner
from .syscall import KVM_DEVICE, ioctl, mmap_address, raw_ioctl
from .vcpu import Vcpu
from .watchdog import watch_halts

log = logging.getLogger(__name__)


@dataclass
class _VmParts:
    """What one created VM consists of; built by ``create_vm``, dropped by ``destroy_vm``."""

    vm_fd: int
    irqchip: Irqchip
    dispatcher: HsmDispatcher
    eventfds: EventFds
    requests: Requests
    runner: VcpuRunner
    #: guest RAM slots: (gpa, size, backing)
    memslots: list[tuple[int, int, mmap.mmap]] = field(default_factory=list)


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
        self._kvm_fd = -1
        self._vm: _VmParts | None = None
        #: the runner of the last VM, kept after destroy for its exit_reason
        self._last_runner: VcpuRunner | None = None

    @property
    def exit_reason(self) -> str | None:
        """Why the VM stopped by itself (None while it has not)."""
        return self._last_runner.exit_reason if self._last_runner is not None else None

    def vcpu(self, index: int) -> Vcpu:
        """vCPU ``index`` of the current VM: its ``fd`` and ``kvm_run`` page
        serve a caller that drives KVM_RUN itself (``raw_ioctl``), as the bare loop of
        bench/exit_roundtrip.py does, while ``serve_backend`` is not running."""
        vm = self._need_vm()
        if not 0 <= index < self.vcpu_num:
            raise HypervisorError(f"no vCPU {index}", errno.EINVAL)
        return vm.runner.vcpus[index]

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
        vcpus: list[Vcpu] = []
        vm_fd = -1
        try:
            vm_fd = self._open_vm(n)
            irqchip = Irqchip(vm_fd)
            irqchip.create()
            self._create_vcpus(vm_fd, n, vcpus)
            irqchip.save_power_on()
            dispatcher = HsmDispatcher()
            requests = Requests(ioreq_page, n, dispatcher)
        except BaseException:
            for vc in vcpus:
                vc.close()
            for fd in (vm_fd, self._kvm_fd):
                if fd >= 0:
                    os.close(fd)
            self._kvm_fd = -1
            raise
        runner = VcpuRunner(name, vcpus, requests)
        self._vm = _VmParts(vm_fd, irqchip, dispatcher, EventFds(vm_fd, dispatcher, irqchip),
                            requests, runner)
        self._last_runner = runner
        self.vcpu_num = n
        self.vm_name = name
        self.state = "created"
        log.debug("KVM VM %s created with %d vCPU(s)", name, n)
        return VmInfo(vmid=0, vcpu_num=n)

    def _open_vm(self, n: int) -> int:
        """Open the device, check it, and create a VM with the VMX helper pages set."""
        try:
            self._kvm_fd = os.open(self._device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise HypervisorError(f"CREATE_VM: {self._device}: {e.strerror}", e.errno) from e
        kfd = self._kvm_fd
        version = ioctl(kfd, k.KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")
        if version != k.KVM_API_VERSION:
            raise HypervisorError(f"CREATE_VM: KVM API version {version} unsupported")
        max_vcpus = raw_ioctl(kfd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_MAX_VCPUS)
        if max_vcpus > 0 and n > max_vcpus:
            raise HypervisorError(f"CREATE_VM: KVM allows {max_vcpus} vCPUs", errno.EINVAL)
        vfd = ioctl(kfd, k.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        try:
            ioctl(vfd, k.KVM_SET_TSS_ADDR, k.TSS_ADDR, "KVM_SET_TSS_ADDR")
            ioctl(vfd, k.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(k.IDENTITY_MAP_ADDR),
                  "KVM_SET_IDENTITY_MAP_ADDR")
        except BaseException:
            os.close(vfd)
            raise
        return vfd

    def _create_vcpus(self, vm_fd: int, n: int, vcpus: list[Vcpu]) -> None:
        """Create ``n`` vCPUs into ``vcpus`` (the caller closes them on failure)."""
        cpuid = supported_cpuid(self._kvm_fd)
        run_size = ioctl(self._kvm_fd, k.KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")
        for i in range(n):
            fd = ioctl(vm_fd, k.KVM_CREATE_VCPU, i, "KVM_CREATE_VCPU")
            try:
                run = mmap.mmap(fd, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
            vc = Vcpu(i, fd, run)
            vcpus.append(vc)
            ioctl(fd, k.KVM_SET_CPUID2, vcpu_cpuid(cpuid, i, n), "KVM_SET_CPUID2")
            vc.power_on = PowerOnState(fd)

    def destroy_vm(self) -> None:
        vm = self._vm
        if vm is None or self.state in ("none", "destroyed"):
            return
        vm.runner.stop_threads()
        vm.requests.close()
        for vc in vm.runner.vcpus:
            vc.close()
        os.close(vm.vm_fd)
        os.close(self._kvm_fd)
        self._kvm_fd = -1
        self._vm = None
        self.state = "destroyed"

    def start_vm(self) -> None:
        vm = self._need_vm()
        vm.dispatcher.clearing = False
        vm.runner.set_running(True)
        self.state = "running"

    def pause_vm(self) -> None:
        vm = self._need_vm()
        vm.runner.set_running(False)
        if self.state == "running":
            self.state = "paused"

    def reset_vm(self) -> None:
        """RESET_VM: every vCPU back to its power-on state, irqchips and PIT too, all slots FREE.

        Like ACRN it expects a paused VM; requests still in flight must have been cleared
        with CLEAR_VM_IOREQ first (else the vCPU holding one cannot be reset)."""
        vm = self._need_vm()
        self.pause_vm()
        vm.runner.wait_parked("RESET_VM")
        for vc in vm.runner.vcpus:
            assert vc.power_on is not None
            vc.power_on.restore(vc.fd)
            vc.settle = False
        vm.irqchip.restore_power_on()
        vm.requests.reset()

    def set_vcpu_regs(self, vcpu_id: int, regs: VcpuRegs) -> None:
        vm = self._need_vm()
        if not 0 <= vcpu_id < self.vcpu_num:
            raise HypervisorError(f"SET_VCPU_REGS: no vCPU {vcpu_id}", errno.EINVAL)
        vm.runner.wait_parked("SET_VCPU_REGS")
        vc = vm.runner.vcpus[vcpu_id]
        load_acrn_regs(vc.fd, regs)
        vc.settle = False

    async def serve_backend(self) -> None:
        """Runs the vCPU threads (and the halt watchdog) until cancelled; then stops and
        joins them, so no thread outlives the VM's nursery."""
        runner = self._need_vm().runner
        runner.start_threads()
        try:
            await watch_halts(runner)
        finally:
            runner.stop_threads()

    # --- memory -----------------------------------------------------------------------
    def set_memseg(self, gpa: int, backing: mmap.mmap, attr: int) -> None:
        vm = self._need_vm()
        size = len(backing)
        if gpa % mmap.PAGESIZE or size % mmap.PAGESIZE or not size:
            raise HypervisorError(f"SET_MEMSEG: {gpa:#x}+{size:#x} is not page aligned",
                                  errno.EINVAL)
        for g, s, _ in vm.memslots:
            if gpa < g + s and g < gpa + size:
                raise HypervisorError(f"SET_MEMSEG: {gpa:#x}+{size:#x} overlaps {g:#x}",
                                      errno.EEXIST)
        region = k.KvmUserspaceMemoryRegion()
        region.slot = len(vm.memslots)
        region.flags = 0 if attr & abi.MEM_ACCESS_WRITE else k.KVM_MEM_READONLY
        region.guest_phys_addr = gpa
        region.memory_size = size
        try:
            region.userspace_addr = mmap_address(backing)
        except TypeError as e:
            raise HypervisorError("SET_MEMSEG: guest RAM must be a writable mapping",
                                  errno.EINVAL) from e
        ioctl(vm.vm_fd, k.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        vm.memslots.append((gpa, size, backing))

    # --- requests ---------------------------------------------------------------------
    def create_ioreq_client(self) -> None:
        if not self._need_vm().requests.create_client():
            raise HypervisorError("CREATE_IOREQ_CLIENT: client exists", errno.EEXIST)

    async def attach_ioreq_client(self) -> bool:
        vm = self._vm
        return False if vm is None else await vm.requests.attach()

    def destroy_ioreq_client(self) -> None:
        if self._vm is not None:
            self._vm.requests.destroy_client()

    def notify_request_finish(self, vcpu: int) -> None:
        vm = self._vm  # (not _need_vm: every request comes here, keep it short)
        if vm is None:
            self._need_vm()
        if not 0 <= vcpu < self.vcpu_num:
            raise HypervisorError(f"NOTIFY_REQUEST_FINISH: vcpu {vcpu} invalid", errno.EINVAL)
        vm.requests.finish(vcpu)  # type: ignore[union-attr]

    def clear_vm_ioreq(self) -> None:
        vm = self._need_vm()
        vm.dispatcher.clearing = True
        vm.requests.clear()

    def set_inline_server(self, server: InlineServer | None) -> None:
        """The vCPU threads answer what they can themselves (``requests.py``)."""
        if self._vm is not None:
            self._vm.requests.inline = server.serve_here if server is not None else None

    # --- interrupts -------------------------------------------------------------------
    def inject_msi(self, address: int, data: int) -> None:
        self._need_vm().irqchip.inject_msi(address, data)

    def set_irqline(self, gsi: int, op: int) -> None:
        self._need_vm().irqchip.set_irqline(gsi, op)

    # --- fast paths -------------------------------------------------------------------
    @property
    def supports_eventfds(self) -> bool:
        return True

    def ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        self._need_vm().eventfds.ioeventfd(fd, address, length, pio=pio,
                                           datamatch=datamatch, deassign=deassign)

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None:
        self._need_vm().eventfds.irqfd(fd, address, data, deassign=deassign)

    # --- misc -------------------------------------------------------------------------
    def close(self) -> None:
        if self.state not in ("none", "destroyed"):
            self.destroy_vm()

    def _need_vm(self) -> _VmParts:
        if self._vm is None or self.state in ("none", "destroyed"):
            raise HypervisorError("no VM on this handle", errno.EINVAL)
        return self._vm
