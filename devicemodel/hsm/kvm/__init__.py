"""The KVM backend: real guest code on /dev/kvm, with ACRN's request contract.

One thread per vCPU sits in KVM_RUN.  A KVM_EXIT_IO or KVM_EXIT_MMIO becomes a request in
that vCPU's slot of the page handed to ``create_vm``, with the transitions ACRN's
hypervisor and HSM make (acrn-facts §1.5), and the vCPU thread sleeps until
NOTIFY_REQUEST_FINISH.  Interrupts go to KVM's in-kernel irqchip (PIC, IOAPIC, LAPIC) and
PIT.  A vCPU that cannot go on (triple fault, failed entry, emulation error, every vCPU
halted with interrupts off) stops the VM: ``attach_ioreq_client`` returns False, which
makes vm.py power off; ``exit_reason`` says why.

One module per concern, lowest first:

- ``uapi``: the slice of linux/kvm.h we use (numbers, ctypes structs, kvm_run views)
- ``syscall``: ioctl(2) through ctypes (``ioctl``, ``raw_ioctl``), the ``kvm_usable`` probe
- ``cpu``: CPUID per vCPU, SET_VCPU_REGS in ACRN's terms, power-on state for RESET_VM
- ``irqchip``: PIC/IOAPIC/PIT, the GSI routing table, SET_IRQLINE and MSI injection
- ``eventfds``: ioeventfds and irqfds, with ACRN's matching rules on top of KVM's
- ``requests``: the request page and the two hand-offs between vCPU threads and the loop
- ``vcpu``: one vCPU (fd, kvm_run page, flags), its kick signal and self-probes
- ``runner``: the vCPU threads: KVM_RUN, exit decoding, park, kick, stop
- ``watchdog``: stops a VM whose every vCPU halted for good
- ``hypervisor``: ``KvmHypervisor``, the Hypervisor interface assembled from the above
"""

from __future__ import annotations

from .hypervisor import KvmHypervisor
from .syscall import KVM_DEVICE, ioctl, kvm_usable, raw_ioctl

__all__ = ["KVM_DEVICE", "KvmHypervisor", "ioctl", "kvm_usable", "raw_ioctl"]
