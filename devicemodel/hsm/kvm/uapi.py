"""The slice of the KVM uapi (``linux/kvm.h``, x86-64) the KVM backend uses.

Numbers and layouts were measured with a C program compiled against the system header;
tests/unit/test_kvm_abi.py repeats that measurement, so the header stays the judge.  Hot-path
structures (``kvm_run``'s exit fields) are precompiled ``struct.Struct`` views; the rest
are ctypes structures, because several calls pass buffers larger than the 1024 bytes
``fcntl.ioctl`` accepts or integers above 2**31 that it cannot convert.
"""

from __future__ import annotations

import ctypes
import struct

# --- ioctl numbers (type 0xAE) ------------------------------------------------------------

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_SET_IDENTITY_MAP_ADDR = 0x4008AE48
KVM_CREATE_IRQCHIP = 0xAE60
KVM_IRQ_LINE = 0x4008AE61
KVM_GET_IRQCHIP = 0xC208AE62
KVM_SET_IRQCHIP = 0x8208AE63
KVM_SET_GSI_ROUTING = 0x4008AE6A
KVM_IRQFD = 0x4020AE76
KVM_CREATE_PIT2 = 0x4040AE77
KVM_IOEVENTFD = 0x4040AE79
KVM_GET_PIT2 = 0x8070AE9F
KVM_SET_PIT2 = 0x4070AEA0
KVM_SIGNAL_MSI = 0x4020AEA5
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_GET_LAPIC = 0x8400AE8E
KVM_SET_LAPIC = 0x4400AE8F
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_MP_STATE = 0x8004AE98
KVM_SET_MP_STATE = 0x4004AE99

KVM_API_VERSION = 12

# --- capabilities, flags, enums -----------------------------------------------------------

KVM_CAP_IRQ_ROUTING = 0x19
KVM_CAP_IRQFD = 0x20
KVM_CAP_IOEVENTFD = 0x24
KVM_CAP_SIGNAL_MSI = 0x4D
KVM_CAP_IMMEDIATE_EXIT = 0x88
KVM_CAP_MAX_VCPUS = 0x42

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_HALTED = 3

KVM_MEM_READONLY = 1 << 1

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOAPIC_NUM_PINS = 24

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_PIT_SPEAKER_DUMMY = 1

#: the x86 addresses QEMU uses for the VMX real-mode helpers (inside the 4 GiB hole)
IDENTITY_MAP_ADDR = 0xFFFB_C000
TSS_ADDR = 0xFFFB_D000

# --- kvm_run ------------------------------------------------------------------------------

RUN_IMMEDIATE_EXIT_OFF = 1
RUN_EXIT_REASON_OFF = 8
RUN_IF_FLAG_OFF = 13
RUN_EXIT_OFF = 32  # the exit union
#: io: direction u8, size u8, port u16, count u32, data_offset u64
RUN_IO = struct.Struct("<BBHIQ")
#: mmio: phys_addr u64, data[8], len u32, is_write u8
RUN_MMIO = struct.Struct("<Q8sIB")
RUN_MMIO_DATA_OFF = RUN_EXIT_OFF + 8
RUN_U32 = struct.Struct("<I")
RUN_U64 = struct.Struct("<Q")
RUN_INTERNAL = struct.Struct("<II")  # suberror, ndata (data[] follows, u64 each)
RUN_INTERNAL_DATA_OFF = RUN_EXIT_OFF + 8
RUN_INTERNAL_NDATA_MAX = 16
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# --- control structures (ctypes) ----------------------------------------------------------


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


KVM_REGS_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in KVM_REGS_NAMES]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


def kvm_cpuid2(nent: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``nent`` entries."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [
            ("nent", ctypes.c_uint32),
            ("padding", ctypes.c_uint32),
            ("entries", KvmCpuidEntry2 * nent),
        ]

    buf = KvmCpuid2()
    buf.nent = nent
    return buf


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", ctypes.c_uint32), ("level", ctypes.c_uint32)]


class KvmIrqchip(ctypes.Structure):
    """``struct kvm_irqchip``: chip_id, pad, then a 512-byte state union."""

    _fields_ = [
        ("chip_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("chip", ctypes.c_uint8 * 512),
    ]


#: kvm_ioapic_state: base_address u64, ioregsel u32, id u32, irr u32, pad u32, redirtbl[24]
IOAPIC_REDIRTBL_OFF = 24
IOAPIC_RTE_POLARITY_LOW = 1 << 13


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 15)]


class KvmPitState2(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint8 * 0x70)]


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_uint8 * 1024)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", ctypes.c_uint32)]


class KvmMsi(ctypes.Structure):
    _fields_ = [
        ("address_lo", ctypes.c_uint32),
        ("address_hi", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("devid", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 12),
    ]


class KvmIrqfd(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("gsi", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resamplefd", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 16),
    ]


class KvmIoeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 36),
    ]


class KvmIrqRoutingIrqchip(ctypes.Structure):
    _fields_ = [("irqchip", ctypes.c_uint32), ("pin", ctypes.c_uint32)]


class KvmIrqRoutingMsi(ctypes.Structure):
    _fields_ = [
        ("address_lo", ctypes.c_uint32),
        ("address_hi", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("devid", ctypes.c_uint32),
    ]


class KvmIrqRoutingUnion(ctypes.Union):
    _fields_ = [
        ("irqchip", KvmIrqRoutingIrqchip),
        ("msi", KvmIrqRoutingMsi),
        ("pad", ctypes.c_uint32 * 8),
    ]


class KvmIrqRoutingEntry(ctypes.Structure):
    _fields_ = [
        ("gsi", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("u", KvmIrqRoutingUnion),
    ]


def kvm_irq_routing(nr: int) -> ctypes.Structure:
    """A ``struct kvm_irq_routing`` with ``nr`` entries."""

    class KvmIrqRouting(ctypes.Structure):
        _fields_ = [
            ("nr", ctypes.c_uint32),
            ("flags", ctypes.c_uint32),
            ("entries", KvmIrqRoutingEntry * nr),
        ]

    buf = KvmIrqRouting()
    buf.nr = nr
    return buf


SIZES = {
    "kvm_userspace_memory_region": ctypes.sizeof(KvmUserspaceMemoryRegion),
    "kvm_segment": ctypes.sizeof(KvmSegment),
    "kvm_dtable": ctypes.sizeof(KvmDtable),
    "kvm_sregs": ctypes.sizeof(KvmSregs),
    "kvm_regs": ctypes.sizeof(KvmRegs),
    "kvm_cpuid_entry2": ctypes.sizeof(KvmCpuidEntry2),
    "kvm_irq_level": ctypes.sizeof(KvmIrqLevel),
    "kvm_irqchip": ctypes.sizeof(KvmIrqchip),
    "kvm_pit_config": ctypes.sizeof(KvmPitConfig),
    "kvm_pit_state2": ctypes.sizeof(KvmPitState2),
    "kvm_lapic_state": ctypes.sizeof(KvmLapicState),
    "kvm_mp_state": ctypes.sizeof(KvmMpState),
    "kvm_msi": ctypes.sizeof(KvmMsi),
    "kvm_irqfd": ctypes.sizeof(KvmIrqfd),
    "kvm_ioeventfd": ctypes.sizeof(KvmIoeventfd),
    "kvm_irq_routing_entry": ctypes.sizeof(KvmIrqRoutingEntry),
}
