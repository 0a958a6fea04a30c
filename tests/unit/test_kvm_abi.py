"""The KVM uapi numbers and layouts in hsm/kvm/uapi.py, judged by the system's linux/kvm.h:
a C program compiled against it prints every ioctl number, constant, size and offset."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from devicemodel.hsm.kvm import uapi as k

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

# (C expression, our value)
OFFSETS = {
    "offsetof(struct kvm_run, immediate_exit)": k.RUN_IMMEDIATE_EXIT_OFF,
    "offsetof(struct kvm_run, exit_reason)": k.RUN_EXIT_REASON_OFF,
    "offsetof(struct kvm_run, if_flag)": k.RUN_IF_FLAG_OFF,
    "offsetof(struct kvm_run, io.direction)": k.RUN_EXIT_OFF,
    "offsetof(struct kvm_run, io.size)": k.RUN_EXIT_OFF + 1,
    "offsetof(struct kvm_run, io.port)": k.RUN_EXIT_OFF + 2,
    "offsetof(struct kvm_run, io.count)": k.RUN_EXIT_OFF + 4,
    "offsetof(struct kvm_run, io.data_offset)": k.RUN_EXIT_OFF + 8,
    "offsetof(struct kvm_run, mmio.phys_addr)": k.RUN_EXIT_OFF,
    "offsetof(struct kvm_run, mmio.data)": k.RUN_MMIO_DATA_OFF,
    "offsetof(struct kvm_run, mmio.len)": k.RUN_EXIT_OFF + 16,
    "offsetof(struct kvm_run, mmio.is_write)": k.RUN_EXIT_OFF + 20,
    "offsetof(struct kvm_run, fail_entry.hardware_entry_failure_reason)": k.RUN_EXIT_OFF,
    "offsetof(struct kvm_run, internal.suberror)": k.RUN_EXIT_OFF,
    "offsetof(struct kvm_run, internal.ndata)": k.RUN_EXIT_OFF + 4,
    "offsetof(struct kvm_run, internal.data)": k.RUN_INTERNAL_DATA_OFF,
    "sizeof(((struct kvm_run *)0)->internal.data) / 8": k.RUN_INTERNAL_NDATA_MAX,
    "offsetof(struct kvm_run, system_event.type)": k.RUN_EXIT_OFF,
    "offsetof(struct kvm_irqchip, chip)": k.KvmIrqchip.chip.offset,
    "offsetof(struct kvm_ioapic_state, redirtbl)": k.IOAPIC_REDIRTBL_OFF,
    "sizeof(struct kvm_cpuid2)": 8,
    "sizeof(struct kvm_irq_routing)": 8,
}


def _ctypes_offsets() -> dict[str, int]:
    """Field offsets of our ctypes structures, to compare with offsetof()."""
    out = {}
    for cname, cls in (("kvm_sregs", k.KvmSregs), ("kvm_regs", k.KvmRegs),
                       ("kvm_segment", k.KvmSegment), ("kvm_ioeventfd", k.KvmIoeventfd),
                       ("kvm_irqfd", k.KvmIrqfd), ("kvm_msi", k.KvmMsi),
                       ("kvm_irq_routing_entry", k.KvmIrqRoutingEntry),
                       ("kvm_userspace_memory_region", k.KvmUserspaceMemoryRegion),
                       ("kvm_cpuid_entry2", k.KvmCpuidEntry2)):
        for name, *_ in cls._fields_:
            if name.startswith("pad"):
                continue
            out[f"offsetof(struct {cname}, {name})"] = getattr(cls, name).offset
    return out


def _measure(exprs: list[str], tmp_path) -> dict[str, int]:
    body = "\n".join(f'    printf("%llu\\n", (unsigned long long)({e}));' for e in exprs)
    src = tmp_path / "kvm_abi.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
                   f"int main(void)\n{{\n{body}\n    return 0;\n}}\n")
    exe = tmp_path / "kvm_abi"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True,
                   text=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True,
                           text=True).stdout.split()
    return dict(zip(exprs, map(int, lines), strict=True))


def test_every_kvm_constant_matches_the_header(tmp_path):
    ours = {name: getattr(k, name) for name in dir(k)
            if name.startswith("KVM_") and isinstance(getattr(k, name), int)}
    assert len(ours) > 60
    theirs = _measure(sorted(ours), tmp_path)
    assert {n: hex(v) for n, v in ours.items()} == {n: hex(v) for n, v in theirs.items()}


def test_struct_sizes_match_the_header(tmp_path):
    exprs = {f"sizeof(struct {name})": size for name, size in k.SIZES.items()}
    assert _measure(list(exprs), tmp_path) == exprs


def test_field_offsets_match_the_header(tmp_path):
    exprs = {**OFFSETS, **_ctypes_offsets()}
    assert _measure(list(exprs), tmp_path) == exprs


def test_hot_path_structs_agree_with_the_offsets():
    assert k.RUN_IO.size == 16 and k.RUN_MMIO.size == 21
    assert ctypes.sizeof(k.kvm_cpuid2(3)) == 8 + 3 * 40
    assert ctypes.sizeof(k.kvm_irq_routing(2)) == 8 + 2 * 48
