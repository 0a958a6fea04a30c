"""What a device is built from besides its options: the few services it uses.

Never the VM config, the hypervisor object or a string-keyed bag (design.md §3): guest
memory, interrupt services, the backend's interrupt remapper and passthrough service
where it has them, the hypervisor calls about guest memory and its own devices, the
VM-wide device choices, and the legacy port bus for the one
kind of device that decodes ISA ports itself (the LPC bridge's COM ports).

Assembly (``vmm/``) fills a context from the VM; ``standalone`` makes one for a device
served outside a VM (``acrn-pydm lspci``, a vfio-user server: memory = the peer's DMA
regions, interrupts = the peer's eventfds, no buses).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Protocol

from .bus import PortBus
from .hsm.base import PciDevAssignment, PtdevIntx, RemapperFactory, VdevSpec
from .irq.services import Eventfds, IrqLines, MsiSink, NoInterrupts
from .memory import MemoryMap


@dataclass(frozen=True)
class DeviceChoices:
    """VM-wide choices every device makes the same way (assembly fills them from the VM
    description)."""

    #: virtio functions offer one MSI message instead of MSI-X (``--virtio_msi``)
    virtio_msi: bool = False
    #: kick every virtio queue this often, in ns, whether notified or not (``--virtio_poll``)
    virtio_poll_ns: int | None = None
    #: the guest is Windows: virtio subsystem IDs as its drivers expect (``--windows``)
    windows: bool = False
    #: OVMF boots the guest (BAR placement differs, acrn-facts §3.4)
    ovmf: bool = False
    #: a real-time VM (``--rtvm``): no GPU passthrough, no emulated PIC (acrn-dm)
    rtvm: bool = False


class PassthroughService(Protocol):
    """What a passthrough device asks of the hypervisor (the HSM's passthrough calls)."""

    @property
    def emulates_passthrough_config(self) -> bool:
        """The hypervisor owns the device's config space and MSI (ACRN)."""

    @property
    def reaches_host_devices(self) -> bool:
        """A real device's interrupts and DMA can reach the guest (not a simulation)."""

    def assign_pcidev(self, dev: PciDevAssignment) -> None: ...

    def deassign_pcidev(self, dev: PciDevAssignment) -> None: ...

    def set_ptdev_intr(self, intx: PtdevIntx) -> None: ...

    def reset_ptdev_intr(self, intx: PtdevIntx) -> None: ...


class HypervisorCalls(Protocol):
    """The hypervisor calls a device makes about guest memory and the hypervisor's own
    devices: map host memory into the guest (ivshmem's shared memory, a GPU's stolen
    memory) and have the hypervisor emulate a function at a reserved slot (CREATE_VDEV)."""

    def set_memseg(self, gpa: int, backing: mmap.mmap, attr: int) -> None: ...

    def map_mmio(self, gpa: int, hpa: int, length: int) -> None: ...

    def unset_mmio(self, gpa: int, length: int) -> None: ...

    def create_vdev(self, vdev: VdevSpec) -> None: ...

    def destroy_vdev(self, vdev: VdevSpec) -> None: ...


@dataclass(frozen=True)
class DeviceContext:
    """Everything a device may use. Assembly builds it; every factory gets it."""

    #: guest memory (gpa → memoryview, bounds-checked)
    memory: MemoryMap
    #: MSI injection
    msi: MsiSink
    #: interrupt controller pins (INTx, ISA IRQs)
    lines: IrqLines
    #: ioeventfd/irqfd fast paths, when the backend has them
    eventfds: Eventfds | None = None
    choices: DeviceChoices = field(default_factory=DeviceChoices)
    #: the backend's name, for messages ("acrn", "kvm", "sim"; "none" outside a VM)
    backend: str = "none"
    #: the backend's interrupt remapping for passthrough MSI (None: it offers none)
    remapper: RemapperFactory | None = None
    #: the hypervisor's passthrough calls (None: no passthrough outside a VM)
    passthrough: PassthroughService | None = None
    #: guest-memory mappings and hypervisor-emulated devices (None: outside a VM)
    hypervisor: HypervisorCalls | None = None
    #: the legacy port bus, for devices that decode ISA ports (LPC's COM ports)
    ports: PortBus | None = None


def standalone(memory: MemoryMap | None = None, *, msi: MsiSink | None = None,
               lines: IrqLines | None = None, choices: DeviceChoices | None = None,
               **services: object) -> DeviceContext:
    """A context for a device served outside a VM: no backend, interrupts to the
    caller's sinks (dropped when none is given), guest memory the caller's (e.g. a
    vfio-user client's DMA regions; empty when none is given). ``services`` are further
    ``DeviceContext`` fields (``ports``, ``passthrough``, ``remapper``, ``backend``)."""
    drop = NoInterrupts()
    return DeviceContext(memory=memory if memory is not None else MemoryMap(),
                         msi=msi if msi is not None else drop,
                         lines=lines if lines is not None else drop,
                         choices=choices if choices is not None else DeviceChoices(),
                         **services)  # type: ignore[arg-type]


__all__ = ["DeviceChoices", "DeviceContext", "HypervisorCalls", "PassthroughService",
           "standalone"]
