"""The Hypervisor interface every backend (acrn, sim, kvm) implements.

It mirrors the HSM ioctl surface, so nothing above ``hsm/`` can tell the backends apart.
The request page belongs to the device model (it allocates it and hands it to
``create_vm``, as acrn-dm passes ``ioreq_buf``); guest RAM regions are handed over with
``set_memseg``.  Only ``attach_ioreq_client`` is async: it is the one call that waits.
"""

from __future__ import annotations

import mmap
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class HypervisorError(Exception):
    """A hypervisor call failed; the message names the call and the reason."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class VmInfo:
    """What CREATE_VM returns."""

    vmid: int
    vcpu_num: int


@dataclass
class VcpuRegs:
    """BSP state for SET_VCPU_REGS (fields of ``struct acrn_regs``)."""

    rip: int = 0
    rsp: int = 0
    rflags: int = 0x2
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    ia32_efer: int = 0
    cs_base: int = 0
    cs_limit: int = 0xFFFF
    cs_ar: int = 0x009B
    cs_sel: int = 0
    ss_sel: int = 0
    ds_sel: int = 0
    es_sel: int = 0
    fs_sel: int = 0
    gs_sel: int = 0
    ldt_sel: int = 0
    tr_sel: int = 0
    gdt_base: int = 0
    gdt_limit: int = 0
    idt_base: int = 0
    idt_limit: int = 0
    gprs: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PciDevAssignment:
    """ASSIGN_PCIDEV / DEASSIGN_PCIDEV arguments."""

    virt_bdf: int
    phys_bdf: int
    intr_line: int = 0
    intr_pin: int = 0
    bars: tuple[int, ...] = (0, 0, 0, 0, 0, 0)
    quirk: bool = False


@dataclass(frozen=True)
class PtdevIntx:
    """SET_PTDEV_INTR / RESET_PTDEV_INTR arguments for an INTx line."""

    virt_bdf: int
    phys_bdf: int
    virt_pin: int
    phys_pin: int
    is_pic_pin: bool = False


@dataclass(frozen=True)
class VdevSpec:
    """CREATE_VDEV / DESTROY_VDEV arguments (``struct acrn_vdev``): a PCI device the
    hypervisor emulates itself, at the slot and BAR addresses the device model reserved.
    ``io_addr`` are the BAR register values (type bits included), ``args`` the device's
    own argument bytes (ivshmem: the region name; the PCI vUART: its index)."""

    vendor: int
    device: int
    bdf: int
    io_addr: tuple[int, ...] = (0,) * 6
    io_size: tuple[int, ...] = (0,) * 6
    args: bytes = b""
    legacy_id: int = 0


@dataclass(frozen=True)
class MmioResource:
    """One MMIO range of ``struct acrn_mmiodev``: host ``service_vm_pa`` shown to the guest
    at ``user_vm_pa``."""

    user_vm_pa: int
    service_vm_pa: int
    size: int
    mem_type: int = 0


@dataclass(frozen=True)
class MmioDevAssignment:
    """ASSIGN_MMIODEV / DEASSIGN_MMIODEV arguments: a platform (non-PCI) device's MMIO,
    e.g. a TPM's CRB, given to the guest (``--mmiodev_pt``, ``--acpidev_pt``)."""

    name: str
    resources: tuple[MmioResource, ...]


#: a message a device sends: a memory write of ``data`` to ``address``
MessageSink = Callable[[int, int], None]


class MessageSource(Protocol):
    """A passthrough device as interrupt remapping sees it: where its MSI writes go."""

    name: str

    def connect_interrupts(self, sink: MessageSink | None) -> None:
        """Hand every MSI write the device makes to ``sink`` (the remapping hardware)."""

    def message_eventfds(self, fds: list[int] | None) -> None:
        """Signal eventfd k when message k is raised (VFIO's way); None stops it."""


class InterruptRemapper(Protocol):
    """Routes the ``count`` messages of one passthrough device to guest MSIs, as VT-d
    interrupt remapping does: physical message k raises whatever entry k says."""

    count: int

    def physical_message(self) -> tuple[int, int] | None:
        """The (address, data) to program into the device once, or None when the host
        kernel programs the device itself (VFIO)."""

    def route(self, k: int, address: int, data: int) -> bool:
        """Message k now raises the guest MSI (address, data). False: could not."""

    def unroute(self, k: int) -> None: ...

    def close(self) -> None: ...


#: builds the remapper for a device's ``count`` messages
RemapperFactory = Callable[[MessageSource, int], InterruptRemapper]


class InlineServer(Protocol):
    """The request server's offer to answer a request on the thread that saw it (a KVM
    vCPU thread, the ACRN waiter thread) instead of waking the event loop. Both calls
    keep the slot protocol (acrn-facts §1.5): they serve only slots in PROCESSING with
    kernel_handled 0 and complete them with ``notify_request_finish``."""

    def serve_here(self, vcpu: int) -> bool:
        """True: ``vcpu``'s slot was served and completed on this thread; False: the
        loop must serve it (hand it over)."""

    def scan_here(self) -> bool:
        """Serve what can be served here; True when nothing is left for the loop."""


class Hypervisor(ABC):
    """One VM's connection to a hypervisor (one open HSM fd holds one VM)."""

    #: short name used by ``--hv``
    name: str = "?"
    #: the guest's vCPUs run outside this process (ACRN's hypervisor), so none of our
    #: threads is on their path: the request server may poll the slots for a moment
    #: after serving (``IoreqServer.linger_ns``). KVM's and the sim's vCPUs are threads
    #: of ours, which would wait for the GIL that poll holds.
    vcpus_elsewhere: bool = False

    # --- VM lifecycle -----------------------------------------------------------------
    @abstractmethod
    def create_vm(
        self, name: str, ioreq_page: mmap.mmap, *, vm_flag: int = 0, cpu_affinity: int = 0
    ) -> VmInfo:
        """Create the VM; the hypervisor posts requests into ``ioreq_page`` from now on."""

    @abstractmethod
    def destroy_vm(self) -> None: ...

    @abstractmethod
    def start_vm(self) -> None: ...

    @abstractmethod
    def pause_vm(self) -> None: ...

    @abstractmethod
    def reset_vm(self) -> None: ...

    @abstractmethod
    def set_vcpu_regs(self, vcpu_id: int, regs: VcpuRegs) -> None: ...

    # --- memory -----------------------------------------------------------------------
    @abstractmethod
    def set_memseg(self, gpa: int, backing: mmap.mmap, attr: int) -> None:
        """Map ``backing`` (the whole mmap) as guest RAM at ``gpa``."""

    def map_mmio(self, gpa: int, hpa: int, length: int) -> None:
        """SET_MEMSEG for host MMIO (a GPU's stolen memory and OpRegion)."""
        raise HypervisorError(f"{self.name}: mapping host MMIO into the guest not supported")

    def unset_mmio(self, gpa: int, length: int) -> None:
        """UNSET_MEMSEG for an MMIO mapping (RAM is unmapped only at VM destroy)."""

    # --- requests ---------------------------------------------------------------------
    @abstractmethod
    def create_ioreq_client(self) -> None: ...

    @abstractmethod
    async def attach_ioreq_client(self) -> bool:
        """Wait until at least one slot is pending for us. False means: shut down."""

    @abstractmethod
    def destroy_ioreq_client(self) -> None:
        """Wakes a waiting attach, which then returns False."""

    @abstractmethod
    def notify_request_finish(self, vcpu: int) -> None: ...

    @abstractmethod
    def clear_vm_ioreq(self) -> None: ...

    def set_inline_server(self, server: InlineServer | None) -> None:
        """While the request server runs it offers to answer requests on the backend's
        own threads (None: it stopped). A backend whose requests arrive on the event loop
        (the sim) has no use for it."""

    # --- interrupts -------------------------------------------------------------------
    @abstractmethod
    def inject_msi(self, address: int, data: int) -> None: ...

    @abstractmethod
    def set_irqline(self, gsi: int, op: int) -> None: ...

    # --- fast paths -------------------------------------------------------------------
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
        """A guest write matching (address, length, data) signals ``fd`` instead of a slot."""
        raise HypervisorError(f"{self.name}: ioeventfd not supported")

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None:
        """Signalling ``fd`` injects the MSI (address, data)."""
        raise HypervisorError(f"{self.name}: irqfd not supported")

    @property
    def supports_eventfds(self) -> bool:
        return False

    # --- passthrough ------------------------------------------------------------------
    def assign_pcidev(self, dev: PciDevAssignment) -> None:
        raise HypervisorError(f"{self.name}: PCI passthrough assignment not supported")

    def deassign_pcidev(self, dev: PciDevAssignment) -> None:
        raise HypervisorError(f"{self.name}: PCI passthrough assignment not supported")

    def set_ptdev_intr(self, intx: PtdevIntx) -> None:
        raise HypervisorError(f"{self.name}: passthrough INTx not supported")

    def reset_ptdev_intr(self, intx: PtdevIntx) -> None:
        raise HypervisorError(f"{self.name}: passthrough INTx not supported")

    @property
    def emulates_passthrough_config(self) -> bool:
        """True when the hypervisor owns passthrough config space (ACRN); else the DM does."""
        return False

    def assign_mmiodev(self, dev: MmioDevAssignment) -> None:
        raise HypervisorError(f"{self.name}: MMIO device passthrough (--mmiodev_pt, "
                              "--acpidev_pt) needs the acrn or sim backend")

    def deassign_mmiodev(self, dev: MmioDevAssignment) -> None:
        raise HypervisorError(f"{self.name}: MMIO device passthrough not supported")

    # --- devices the hypervisor emulates, interrupt storms, CPU power states ---------------
    def create_vdev(self, vdev: VdevSpec) -> None:
        """CREATE_VDEV: the hypervisor emulates this PCI function from now on."""
        raise HypervisorError(f"{self.name}: devices the hypervisor emulates (uart,vuart_idx, "
                              "ivshmem,hv:) need the acrn or sim backend")

    def destroy_vdev(self, vdev: VdevSpec) -> None:
        raise HypervisorError(f"{self.name}: DESTROY_VDEV not supported")

    def intr_monitor(self, page: mmap.mmap) -> None:
        """VM_INTR_MONITOR: the hypervisor reads the command in the page (a
        ``struct acrn_intr_monitor``) and writes its answer there."""
        raise HypervisorError(f"{self.name}: interrupt storm monitoring (--intr_monitor) "
                              "needs the acrn or sim backend")

    def pm_get_cpu_state(self, cmd: int, size: int) -> bytes:
        """PM_GET_CPU_STATE: ``size`` bytes of the answer to command word ``cmd`` (a u64
        count, or a ``struct acrn_pstate_data``/``acrn_cstate_data``)."""
        raise HypervisorError(f"{self.name}: no CPU power state data")

    @property
    def reaches_host_devices(self) -> bool:
        """Whether a passthrough device's interrupts and DMA can reach this backend's
        guest (False for a simulation: it may only show a real device's guest view)."""
        return True

    def interrupt_remapper(self) -> RemapperFactory | None:
        """The backend's own interrupt remapping for passthrough MSI (the sim's remap
        table), or None (then irqfd routes, where the backend has eventfds)."""
        return None

    async def serve_backend(self) -> None:
        """Background work the backend needs while the VM runs (irqfd watchers, vCPU
        threads). vm.py runs it in the VM's nursery; the default needs none."""

    def close(self) -> None:
        """Release the connection (closing the HSM fd destroys the VM)."""
