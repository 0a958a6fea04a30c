"""The HSM userspace ABI (Linux ``include/uapi/linux/acrn.h``), x86-64.

Control-plane structures are construct definitions, built once and used on slow paths.
The 256-byte request slot is read and written on the hot path, so it gets precompiled
``struct.Struct`` views instead (construct costs tens of µs per parse; struct ~0.3 µs).
The ABI test compiles a C program against the system header and compares every number
here with it: the header is the judge.
"""

from __future__ import annotations

import struct

from construct import (
    Array,
    Bytes,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
)

# --- ioctl encoding (asm-generic/ioctl.h) -------------------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
ACRN_IOCTL_TYPE = 0xA2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ACRN_IOCTL_TYPE << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# --- constants ---------------------------------------------------------------------------

#: the HSM's device nodes, tried in order as acrn-dm does: the old name, then acrn_hsm
HSM_NODES = ("/dev/acrn_vhm", "/dev/acrn_hsm")

ACRN_IO_REQUEST_MAX = 16
IOREQ_SLOT_SIZE = 256
IOREQ_PAGE_SIZE = 4096

IOREQ_STATE_PENDING = 0
IOREQ_STATE_COMPLETE = 1
IOREQ_STATE_PROCESSING = 2
IOREQ_STATE_FREE = 3

IOREQ_TYPE_PORTIO = 0
IOREQ_TYPE_MMIO = 1
IOREQ_TYPE_PCICFG = 2
IOREQ_TYPE_WP = 3  # hypervisor-internal; the HSM never forwards it, but we must survive it

IOREQ_DIR_READ = 0
IOREQ_DIR_WRITE = 1

MEM_ACCESS_READ = 0x1
MEM_ACCESS_WRITE = 0x2
MEM_ACCESS_EXEC = 0x4
MEM_ACCESS_RWX = 0x7
MEM_ACCESS_RIGHT_MASK = 0x7
MEM_TYPE_WB = 0x40
MEM_TYPE_WT = 0x80
MEM_TYPE_UC = 0x100
MEM_TYPE_WC = 0x200
MEM_TYPE_WP = 0x400
MEM_TYPE_MASK = 0x7C0
MEMMAP_RAM = 0
MEMMAP_MMIO = 1

PTDEV_IRQ_INTX = 0
PTDEV_IRQ_MSI = 1
PTDEV_IRQ_MSIX = 2
PTDEV_QUIRK_ASSIGN = 1 << 0
MMIODEV_RES_NUM = 3
PCI_NUM_BARS = 6

IOEVENTFD_FLAG_PIO = 0x01
IOEVENTFD_FLAG_DATAMATCH = 0x02
IOEVENTFD_FLAG_DEASSIGN = 0x04
IOEVENTFD_FLAG_ASYNCIO = 0x08  # ACRN kernel fork only
IRQFD_FLAG_DEASSIGN = 0x01

GSI_SET_HIGH = 0
GSI_SET_LOW = 1
GSI_RAISING_PULSE = 2
GSI_FALLING_PULSE = 3

PMCMD_TYPE_MASK = 0x000000FF
PMCMD_GET_PX_CNT = 0
PMCMD_GET_PX_DATA = 1
PMCMD_GET_CX_CNT = 2
PMCMD_GET_CX_DATA = 3

#: the PM_GET_CPU_STATE command word (acrn-dm's PMCMD_*_SHIFT): vmid, vCPU, state number
PMCMD_VMID_SHIFT = 24
PMCMD_VCPUID_SHIFT = 16
PMCMD_STATE_NUM_SHIFT = 8

#: VM_INTR_MONITOR commands (the hypervisor's INTR_CMD_*; the HSM passes the page through)
INTR_CMD_GET_DATA = 0
INTR_CMD_DELAY_INT = 1
#: the hypervisor's MAX_PTDEV_NUM: (irq, count) pairs fit in acrn_intr_monitor.buffer
MAX_PTDEV_NUM = 24

ACRN_INVALID_VMID = 0xFFFF
VM_NAME_FIELD_LEN = 16  # the retired uuid field; ACRN's hypervisor reads it as the VM name

# GUEST_FLAG_* bits for acrn_vm_creation.vm_flag
GUEST_FLAG_SECURE_WORLD_ENABLED = 1 << 0
GUEST_FLAG_LAPIC_PASSTHROUGH = 1 << 1
GUEST_FLAG_IO_COMPLETION_POLLING = 1 << 2
GUEST_FLAG_HIDE_MTRR = 1 << 3
GUEST_FLAG_RT = 1 << 4
GUEST_FLAG_NVMX_ENABLED = 1 << 5
GUEST_FLAG_SECURITY_VM = 1 << 6
GUEST_FLAG_VCAT_ENABLED = 1 << 7
GUEST_FLAG_STATIC_VM = 1 << 8
GUEST_FLAG_TEE = 1 << 9
GUEST_FLAG_REE = 1 << 10
GUEST_FLAG_PMU_PASSTHROUGH = 1 << 11
GUEST_FLAG_VHWP = 1 << 12
GUEST_FLAG_VTM = 1 << 13
GUEST_FLAG_STATELESS = 1 << 14

# --- control structures (construct) ------------------------------------------------------

acrn_vm_creation = Struct(
    "vmid" / Int16ul,
    "reserved0" / Int16ul,
    "vcpu_num" / Int16ul,
    "reserved1" / Int16ul,
    "name" / Bytes(VM_NAME_FIELD_LEN),
    "vm_flag" / Int64ul,
    "ioreq_buf" / Int64ul,
    "cpu_affinity" / Int64ul,
)

acrn_gp_regs = Struct(
    *[
        name / Int64ul
        for name in (
            "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        )
    ]
)

acrn_descriptor_ptr = Struct(
    "limit" / Int16ul,
    "base" / Int64ul,
    "reserved" / Array(3, Int16ul),
)

acrn_regs = Struct(
    "gprs" / acrn_gp_regs,
    "gdt" / acrn_descriptor_ptr,
    "idt" / acrn_descriptor_ptr,
    "rip" / Int64ul,
    "cs_base" / Int64ul,
    "cr0" / Int64ul,
    "cr4" / Int64ul,
    "cr3" / Int64ul,
    "ia32_efer" / Int64ul,
    "rflags" / Int64ul,
    "reserved_64" / Array(4, Int64ul),
    "cs_ar" / Int32ul,
    "cs_limit" / Int32ul,
    "reserved_32" / Array(3, Int32ul),
    "cs_sel" / Int16ul,
    "ss_sel" / Int16ul,
    "ds_sel" / Int16ul,
    "es_sel" / Int16ul,
    "fs_sel" / Int16ul,
    "gs_sel" / Int16ul,
    "ldt_sel" / Int16ul,
    "tr_sel" / Int16ul,
    Padding(4),
)

acrn_vcpu_regs = Struct(
    "vcpu_id" / Int16ul,
    "reserved" / Array(3, Int16ul),
    "vcpu_regs" / acrn_regs,
)

acrn_ioreq_notify = Struct(
    "vmid" / Int16ul,
    "reserved" / Int16ul,
    "vcpu" / Int32ul,
)

acrn_vm_memmap = Struct(
    "type" / Int32ul,
    "attr" / Int32ul,
    "user_vm_pa" / Int64ul,
    "vma_base" / Int64ul,  # union with service_vm_pa (MMIO mappings)
    "len" / Int64ul,
)

acrn_ptdev_irq = Struct(
    "type" / Int32ul,
    "virt_bdf" / Int16ul,
    "phys_bdf" / Int16ul,
    "intx" / Struct(
        "virt_pin" / Int32ul,
        "phys_pin" / Int32ul,
        "is_pic_pin" / Int32ul,
    ),
)

acrn_pcidev = Struct(
    "type" / Int32ul,
    "virt_bdf" / Int16ul,
    "phys_bdf" / Int16ul,
    "intr_line" / Int8ul,
    "intr_pin" / Int8ul,
    Padding(2),
    "bar" / Array(PCI_NUM_BARS, Int32ul),
)

acrn_mmiodev_res = Struct(
    "user_vm_pa" / Int64ul,
    "service_vm_pa" / Int64ul,
    "size" / Int64ul,
    "mem_type" / Int64ul,
)

acrn_mmiodev = Struct(
    "name" / Bytes(8),
    "res" / Array(MMIODEV_RES_NUM, acrn_mmiodev_res),
)

acrn_vdev = Struct(
    # a union in the header: the raw u64 ``value`` over these fields
    "id" / Struct(
        "vendor" / Int16ul,
        "device" / Int16ul,
        "legacy_id" / Int32ul,
    ),
    "slot" / Int64ul,
    "io_addr" / Array(PCI_NUM_BARS, Int32ul),
    "io_size" / Array(PCI_NUM_BARS, Int32ul),
    "args" / Bytes(128),
)

acrn_msi_entry = Struct(
    "msi_addr" / Int64ul,
    "msi_data" / Int64ul,
)

acrn_acpi_generic_address = Struct(
    "space_id" / Int8ul,
    "bit_width" / Int8ul,
    "bit_offset" / Int8ul,
    "access_size" / Int8ul,
    "address" / Int64ul,
)

acrn_cstate_data = Struct(
    "cx_reg" / acrn_acpi_generic_address,
    "type" / Int8ul,
    Padding(3),
    "latency" / Int32ul,
    Padding(4),
    "power" / Int64ul,
)

acrn_pstate_data = Struct(
    "core_frequency" / Int64ul,
    "power" / Int64ul,
    "transition_latency" / Int64ul,
    "bus_master_latency" / Int64ul,
    "control" / Int64ul,
    "status" / Int64ul,
)

acrn_ioeventfd = Struct(
    "fd" / Int32ul,
    "flags" / Int32ul,
    "addr" / Int64ul,
    "len" / Int32ul,
    "reserved" / Int32ul,
    "data" / Int64ul,
)

acrn_irqfd = Struct(
    "fd" / Int32sl,
    "flags" / Int32ul,
    "msi" / acrn_msi_entry,
)

# The page VM_INTR_MONITOR takes by address: the hypervisor's struct acrn_intr_monitor
# (linux/acrn.h does not declare it; acrn-dm's acrn_common.h does).
acrn_intr_monitor = Struct(
    "cmd" / Int32ul,
    "buf_cnt" / Int32ul,
    "buffer" / Array(MAX_PTDEV_NUM * 2, Int64ul),
)

# The request slot, for the control plane (tests, debugging dumps). The hot path uses the
# struct.Struct views below. ``reqs`` is a union in the header: the raw ``data`` words,
# over which the PIO, PCI and MMIO request layouts lie.
acrn_pio_request = Struct(
    "direction" / Int32ul,
    "reserved" / Int32ul,
    "address" / Int64ul,
    "size" / Int64ul,
    "value" / Int32ul,
    Padding(4),
)

acrn_mmio_request = Struct(
    "direction" / Int32ul,
    "reserved" / Int32ul,
    "address" / Int64ul,
    "size" / Int64ul,
    "value" / Int64ul,
)

acrn_pci_request = Struct(
    "direction" / Int32ul,
    "reserved" / Array(3, Int32ul),
    "size" / Int64ul,
    "value" / Int32ul,
    "bus" / Int32ul,
    "dev" / Int32ul,
    "func" / Int32ul,
    "reg" / Int32ul,
    Padding(4),
)

acrn_io_request = Struct(
    "type" / Int32ul,
    "completion_polling" / Int32ul,
    "reserved0" / Array(14, Int32ul),
    "reqs" / Struct("data" / Array(8, Int64ul)),
    "reserved1" / Int32ul,
    "kernel_handled" / Int32ul,
    "processed" / Int32ul,
    Padding(116),  # the struct is aligned to 256
)

acrn_io_request_buffer = Struct(
    "req_slot" / Array(ACRN_IO_REQUEST_MAX, acrn_io_request),
)

# Sizes the header fixes; construct computes the others.
ACRN_IO_REQUEST_SIZE = 256
ACRN_IO_REQUEST_BUFFER_SIZE = 4096

# --- ioctl numbers -------------------------------------------------------------------------

ACRN_IOCTL_CREATE_VM = _iowr(0x10, acrn_vm_creation.sizeof())
ACRN_IOCTL_DESTROY_VM = _io(0x11)
ACRN_IOCTL_START_VM = _io(0x12)
ACRN_IOCTL_PAUSE_VM = _io(0x13)
ACRN_IOCTL_RESET_VM = _io(0x15)
ACRN_IOCTL_SET_VCPU_REGS = _iow(0x16, acrn_vcpu_regs.sizeof())
ACRN_IOCTL_INJECT_MSI = _iow(0x23, acrn_msi_entry.sizeof())
ACRN_IOCTL_VM_INTR_MONITOR = _iow(0x24, 8)  # unsigned long: user VA of one page
ACRN_IOCTL_SET_IRQLINE = _iow(0x25, 8)  # __u64, passed by value
ACRN_IOCTL_NOTIFY_REQUEST_FINISH = _iow(0x31, acrn_ioreq_notify.sizeof())
ACRN_IOCTL_CREATE_IOREQ_CLIENT = _io(0x32)
ACRN_IOCTL_ATTACH_IOREQ_CLIENT = _io(0x33)
ACRN_IOCTL_DESTROY_IOREQ_CLIENT = _io(0x34)
ACRN_IOCTL_CLEAR_VM_IOREQ = _io(0x35)
ACRN_IOCTL_SET_MEMSEG = _iow(0x41, acrn_vm_memmap.sizeof())
ACRN_IOCTL_UNSET_MEMSEG = _iow(0x42, acrn_vm_memmap.sizeof())
ACRN_IOCTL_SET_PTDEV_INTR = _iow(0x53, acrn_ptdev_irq.sizeof())
ACRN_IOCTL_RESET_PTDEV_INTR = _iow(0x54, acrn_ptdev_irq.sizeof())
ACRN_IOCTL_ASSIGN_PCIDEV = _iow(0x55, acrn_pcidev.sizeof())
ACRN_IOCTL_DEASSIGN_PCIDEV = _iow(0x56, acrn_pcidev.sizeof())
ACRN_IOCTL_ASSIGN_MMIODEV = _iow(0x57, acrn_mmiodev.sizeof())
ACRN_IOCTL_DEASSIGN_MMIODEV = _iow(0x58, acrn_mmiodev.sizeof())
ACRN_IOCTL_CREATE_VDEV = _iow(0x59, acrn_vdev.sizeof())
ACRN_IOCTL_DESTROY_VDEV = _iow(0x5A, acrn_vdev.sizeof())
ACRN_IOCTL_PM_GET_CPU_STATE = _iowr(0x60, 8)
ACRN_IOCTL_IOEVENTFD = _iow(0x70, acrn_ioeventfd.sizeof())
ACRN_IOCTL_IRQFD = _iow(0x71, acrn_irqfd.sizeof())

# Only in ACRN's kernel fork (acrn-dm's hsm_ioctl_defs.h), absent upstream; failures are
# non-fatal, as in acrn-dm.
FORK_ONLY_IOCTLS = {
    "SETUP_ASYNCIO": _iow(0x90, 8),
    "SETUP_VM_EVENT_RING": _iow(0xA0, 8),
    "SETUP_VM_EVENT_FD": _iow(0xA1, 4),
}
ACRN_IOCTL_SETUP_ASYNCIO = FORK_ONLY_IOCTLS["SETUP_ASYNCIO"]
ACRN_IOCTL_SETUP_VM_EVENT_RING = FORK_ONLY_IOCTLS["SETUP_VM_EVENT_RING"]
ACRN_IOCTL_SETUP_VM_EVENT_FD = FORK_ONLY_IOCTLS["SETUP_VM_EVENT_FD"]

# --- the request slot (hot path: precompiled struct views) ---------------------------------
#
# Offsets inside one 256-byte slot.  The union `reqs` starts at 64; the PIO, MMIO and PCI
# variants share direction @0 and size @16; value is at +24 (u32 for PIO/PCI, u64 for MMIO).

SLOT_TYPE_OFF = 0
SLOT_POLLING_OFF = 4
SLOT_REQS_OFF = 64
SLOT_DIRECTION_OFF = SLOT_REQS_OFF + 0
SLOT_ADDRESS_OFF = SLOT_REQS_OFF + 8  # PIO and MMIO
SLOT_SIZE_OFF = SLOT_REQS_OFF + 16
SLOT_VALUE_OFF = SLOT_REQS_OFF + 24
SLOT_PCI_BDFR_OFF = SLOT_REQS_OFF + 28  # bus, dev, func, reg
SLOT_KERNEL_HANDLED_OFF = 132
SLOT_PROCESSED_OFF = 136

#: kernel_handled, processed
SLOT_STATE = struct.Struct("<II")
#: type, completion_polling
SLOT_TYPE = struct.Struct("<I")
#: direction, reserved, address, size (PIO and MMIO)
SLOT_ADDR_REQ = struct.Struct("<IIQQ")
#: direction, reserved[3], size, value, bus, dev, func, reg (PCICFG)
SLOT_PCI_REQ = struct.Struct("<I12xQIIIII")
SLOT_U32 = struct.Struct("<I")
SLOT_U64 = struct.Struct("<Q")

PCI_REQ_FIELDS = ("direction", "size", "value", "bus", "dev", "func", "reg")


def slot_offset(vcpu: int) -> int:
    """Byte offset of vCPU ``vcpu``'s slot in the request buffer (the slot index is the vCPU id)."""
    return vcpu * IOREQ_SLOT_SIZE


def bdf(bus: int, dev: int, func: int) -> int:
    """The ``bus<<8 | dev<<3 | func`` encoding acrn_pcidev and acrn_ptdev_irq use."""
    return ((bus & 0xFF) << 8) | ((dev & 0x1F) << 3) | (func & 0x7)


def pm_cmd(vmid: int, vcpu: int, kind: int, state: int = 0) -> int:
    """PM_GET_CPU_STATE's command word, as acrn-dm's acpi_pm.c builds it."""
    return ((vmid & 0xFF) << PMCMD_VMID_SHIFT) | ((vcpu & 0xFF) << PMCMD_VCPUID_SHIFT) | \
        ((state & 0xFF) << PMCMD_STATE_NUM_SHIFT) | (kind & PMCMD_TYPE_MASK)


def irqline_arg(gsi: int, op: int) -> int:
    """SET_IRQLINE's by-value argument: low 32 bits GSI, high 32 bits the operation."""
    return ((op & 0xFFFFFFFF) << 32) | (gsi & 0xFFFFFFFF)
