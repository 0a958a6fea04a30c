"""The real backend: the HSM ioctls (``/dev/acrn_hsm``, or the older ``/dev/acrn_vhm``),
issued with the same arguments and in the same order as acrn-dm's vmmapi.c.

Every kernel call goes through one small ``IoctlLayer``. ACRN cannot run on the development
machines, so the tests swap the layer for a recording fake and check the exact request
numbers and argument bytes. The libc layer uses ctypes rather than ``fcntl.ioctl``: the
latter parses an integer argument as a C int and overflows for SET_IRQLINE's by-value u64.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import trio
from construct import ConstructError

from . import abi
from .abi import HSM_NODES
from .attach import AttachWaiter
from .base import (
    Hypervisor,
    HypervisorError,
    InlineServer,
    MmioDevAssignment,
    PciDevAssignment,
    PtdevIntx,
    VcpuRegs,
    VdevSpec,
    VmInfo,
)

log = logging.getLogger(__name__)

IoctlArg = bytes | bytearray | int | None
_IOC_WRITE_ONLY = 1  # the direction bits (31:30) of an _IOW number

# Hot-path layouts (per request or per interrupt): precompiled, not construct.
_NOTIFY = struct.Struct("<HHI")  # acrn_ioreq_notify: vmid, reserved, vcpu
_MSI = struct.Struct("<QQ")  # acrn_msi_entry: msi_addr, msi_data

_GPR_NAMES = tuple(sc.name for sc in abi.acrn_gp_regs.subcons)


class IoctlLayer(ABC):
    """The kernel boundary. ``ioctl`` returns ``(ret, out)``: ret < 0 is ``-errno``; ``out``
    is the argument buffer after the call (for struct arguments), else None."""

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    @abstractmethod
    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> tuple[int, bytes | None]:
        """Issue one ioctl; never raises for a kernel error (that is a negative ret)."""


class LibcIoctlLayer(IoctlLayer):
    """ioctl(2) through libc. An int argument is passed by value (pointer-sized), bytes by
    address; the call releases the GIL, so a blocking ATTACH only blocks its own thread."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._ioctl = libc.ioctl
        self._ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        self._ioctl.restype = ctypes.c_int

    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> tuple[int, bytes | None]:
        out: bytes | None = None
        if arg is None or isinstance(arg, int):
            ret = self._ioctl(fd, request, arg)
        elif request >> 30 == _IOC_WRITE_ONLY:  # the kernel only reads it: pass in place
            data = bytes(arg)
            ret = self._ioctl(fd, request, data)
            out = data
        else:  # the kernel may write back (_IOWR, or an old-style number): a mutable copy
            buf = ctypes.create_string_buffer(bytes(arg), len(arg))
            ret = self._ioctl(fd, request, buf)
            out = buf.raw
        if ret < 0:
            return -(ctypes.get_errno() or errno.EIO), out
        return ret, out


def buffer_address(buf: mmap.mmap) -> int:
    """The user virtual address of a writable mmap (HSM takes user VAs and pins the pages).
    The temporary ctypes export is dropped at once, so the mmap can still be closed."""
    try:
        view = (ctypes.c_char * len(buf)).from_buffer(buf)
    except (TypeError, ValueError) as e:
        raise HypervisorError(f"cannot take the address of the mapping: {e}") from e
    try:
        return ctypes.addressof(view)
    finally:
        del view


_IOCTL_NAMES = {
    getattr(abi, n): n for n in dir(abi) if n.startswith("ACRN_IOCTL_") and n != "ACRN_IOCTL_TYPE"
}


def _ioctl_name(request: int) -> str:
    return _IOCTL_NAMES.get(request, f"ioctl {request:#x}")


class AcrnHypervisor(Hypervisor):
    """One VM on the HSM: one open fd holds exactly one VM (closing it destroys the VM)."""

    name = "acrn"
    vcpus_elsewhere = True  # the hypervisor runs them: the server may poll the slots

    def __init__(
        self,
        layer: IoctlLayer | None = None,
        *,
        nodes: Sequence[str] = HSM_NODES,
        create_retries: int = 10,
        create_retry_delay: float = 0.5,
    ) -> None:
        self._io = layer if layer is not None else LibcIoctlLayer()
        self.create_retries = max(1, create_retries)
        self.create_retry_delay = create_retry_delay
        self.vmid = abi.ACRN_INVALID_VMID
        self.vcpu_num = 0
        self._client = False
        #: the thread that sits in ATTACH (started by the first attach_ioreq_client)
        self._waiter: AttachWaiter | None = None
        self._inline: InlineServer | None = None
        # Mappings the HSM holds by user VA: keep them referenced while the VM lives.
        self._ioreq_page: mmap.mmap | None = None
        self._ram: list[mmap.mmap] = []
        self.node, self._fd = self._open(nodes)

    # --- the device node ----------------------------------------------------------------
    def _open(self, nodes: Sequence[str]) -> tuple[str, int]:
        path = next((p for p in nodes if self._io.exists(p)), None)
        if path is None:
            raise HypervisorError(
                f"no ACRN HSM device: none of {', '.join(nodes)} exists. Run the device model "
                "in the ACRN Service VM with the HSM driver loaded (CONFIG_ACRN_HSM), or pick "
                "another backend with --hv sim or --hv kvm",
                errno.ENOENT,
            )
        try:
            return path, self._io.open(path)
        except PermissionError as e:
            raise HypervisorError(
                f"cannot open {path}: permission denied. Run as root, or give this user "
                f"read/write access to {path} (e.g. a udev rule setting its group)",
                e.errno,
            ) from e
        except OSError as e:
            raise HypervisorError(f"cannot open {path}: {e.strerror}", e.errno) from e

    def _call(self, request: int, arg: IoctlArg = None) -> bytes | None:
        if self._fd < 0:
            raise HypervisorError(f"{_ioctl_name(request)}: the HSM handle is closed", errno.EBADF)
        ret, out = self._io.ioctl(self._fd, request, arg)
        if ret < 0:
            raise HypervisorError(
                f"{_ioctl_name(request)} failed: {os.strerror(-ret)} (errno {-ret})", -ret
            )
        return out

    # --- VM lifecycle -------------------------------------------------------------------
    def create_vm(
        self, name: str, ioreq_page: mmap.mmap, *, vm_flag: int = 0, cpu_affinity: int = 0
    ) -> VmInfo:
        raw = name.encode()
        if not raw or b"\0" in raw or len(raw) >= abi.VM_NAME_FIELD_LEN:
            raise HypervisorError(
                f"VM name {name!r} is {len(raw)} bytes: ACRN needs 1 to "
                f"{abi.VM_NAME_FIELD_LEN - 1} bytes (it goes in a 16-byte field and the "
                "hypervisor finds the VM's configuration by this name)",
                errno.EINVAL,
            )
        if len(ioreq_page) < abi.IOREQ_PAGE_SIZE:
            raise HypervisorError("CREATE_VM: the request buffer must be a 4 KiB page")
        page_va = buffer_address(ioreq_page)
        if page_va % mmap.PAGESIZE:
            raise HypervisorError(f"CREATE_VM: request buffer {page_va:#x} is not page aligned")
        arg = abi.acrn_vm_creation.build(
            dict(
                vmid=0,
                reserved0=0,
                vcpu_num=0,
                reserved1=0,
                name=raw.ljust(abi.VM_NAME_FIELD_LEN, b"\0"),
                vm_flag=vm_flag,
                ioreq_buf=page_va,
                cpu_affinity=cpu_affinity,
            )
        )
        # acrn-dm retries: a previous instance of the same VM may still be going away.
        for attempt in range(self.create_retries):
            try:
                out = self._call(abi.ACRN_IOCTL_CREATE_VM, arg)
                break
            except HypervisorError as e:
                if attempt + 1 == self.create_retries:
                    raise HypervisorError(f"creating VM {name!r}: {e}", e.errno) from e
                log.warning("creating VM %s: %s; retrying", name, e)
                time.sleep(self.create_retry_delay)
        assert out is not None
        created = abi.acrn_vm_creation.parse(out)
        if not 1 <= created.vcpu_num <= abi.ACRN_IO_REQUEST_MAX:
            raise HypervisorError(f"CREATE_VM returned {created.vcpu_num} vCPUs")
        self.vmid = created.vmid
        self.vcpu_num = created.vcpu_num
        self._ioreq_page = ioreq_page
        return VmInfo(vmid=created.vmid, vcpu_num=created.vcpu_num)

    def destroy_vm(self) -> None:
        self._call(abi.ACRN_IOCTL_DESTROY_VM)
        self._client = False  # destroying the VM destroys its clients
        self.vmid = abi.ACRN_INVALID_VMID
        self._ioreq_page = None
        self._ram.clear()

    def start_vm(self) -> None:
        self._call(abi.ACRN_IOCTL_START_VM)

    def pause_vm(self) -> None:
        self._call(abi.ACRN_IOCTL_PAUSE_VM)

    def reset_vm(self) -> None:
        self._call(abi.ACRN_IOCTL_RESET_VM)

    def set_vcpu_regs(self, vcpu_id: int, regs: VcpuRegs) -> None:
        unknown = set(regs.gprs) - set(_GPR_NAMES)
        if unknown:
            raise HypervisorError(f"SET_VCPU_REGS: unknown registers {sorted(unknown)}")
        gprs = {n: regs.gprs.get(n, 0) for n in _GPR_NAMES}
        gprs["rsp"] = regs.gprs.get("rsp", regs.rsp)
        try:
            arg = abi.acrn_vcpu_regs.build(
                dict(
                    vcpu_id=vcpu_id,
                    reserved=[0, 0, 0],
                    vcpu_regs=dict(
                        gprs=gprs,
                        gdt=dict(limit=regs.gdt_limit, base=regs.gdt_base, reserved=[0] * 3),
                        idt=dict(limit=regs.idt_limit, base=regs.idt_base, reserved=[0] * 3),
                        rip=regs.rip,
                        cs_base=regs.cs_base,
                        cr0=regs.cr0,
                        cr4=regs.cr4,
                        cr3=regs.cr3,
                        ia32_efer=regs.ia32_efer,
                        rflags=regs.rflags,
                        reserved_64=[0] * 4,
                        cs_ar=regs.cs_ar,
                        cs_limit=regs.cs_limit,
                        reserved_32=[0] * 3,
                        cs_sel=regs.cs_sel,
                        ss_sel=regs.ss_sel,
                        ds_sel=regs.ds_sel,
                        es_sel=regs.es_sel,
                        fs_sel=regs.fs_sel,
                        gs_sel=regs.gs_sel,
                        ldt_sel=regs.ldt_sel,
                        tr_sel=regs.tr_sel,
                    ),
                )
            )
        except ConstructError as e:
            raise HypervisorError(f"SET_VCPU_REGS: a register value does not fit: {e}") from e
        self._call(abi.ACRN_IOCTL_SET_VCPU_REGS, arg)

    def reset(
        self,
        *,
        reset_devices: Callable[[], None],
        reload: Callable[[], VcpuRegs | None],
        bsp: int = 0,
    ) -> None:
        """The reset sequence of acrn-facts §1.5, in acrn-dm's order: PAUSE_VM, then
        CLEAR_VM_IOREQ (HSM completes what is pending), the DM resets its devices, RESET_VM
        (every slot FREE again), the DM reloads firmware/kernel, SET_VCPU_REGS for the BSP
        (when ``reload`` returns registers), START_VM."""
        self.pause_vm()
        self.clear_vm_ioreq()
        reset_devices()
        self.reset_vm()
        regs = reload()
        if regs is not None:
            self.set_vcpu_regs(bsp, regs)
        self.start_vm()

    # --- memory -------------------------------------------------------------------------
    def set_memseg(self, gpa: int, backing: mmap.mmap, attr: int) -> None:
        arg = abi.acrn_vm_memmap.build(
            dict(
                type=abi.MEMMAP_RAM,
                attr=attr,
                user_vm_pa=gpa,
                vma_base=buffer_address(backing),
                len=len(backing),
            )
        )
        self._call(abi.ACRN_IOCTL_SET_MEMSEG, arg)
        self._ram.append(backing)

    def map_mmio(self, gpa: int, hpa: int, length: int) -> None:
        """SET_MEMSEG for host MMIO (a passthrough BAR), mapped UC by the HSM."""
        self._call(abi.ACRN_IOCTL_SET_MEMSEG, self._mmio_memmap(gpa, hpa, length))

    def unset_mmio(self, gpa: int, length: int, hpa: int = 0) -> None:
        self._call(abi.ACRN_IOCTL_UNSET_MEMSEG, self._mmio_memmap(gpa, hpa, length))

    @staticmethod
    def _mmio_memmap(gpa: int, hpa: int, length: int) -> bytes:
        return abi.acrn_vm_memmap.build(
            dict(type=abi.MEMMAP_MMIO, attr=abi.MEM_ACCESS_RWX, user_vm_pa=gpa, vma_base=hpa,
                 len=length)
        )

    # --- requests -----------------------------------------------------------------------
    def create_ioreq_client(self) -> None:
        self._call(abi.ACRN_IOCTL_CREATE_IOREQ_CLIENT)
        self._client = True

    async def attach_ioreq_client(self) -> bool:
        """Wait on the waiter thread (``attach.py``), which sits in ATTACH for us."""
        if self._fd < 0:
            return False
        waiter = self._waiter
        if waiter is None or not waiter.alive and not waiter.has_result:
            waiter = self._waiter = AttachWaiter(self._attach_blocking)
            waiter.inline = self._inline
        try:
            ret = await waiter.wait()
        except trio.ClosedResourceError:
            return False  # closed under us
        if isinstance(ret, BaseException):
            raise ret  # the thread's serving failed (e.g. NOTIFY): as if the loop had
        if ret >= 0:
            return True
        if ret == -errno.EINTR:  # a signal woke us: rescan
            return True
        self._waiter = None  # this thread has ended; a new client gets a new one
        waiter.close()
        if ret == -errno.ENODEV:  # the client is being destroyed: shut down
            return False
        # acrn-dm leaves its request loop on any other error; so do we, loudly.
        log.error("ACRN_IOCTL_ATTACH_IOREQ_CLIENT failed: %s; no more requests are served",
                  os.strerror(-ret))
        return False

    def set_inline_server(self, server: InlineServer | None) -> None:
        """The waiter thread answers what it can itself (``attach.py``)."""
        self._inline = server
        if self._waiter is not None:
            self._waiter.inline = server

    def _attach_blocking(self) -> int:
        fd = self._fd
        if fd < 0:
            return -errno.EBADF
        ret, _ = self._io.ioctl(fd, abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT, None)
        return ret

    def destroy_ioreq_client(self) -> None:
        """Also wakes a waiting ATTACH, which then returns -ENODEV."""
        self._client = False
        self._call(abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT)

    def notify_request_finish(self, vcpu: int) -> None:
        ret, _ = self._io.ioctl(self._fd, abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH,
                                _NOTIFY.pack(self.vmid, 0, vcpu))
        if ret < 0:
            raise HypervisorError(
                f"ACRN_IOCTL_NOTIFY_REQUEST_FINISH for vCPU {vcpu} failed: "
                f"{os.strerror(-ret)} (errno {-ret})",
                -ret,
            )

    def clear_vm_ioreq(self) -> None:
        self._call(abi.ACRN_IOCTL_CLEAR_VM_IOREQ)

    # --- interrupts ---------------------------------------------------------------------
    def inject_msi(self, address: int, data: int) -> None:
        self._call(abi.ACRN_IOCTL_INJECT_MSI, _MSI.pack(address, data))

    def set_irqline(self, gsi: int, op: int) -> None:
        # by value: the u64 {gsi, op} is the ioctl argument itself, not a pointer to it
        self._call(abi.ACRN_IOCTL_SET_IRQLINE, abi.irqline_arg(gsi, op))

    # --- fast paths ---------------------------------------------------------------------
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
        flags = (
            (abi.IOEVENTFD_FLAG_PIO if pio else 0)
            | (abi.IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
            | (abi.IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        )
        arg = abi.acrn_ioeventfd.build(
            dict(fd=fd, flags=flags, addr=address, len=length, reserved=0, data=datamatch or 0)
        )
        self._call(abi.ACRN_IOCTL_IOEVENTFD, arg)

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None:
        arg = abi.acrn_irqfd.build(
            dict(
                fd=fd,
                flags=abi.IRQFD_FLAG_DEASSIGN if deassign else 0,
                msi=dict(msi_addr=address, msi_data=data),
            )
        )
        self._call(abi.ACRN_IOCTL_IRQFD, arg)

    # --- passthrough --------------------------------------------------------------------
    @property
    def emulates_passthrough_config(self) -> bool:
        return True

    @staticmethod
    def _pcidev(dev: PciDevAssignment) -> bytes:
        if len(dev.bars) != abi.PCI_NUM_BARS:
            raise HypervisorError(f"PCI assignment needs {abi.PCI_NUM_BARS} BAR values")
        return abi.acrn_pcidev.build(
            dict(
                type=abi.PTDEV_QUIRK_ASSIGN if dev.quirk else 0,
                virt_bdf=dev.virt_bdf,
                phys_bdf=dev.phys_bdf,
                intr_line=dev.intr_line,
                intr_pin=dev.intr_pin,
                bar=list(dev.bars),
            )
        )

    def assign_pcidev(self, dev: PciDevAssignment) -> None:
        self._call(abi.ACRN_IOCTL_ASSIGN_PCIDEV, self._pcidev(dev))

    def deassign_pcidev(self, dev: PciDevAssignment) -> None:
        self._call(abi.ACRN_IOCTL_DEASSIGN_PCIDEV, self._pcidev(dev))

    @staticmethod
    def _ptdev_irq(intx: PtdevIntx, phys_pin: int) -> bytes:
        return abi.acrn_ptdev_irq.build(
            dict(
                type=abi.PTDEV_IRQ_INTX,
                virt_bdf=intx.virt_bdf,
                phys_bdf=intx.phys_bdf,
                intx=dict(virt_pin=intx.virt_pin, phys_pin=phys_pin,
                          is_pic_pin=int(intx.is_pic_pin)),
            )
        )

    def set_ptdev_intr(self, intx: PtdevIntx) -> None:
        self._call(abi.ACRN_IOCTL_SET_PTDEV_INTR, self._ptdev_irq(intx, intx.phys_pin))

    def reset_ptdev_intr(self, intx: PtdevIntx) -> None:
        # acrn-dm leaves phys_pin zero here; the HSM matches on the virtual pin
        self._call(abi.ACRN_IOCTL_RESET_PTDEV_INTR, self._ptdev_irq(intx, 0))

    # --- MMIO devices, hypervisor-emulated devices, interrupt storms, CPU states ----------
    @staticmethod
    def mmiodev_bytes(dev: MmioDevAssignment) -> bytes:
        """``struct acrn_mmiodev`` as acrn-dm fills it (unused resources zero)."""
        name = dev.name.encode()
        if len(name) > 8 or len(dev.resources) > abi.MMIODEV_RES_NUM:
            raise HypervisorError(f"MMIO device {dev.name!r}: name over 8 bytes or more than "
                                  f"{abi.MMIODEV_RES_NUM} ranges")
        res = [dict(user_vm_pa=r.user_vm_pa, service_vm_pa=r.service_vm_pa, size=r.size,
                    mem_type=r.mem_type) for r in dev.resources]
        res += [dict(user_vm_pa=0, service_vm_pa=0, size=0, mem_type=0)] * \
            (abi.MMIODEV_RES_NUM - len(res))
        return abi.acrn_mmiodev.build(dict(name=name.ljust(8, b"\0"), res=res))

    def assign_mmiodev(self, dev: MmioDevAssignment) -> None:
        self._call(abi.ACRN_IOCTL_ASSIGN_MMIODEV, self.mmiodev_bytes(dev))

    def deassign_mmiodev(self, dev: MmioDevAssignment) -> None:
        self._call(abi.ACRN_IOCTL_DEASSIGN_MMIODEV, self.mmiodev_bytes(dev))

    @staticmethod
    def vdev_bytes(vdev: VdevSpec) -> bytes:
        """``struct acrn_vdev`` as acrn-dm's uart.c and ivshmem.c fill it."""
        if len(vdev.args) > 128:
            raise HypervisorError("CREATE_VDEV: the device arguments exceed 128 bytes")
        return abi.acrn_vdev.build(dict(
            id=dict(vendor=vdev.vendor, device=vdev.device, legacy_id=vdev.legacy_id),
            slot=vdev.bdf, io_addr=list(vdev.io_addr), io_size=list(vdev.io_size),
            args=vdev.args.ljust(128, b"\0")))

    def create_vdev(self, vdev: VdevSpec) -> None:
        self._call(abi.ACRN_IOCTL_CREATE_VDEV, self.vdev_bytes(vdev))

    def destroy_vdev(self, vdev: VdevSpec) -> None:
        self._call(abi.ACRN_IOCTL_DESTROY_VDEV, self.vdev_bytes(vdev))

    def intr_monitor(self, page: mmap.mmap) -> None:
        # by value: the page's user VA (the HSM pins it and hands its address on)
        self._call(abi.ACRN_IOCTL_VM_INTR_MONITOR, buffer_address(page))

    def pm_get_cpu_state(self, cmd: int, size: int) -> bytes:
        # the command goes in, the answer comes back in the same (larger) buffer
        out = self._call(abi.ACRN_IOCTL_PM_GET_CPU_STATE,
                         struct.pack("<Q", cmd).ljust(max(size, 8), b"\0"))
        assert out is not None
        return out[:size]

    # --- ACRN-kernel-fork-only ioctls (best effort, as in acrn-dm) ------------------------
    def setup_asyncio(self, base: int) -> bool:
        """Hand the asyncio shared buffer (user VA, by value) to the fork's HSM."""
        return self._best_effort("SETUP_ASYNCIO", base)

    def setup_vm_event_ring(self, base: int) -> bool:
        """Hand the VM event ring (user VA, by value) to the fork's HSM."""
        return self._best_effort("SETUP_VM_EVENT_RING", base)

    def setup_vm_event_fd(self, fd: int) -> bool:
        """The eventfd the fork's HSM kicks when the event ring has entries (by value)."""
        return self._best_effort("SETUP_VM_EVENT_FD", fd)

    def _best_effort(self, name: str, arg: int) -> bool:
        try:
            self._call(abi.FORK_ONLY_IOCTLS[name], arg)
        except HypervisorError as e:
            log.warning("ACRN_IOCTL_%s not supported by this kernel (%s); continuing without it",
                        name, os.strerror(e.errno) if e.errno else e)
            return False
        return True

    # --- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the HSM fd, which destroys the VM. A still-registered client is destroyed
        first so that the waiter thread's ATTACH returns before the fd goes."""
        fd = self._fd
        if fd < 0:
            return
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.stop()  # no new ATTACH from here on
        if self._client:
            try:
                self.destroy_ioreq_client()
            except HypervisorError as e:
                log.warning("%s", e)
        if waiter is not None:
            waiter.close()  # the ATTACH it was in has returned: the fd is ours to close
        self._fd = -1
        self._io.close(fd)
        self.vmid = abi.ACRN_INVALID_VMID
        self._ioreq_page = None
        self._ram.clear()

    @property
    def closed(self) -> bool:
        return self._fd < 0
