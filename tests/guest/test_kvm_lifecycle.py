"""The KVM backend's VM lifecycle with real guests: stops it decides itself (halt with
interrupts off, triple fault), SMP start-up, pause/start, ACRN's reset sequence, and no
thread or fd left behind."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import trio

from devicemodel.guestkit.kvm_programs import (
    LOAD_ADDR,
    VERDICT_PASS,
    GuestRun,
    build,
    kvm_skip_reason,
    pm32_regs,
    run_guest,
)
from devicemodel.hsm import default_backend, open_hypervisor
from devicemodel.hsm import kvm as kvm_mod
from devicemodel.hsm.base import HypervisorError
from devicemodel.hsm.kvm import KvmHypervisor, kvm_usable, runner, watchdog
from tests.support.fds import open_fds

SKIP = kvm_skip_reason()
needs_kvm = pytest.mark.skipif(SKIP is not None, reason=f"no usable KVM: {SKIP}")
LOOP_PORT = 0xE4
AP_PORT = 0xE3


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("guests")
    return {n: build(n, out)[1] for n in ("smp", "halt", "crash", "loop", "msi")}


def vcpu_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "-vcpu" in t.name]


class Values:
    """A port that records every value written to it and calls ``on_write`` after."""

    def __init__(self, on_write=None) -> None:
        self.values: list[int] = []
        self.on_write = on_write

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.values.append(value)
        if self.on_write is not None:
            self.on_write(value)


@needs_kvm
async def test_smp_start_up_and_every_thread_and_fd_released(images):
    before = open_fds()
    ap, bsp_loop, ap_loop = Values(), Values(), Values()

    def setup(run: GuestRun) -> None:
        run.vm.ports.register(AP_PORT, 1, ap, "ap")
        run.vm.ports.register(0xE6, 1, bsp_loop, "bsp-loop")
        run.vm.ports.register(0xE7, 1, ap_loop, "ap-loop")

    run = await run_guest(images["smp"], vcpus=2, setup=setup)
    assert run.verdict == VERDICT_PASS, (run.uart.text, run.exit_reason)
    assert run.uart.text == "bsp apic 00\nap up\nboth loops done\n"
    assert ap.values == [1]  # the AP ran and read its own APIC id, 1
    # two vCPUs with requests in flight at once: each sequence whole and in order
    assert bsp_loop.values == list(range(200)) and ap_loop.values == list(range(200))
    assert run.hv.state == "destroyed"
    # the AP was left in `cli; hlt` inside KVM_RUN: it had to be kicked out
    assert vcpu_threads() == []
    assert open_fds() - before == set()


@needs_kvm
async def test_halt_with_interrupts_off_stops_the_vm(images):
    t0 = time.monotonic()
    run = await run_guest(images["halt"], timeout=20)
    assert run.uart.text == "halting\n"
    assert run.verdict is None
    assert run.exit_reason == "every vCPU halted with interrupts disabled"
    assert time.monotonic() - t0 < 10 * watchdog.HALT_CHECK_INTERVAL
    assert vcpu_threads() == []


@needs_kvm
async def test_triple_fault_stops_the_vm_with_the_reason(images):
    run = await run_guest(images["crash"], timeout=20)
    assert run.uart.text == "crashing\n"
    assert run.verdict is None
    assert run.exit_reason is not None and "shutdown (triple fault)" in run.exit_reason


@needs_kvm
async def test_poweroff_of_a_guest_sleeping_in_hlt(images):
    # nobody answers the msi guest's request: it sleeps in `sti; hlt` until we power off
    run = await run_guest(images["msi"], timeout=1.0)
    assert run.verdict is None and run.exit_reason is None
    assert run.hv.state == "destroyed"
    assert vcpu_threads() == []


@needs_kvm
async def test_pause_holds_the_guest_and_start_resumes_it(images):
    paused_at: list[int] = []
    port = Values()

    def setup(run: GuestRun) -> None:
        def on_write(value: int) -> None:
            if value == 10:
                run.hv.pause_vm()
                paused_at.append(len(port.values))

        port.on_write = on_write
        run.vm.ports.register(LOOP_PORT, 4, port, "loop")

    async def during(run: GuestRun) -> None:
        while not paused_at:
            await trio.sleep(0.01)
        await trio.sleep(0.3)
        assert len(port.values) == paused_at[0]  # nothing ran while paused
        assert run.hv.state == "paused"
        run.hv.start_vm()

    run = await run_guest(images["loop"], setup=setup, during=during)
    assert run.verdict == VERDICT_PASS, (run.uart.text, run.exit_reason)
    assert port.values == list(range(50))


@needs_kvm
async def test_acrn_reset_sequence_runs_the_guest_again(images, monkeypatch):
    """acrn-facts §1.5: hold the triggering request, PAUSE, CLEAR_VM_IOREQ, RESET_VM,
    reload, SET_VCPU_REGS, START: the guest starts from its entry point again."""
    trigger = trio.Event()
    port = Values()

    def setup(run: GuestRun) -> None:
        def on_write(value: int) -> None:
            if value == 10 and not trigger.is_set():
                assert run.vm.server is not None
                run.vm.server.hold_completion = True
                trigger.set()

        port.on_write = on_write
        run.vm.ports.register(LOOP_PORT, 4, port, "loop")

    async def during(run: GuestRun) -> None:
        await trigger.wait()
        hv, server = run.hv, run.vm.server
        # (IoreqServer rescans a held slot until the reset runs: it may be listed twice)
        assert server is not None and set(server.held) == {0}
        hv.pause_vm()
        # without CLEAR_VM_IOREQ the vCPU still holds its request: RESET_VM refuses
        monkeypatch.setattr(runner, "PARK_TIMEOUT", 0.2)
        with pytest.raises(HypervisorError, match="holds a request"):
            hv.reset_vm()
        hv.clear_vm_ioreq()
        server.held.clear()
        server.hold_completion = False
        hv.reset_vm()
        assert run.vm.memory is not None
        run.vm.memory.write(LOAD_ADDR, images["loop"])
        hv.set_vcpu_regs(0, pm32_regs(LOAD_ADDR))
        hv.start_vm()

    run = await run_guest(images["loop"], setup=setup, during=during)
    assert run.verdict == VERDICT_PASS, (run.uart.text, run.exit_reason)
    values = port.values
    assert values[:11] == list(range(11)) and values[-50:] == list(range(50))
    assert set(values[11:-50]) <= {10}  # see above: the held write may be seen again
    assert run.uart.text == "loop start\nloop start\nloop end\n"


def test_default_backend_prefers_acrn_then_kvm_then_sim(monkeypatch):
    import devicemodel.hsm as hsm

    monkeypatch.setattr(hsm, "acrn_present", lambda: True)
    assert default_backend() == "acrn"
    monkeypatch.setattr(hsm, "acrn_present", lambda: False)
    monkeypatch.setattr(kvm_mod, "kvm_usable", lambda device=None: None)
    assert default_backend() == "kvm"
    monkeypatch.setattr(kvm_mod, "kvm_usable", lambda device=None: "no /dev/kvm")
    assert default_backend() == "sim"


def test_kvm_usable_names_the_problem(tmp_path):
    assert "No such file" in (kvm_usable(str(tmp_path / "kvm")) or "")


@needs_kvm
def test_hv_kvm_selects_the_kvm_backend():
    hv = open_hypervisor("kvm")
    assert isinstance(hv, KvmHypervisor) and hv.name == "kvm"
    hv.close()


@needs_kvm
def test_set_vcpu_regs_builds_segments_as_acrn_does():
    """ACRN's SET_VCPU_REGS takes CS from cs_ar/cs_base/cs_limit and derives every data
    segment from CR0.PE; KVM must end up holding exactly that."""
    from devicemodel.hsm.base import VcpuRegs
    from devicemodel.hsm.kvm import ioctl
    from devicemodel.hsm.kvm import uapi as k
    from devicemodel.ioreq import new_ioreq_page

    hv = KvmHypervisor()
    page = new_ioreq_page()
    hv.create_vm("regs", page, cpu_affinity=0b11)
    try:
        regs = pm32_regs(0x10_0000, esp=0x9000)
        regs.gprs = {"rax": 0x2BADB002, "rbx": 0x1234}
        regs.gdt_base, regs.gdt_limit = 0x5000, 0x17
        hv.set_vcpu_regs(0, regs)
        sregs, kregs = k.KvmSregs(), k.KvmRegs()
        fd = hv.vcpu(0).fd
        ioctl(fd, k.KVM_GET_SREGS, sregs)
        ioctl(fd, k.KVM_GET_REGS, kregs)
        cs, ds, ss = sregs.cs, sregs.ds, sregs.ss
        assert (cs.base, cs.limit, cs.selector, cs.type, cs.s, cs.present, cs.db, cs.g) == (
            0, 0xFFFF_FFFF, 0x08, 0xB, 1, 1, 1, 1)
        for seg in (ds, ss, sregs.es, sregs.fs, sregs.gs):
            assert (seg.base, seg.limit, seg.selector, seg.type, seg.db, seg.g) == (
                0, 0xFFFF_FFFF, 0x10, 0x3, 1, 1)
        assert sregs.tr.type == 0xB and sregs.ldt.type == 0x2
        assert (sregs.gdt.base, sregs.gdt.limit) == (0x5000, 0x17)
        assert sregs.cr0 & 1
        assert (kregs.rip, kregs.rsp, kregs.rax, kregs.rbx) == (0x10_0000, 0x9000,
                                                               0x2BADB002, 0x1234)
        # real mode (CR0.PE clear): data segments get limit 0xFFFF and AR 0x93
        hv.set_vcpu_regs(1, VcpuRegs(rip=0xFFF0, cs_base=0xFFFF_0000, cs_sel=0xF000))
        ioctl(hv.vcpu(1).fd, k.KVM_GET_SREGS, sregs)
        assert (sregs.cs.base, sregs.cs.selector, sregs.cs.limit) == (0xFFFF_0000, 0xF000,
                                                                      0xFFFF)
        assert (sregs.ds.limit, sregs.ds.type, sregs.ds.db) == (0xFFFF, 0x3, 0)
        with pytest.raises(HypervisorError, match="unknown register"):
            hv.set_vcpu_regs(0, VcpuRegs(gprs={"eax": 1}))
        with pytest.raises(HypervisorError, match="no vCPU 2"):
            hv.set_vcpu_regs(2, VcpuRegs())
        with pytest.raises(HypervisorError, match="no vCPU 2"):
            hv.vcpu(2)
    finally:
        hv.destroy_vm()
        page.close()


@needs_kvm
def test_eventfd_and_irqline_calls_follow_the_hsm_errors(caplog):
    from devicemodel.hsm import abi
    from devicemodel.ioreq import new_ioreq_page

    hv = KvmHypervisor()
    page = new_ioreq_page()
    hv.create_vm("calls", page)
    a, b = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
    try:
        hv.ioeventfd(a, 0x2000, 2, pio=True)
        with pytest.raises(HypervisorError) as e:
            hv.ioeventfd(a, 0x2000, 2, pio=True)
        assert e.value.errno == errno.EEXIST
        hv.ioeventfd(a, 0x2000, 2, pio=True, datamatch=5)  # other data: a new registration
        with pytest.raises(HypervisorError) as e:
            hv.ioeventfd(a, 0x2000, 3, pio=True)
        assert e.value.errno == errno.EINVAL
        hv.ioeventfd(a, 0x2000, 2, pio=True, deassign=True)
        with pytest.raises(HypervisorError) as e:
            hv.ioeventfd(a, 0x2000, 2, pio=True, deassign=True)
        assert e.value.errno == errno.ENOENT
        hv.irqfd(b, 0xFEE0_0000, 0x45)
        with pytest.raises(HypervisorError) as e:
            hv.irqfd(b, 0xFEE0_0000, 0x45)
        assert e.value.errno == errno.EEXIST
        hv.irqfd(b, 0, 0, deassign=True)
        with pytest.raises(HypervisorError) as e:
            hv.irqfd(b, 0, 0, deassign=True)
        assert e.value.errno == errno.ENOENT
        hv.inject_msi(0xFEE0_0000, 0x40)
        for op in (abi.GSI_SET_HIGH, abi.GSI_SET_LOW, abi.GSI_RAISING_PULSE,
                   abi.GSI_FALLING_PULSE):
            hv.set_irqline(16, op)
        with pytest.raises(HypervisorError) as e:
            hv.set_irqline(16, 7)
        assert e.value.errno == errno.EINVAL
        hv.set_irqline(40, abi.GSI_SET_HIGH)  # ACRN has 48 pins, KVM 24: dropped, said once
        hv.set_irqline(40, abi.GSI_SET_LOW)
        assert sum("GSI 40" in r.getMessage() for r in caplog.records) == 1
        with pytest.raises(HypervisorError):
            hv.set_irqline(48, abi.GSI_SET_HIGH)
    finally:
        hv.destroy_vm()
        os.close(a)
        os.close(b)
        page.close()
    with pytest.raises(HypervisorError):
        hv.inject_msi(0xFEE0_0000, 0x40)  # no VM any more


@needs_kvm
def test_a_vm_that_faults_makes_the_process_fail(tmp_path):
    """A guest that triple-faults is a failure the caller (systemd, a script) must see:
    one error line naming the reason and a non-zero exit, not a clean power-off."""
    import subprocess
    import sys

    elf = build("crash", tmp_path)[0]
    proc = subprocess.run(
        [sys.executable, "-m", "devicemodel", "--hv", "kvm", "-m", "128M", "-E", str(elf),
         "-s", "1:0,lpc", "-l", "com1,stdio", "crashvm"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr  # restartable, unlike a config error (2)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("acrn-pydm: error:")]
    assert len(errors) == 1 and "triple fault" in errors[0], proc.stderr
    assert "crashing" in proc.stdout
