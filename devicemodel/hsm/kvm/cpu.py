"""vCPU set-up: the CPUID each vCPU sees, SET_VCPU_REGS in ACRN's terms, power-on state.

ACRN hands the device model ``struct acrn_regs`` (VMX access-rights words, one CS and
selectors for the rest); KVM wants ``kvm_sregs``/``kvm_regs``.  This module is that
translation, plus what RESET_VM needs to put a vCPU back where creation left it.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ..base import HypervisorError, VcpuRegs
from . import uapi as k
from .syscall import ioctl, raw_ioctl

# ACRN's SET_VCPU_REGS derives every data segment from CR0.PE (hypervisor vcpu.c).
_PM_DATA_AR, _PM_LIMIT = 0xC093, 0xFFFF_FFFF
_RM_DATA_AR, _RM_LIMIT = 0x0093, 0xFFFF
_TR_AR, _LDTR_AR = 0x008B, 0x0082
_RFLAGS_RESERVED = 0x2


# --- CPUID ---------------------------------------------------------------------------------
def supported_cpuid(kvm_fd: int) -> ctypes.Structure:
    """KVM_GET_SUPPORTED_CPUID, growing the buffer until the table fits."""
    nent = 128
    while True:
        buf = k.kvm_cpuid2(nent)
        ret = raw_ioctl(kvm_fd, k.KVM_GET_SUPPORTED_CPUID, ctypes.addressof(buf))
        if ret >= 0:
            return buf
        err = ctypes.get_errno()
        if err != errno.E2BIG or nent >= 4096:
            raise HypervisorError(f"KVM_GET_SUPPORTED_CPUID: {os.strerror(err)}", err)
        nent *= 2


def vcpu_cpuid(supported: ctypes.Structure, index: int, count: int) -> ctypes.Structure:
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


# --- power-on state ------------------------------------------------------------------------
class PowerOnState:
    """A vCPU's state as creation left it, restored by RESET_VM."""

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


# --- SET_VCPU_REGS -------------------------------------------------------------------------
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


def load_acrn_regs(fd: int, regs: VcpuRegs) -> None:
    """Load ``regs`` into the vCPU ``fd`` the way ACRN's SET_VCPU_REGS does, and make the
    vCPU runnable (an AP waiting for SIPI starts at once)."""
    sregs = k.KvmSregs()
    ioctl(fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
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
    ioctl(fd, k.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
    kregs = k.KvmRegs()
    for name, value in regs.gprs.items():
        if name not in k.KVM_REGS_NAMES or name in ("rip", "rflags"):
            raise HypervisorError(f"SET_VCPU_REGS: unknown register {name!r}", errno.EINVAL)
        setattr(kregs, name, value)
    kregs.rsp = regs.gprs.get("rsp", regs.rsp)
    kregs.rip = regs.rip
    kregs.rflags = regs.rflags | _RFLAGS_RESERVED
    ioctl(fd, k.KVM_SET_REGS, kregs, "KVM_SET_REGS")
    mp = k.KvmMpState()
    mp.mp_state = k.KVM_MP_STATE_RUNNABLE
    ioctl(fd, k.KVM_SET_MP_STATE, mp, "KVM_SET_MP_STATE")
