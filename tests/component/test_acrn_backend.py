"""The ACRN backend against a recording fake of its ioctl layer: the exact ioctl numbers and
argument bytes of a VM start, a served request and a stop, and every documented errno path.

Expected bytes are packed here by hand from acrn-facts §1.2/§1.4 (whose offsets and numbers
test_abi.py checks against the system header), not with abi.py's own construct definitions.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import trio

from devicemodel.bus import MmioBus, PortBus
from devicemodel.hsm import abi
from devicemodel.hsm.acrn import AcrnHypervisor, LibcIoctlLayer
from devicemodel.hsm.base import HypervisorError, PciDevAssignment, PtdevIntx, VcpuRegs
from devicemodel.ioreq import IoreqServer, new_ioreq_page
from devicemodel.memory import GiB, GuestMemory
from devicemodel.vm import running
from tests.support.acrn_fake import (
    ASSIGN_PCIDEV,
    ATTACH,
    CLEAR_IOREQ,
    CREATE_CLIENT,
    CREATE_VM,
    DEASSIGN_PCIDEV,
    DESTROY_CLIENT,
    DESTROY_VM,
    FREE,
    INJECT_MSI,
    IOEVENTFD,
    IRQFD,
    MMIO,
    NOTIFY,
    PAUSE_VM,
    PORTIO,
    READ,
    RESET_PTDEV_INTR,
    SET_IRQLINE,
    SET_MEMSEG,
    SET_PTDEV_INTR,
    SET_VCPU_REGS,
    SETUP_ASYNCIO,
    SETUP_VM_EVENT_FD,
    SETUP_VM_EVENT_RING,
    SLOT,
    START_VM,
    UNSET_MEMSEG,
    FakeHsm,
    new_hv,
    va_of,
)
from tests.support.fds import open_fds
from tests.support.served import Recorder


async def until(cond, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.001)


# --- a VM start, a served request, a stop -------------------------------------------------


def test_vm_start_exact_ioctls():
    fake, hv = new_hv()
    page = new_ioreq_page()
    mem = GuestMemory(3 * GiB, name="acrn-test")  # 2 GiB lowmem + 1 GiB at 4 GiB (sparse)
    try:
        info = hv.create_vm("vm1", page, vm_flag=abi.GUEST_FLAG_RT, cpu_affinity=0b0110)
        for region in mem.regions:
            hv.set_memseg(region.gpa, region.mm, abi.MEM_ACCESS_RWX | abi.MEM_TYPE_WB)
        hv.create_ioreq_client()
        hv.start_vm()
        low, high = mem.regions
        assert fake.calls == [
            (CREATE_VM, struct.pack("<HHHH16sQQQ", 0, 0, 0, 0, b"vm1", 1 << 4, va_of(page),
                                    0b0110)),
            (SET_MEMSEG, struct.pack("<IIQQQ", 0, 0x47, 0, va_of(low.mm), 2 * GiB)),
            (SET_MEMSEG, struct.pack("<IIQQQ", 0, 0x47, 4 * GiB, va_of(high.mm), 1 * GiB)),
            (CREATE_CLIENT, None),
            (START_VM, None),
        ]
        assert (info.vmid, info.vcpu_num) == (3, 2)
        assert (hv.vmid, hv.vcpu_num) == (3, 2)
        # the "hypervisor" marked the slots FREE through ioreq_buf: it is our page
        assert struct.unpack_from("<I", page, 15 * SLOT + 136)[0] == FREE
        assert fake.opened == ["/dev/acrn_hsm"]
    finally:
        hv.close()
        mem.close()


@pytest.mark.parametrize(
    "rtype,addr,size,answer,value_bytes",
    [
        (PORTIO, 0x512, 2, 0xA1B2C3D4, struct.pack("<I", 0xC3D4)),  # u32 at +24, masked
        (MMIO, 0xC000_0010, 8, 0x1122_3344_5566_7788, struct.pack("<Q", 0x1122_3344_5566_7788)),
    ],
)
async def test_served_request(rtype, addr, size, answer, value_bytes):
    fake, hv = new_hv(FakeHsm(vcpu_num=2))
    page = new_ioreq_page()
    hv.create_vm("vm1", page)
    ports, mmio = PortBus(), MmioBus()
    dev = Recorder(answer=answer)
    ports.register(0x510, 8, dev, "rec")
    mmio.register(0xC000_0000, 0x1000, dev, "rec")
    server = IoreqServer(hv, page, 2, ports, mmio)
    hv.create_ioreq_client()
    hv.start_vm()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        fake.post(1, rtype, READ, addr, size)
        await until(lambda: fake.notified == [1])
        assert fake.slot(1)[88 : 88 + len(value_bytes)] == value_bytes  # the value at +24
        assert page[SLOT + 88 : SLOT + 88 + len(value_bytes)] == value_bytes
        notify = [c for c in fake.calls if c[0] == NOTIFY]
        assert notify == [(NOTIFY, struct.pack("<HHI", 3, 0, 1))]
        assert dev.log == [("r", 2 if rtype == PORTIO else 0x10, size, answer)]
        hv.destroy_ioreq_client()  # wakes ATTACH with -ENODEV: the server returns
    assert fake.attach_waiting == 0
    hv.close()


def test_stop_exact_ioctls():
    fake, hv = new_hv()
    page = new_ioreq_page()
    hv.create_vm("vm1", page)
    hv.create_ioreq_client()
    hv.start_vm()
    fd = next(iter(fake.open_fds))
    del fake.calls[:]
    hv.pause_vm()
    hv.destroy_ioreq_client()
    hv.destroy_vm()
    hv.close()
    assert fake.calls == [(PAUSE_VM, None), (DESTROY_CLIENT, None), (DESTROY_VM, None)]
    assert fake.open_fds == set() and fake.closed_fds == [fd]
    hv.close()  # idempotent: no double close
    with pytest.raises(HypervisorError, match="closed"):
        hv.start_vm()


async def test_vm_runs_end_to_end_on_the_acrn_backend():
    fds_before = open_fds()
    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    dev = Recorder(answer=0x5A)
    async with running(["-m", "128M", "vm1"], hypervisor=hv) as vm:
        assert vm.state == "running" and vm.vcpu_num == 1
        vm.ports.register(0x5F0, 4, dev, "probe")
        fake.post(0, PORTIO, READ, 0x5F1, 1)
        await until(lambda: fake.notified == [0])
        assert fake.slot(0)[88:92] == struct.pack("<I", 0x5A)
    await until(lambda: fake.attach_waiting == 0)
    names = fake.names()
    assert names[:2] == ["CREATE_VM", "SET_MEMSEG"]
    # the ACPI tables ask for the vCPU's P- and C-state counts (acrn-dm's acpi_build)
    assert names[2:4] == ["PM_GET_CPU_STATE", "PM_GET_CPU_STATE"]
    assert names[4:] == ["CREATE_CLIENT", "START_VM", "NOTIFY", "PAUSE_VM", "DESTROY_CLIENT",
                         "DESTROY_VM"]
    assert fake.open_fds == set() and len(fake.closed_fds) == 1
    assert open_fds() - fds_before == set()


# --- errno paths --------------------------------------------------------------------------


async def test_attach_enodev_means_shutdown_and_the_server_exits():
    fake, hv = new_hv()
    page = new_ioreq_page()
    hv.create_vm("vm1", page)
    hv.create_ioreq_client()
    fake.errors[ATTACH] = [errno.ENODEV]
    assert await hv.attach_ioreq_client() is False
    fake.errors[ATTACH] = [errno.ENODEV]
    server = IoreqServer(hv, page, 2, PortBus(), MmioBus())
    with trio.fail_after(5):
        await server.serve()  # returns: no hang
    hv.close()


async def test_attach_eintr_means_rescan():
    fake, hv = new_hv()
    page = new_ioreq_page()
    hv.create_vm("vm1", page)
    hv.create_ioreq_client()
    fake.errors[ATTACH] = [errno.EINTR]
    assert await hv.attach_ioreq_client() is True
    # the server rescans after EINTR and still serves what comes next
    fake.errors[ATTACH] = [errno.EINTR, errno.EINTR]
    server = IoreqServer(hv, page, 2, PortBus(), MmioBus())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        fake.post(0, PORTIO, READ, 0x3F0, 1)
        await until(lambda: fake.notified == [0])
        hv.destroy_ioreq_client()
    assert fake.slot(0)[88:92] == struct.pack("<I", 0xFF)  # unhandled read: all-ones
    assert fake.names(attach=True).count("ATTACH") >= 3
    hv.close()


async def test_attach_other_error_stops_serving_loudly(caplog):
    fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    hv.create_ioreq_client()
    fake.errors[ATTACH] = [errno.EFAULT]
    with caplog.at_level(logging.ERROR):
        assert await hv.attach_ioreq_client() is False
    assert "ATTACH_IOREQ_CLIENT" in caplog.text
    hv.close()


async def test_attach_is_cancellable_and_destroy_wakes_the_thread():
    fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    hv.create_ioreq_client()
    with trio.move_on_after(0.05) as scope:
        await hv.attach_ioreq_client()
    assert scope.cancelled_caught
    assert fake.attach_waiting == 1  # the abandoned thread still sits in the ioctl
    hv.destroy_ioreq_client()
    await until(lambda: fake.attach_waiting == 0)
    hv.close()


async def test_attach_on_a_closed_handle_is_shutdown():
    _fake, hv = new_hv()
    hv.close()
    assert await hv.attach_ioreq_client() is False


def test_create_ioreq_client_twice_is_eexist():
    _fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    hv.create_ioreq_client()
    with pytest.raises(HypervisorError, match="CREATE_IOREQ_CLIENT") as e:
        hv.create_ioreq_client()
    assert e.value.errno == errno.EEXIST
    hv.close()


def test_notify_for_a_vcpu_beyond_vcpu_num_is_einval():
    fake, hv = new_hv(FakeHsm(vcpu_num=2))
    hv.create_vm("vm1", new_ioreq_page())
    hv.notify_request_finish(1)
    with pytest.raises(HypervisorError, match="NOTIFY_REQUEST_FINISH") as e:
        hv.notify_request_finish(2)
    assert e.value.errno == errno.EINVAL
    assert fake.calls[-1] == (NOTIFY, struct.pack("<HHI", 3, 0, 2))
    hv.close()


@pytest.mark.parametrize("err", [errno.EBUSY, errno.EINVAL, errno.ENOMEM])
def test_create_vm_failure_names_the_call(err):
    fake, hv = new_hv()
    fake.errors[CREATE_VM] = [err] * 10
    with pytest.raises(HypervisorError, match=r"CREATE_VM.*" + os.strerror(err)) as e:
        hv.create_vm("vm1", new_ioreq_page())
    assert e.value.errno == err
    assert "vm1" in str(e.value)
    assert fake.names() == ["CREATE_VM"] * 10  # acrn-dm's 10 attempts
    hv.close()


def test_create_vm_retries_like_acrn_dm():
    fake, hv = new_hv()
    fake.errors[CREATE_VM] = [errno.EBUSY, errno.EBUSY]
    assert hv.create_vm("vm1", new_ioreq_page()).vcpu_num == 2
    assert fake.names() == ["CREATE_VM"] * 3
    hv.close()


def test_vm_name_must_fit_the_16_byte_field():
    fake, hv = new_hv()
    with pytest.raises(HypervisorError, match="16"):
        hv.create_vm("a" * 16, new_ioreq_page())
    with pytest.raises(HypervisorError, match="16"):
        hv.create_vm("ü" * 8, new_ioreq_page())  # 16 bytes in UTF-8
    assert fake.calls == []
    hv.create_vm("b" * 15, page := new_ioreq_page())
    assert fake.calls[0][1][8:24] == b"b" * 15 + b"\0"
    assert page is not None
    hv.close()


def test_missing_device_node_is_a_clear_error():
    fake = FakeHsm(nodes=())
    with pytest.raises(HypervisorError) as e:
        AcrnHypervisor(fake)
    msg = str(e.value)
    assert "/dev/acrn_hsm" in msg and "/dev/acrn_vhm" in msg and "--hv sim" in msg
    assert fake.opened == []


def test_permission_denied_names_node_and_fix():
    fake = FakeHsm()
    fake.open_error = PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(HypervisorError, match=r"/dev/acrn_hsm: permission denied.*root") as e:
        AcrnHypervisor(fake)
    assert e.value.errno == errno.EACCES


def test_old_node_name_is_preferred_as_in_acrn_dm():
    fake = FakeHsm(nodes=("/dev/acrn_vhm", "/dev/acrn_hsm"))
    hv = AcrnHypervisor(fake)
    assert fake.opened == ["/dev/acrn_vhm"] and hv.node == "/dev/acrn_vhm"
    hv.close()


def test_real_layer_opens_the_node_read_write_cloexec(tmp_path):
    node = tmp_path / "acrn_hsm"
    node.write_bytes(b"")
    hv = AcrnHypervisor(nodes=(str(tmp_path / "acrn_vhm"), str(node)))
    fdinfo = Path(f"/proc/self/fdinfo/{hv._fd}").read_text()
    flags = int(fdinfo.split("flags:")[1].split()[0], 8)
    assert flags & os.O_ACCMODE == os.O_RDWR and flags & os.O_CLOEXEC
    hv.close()


def test_fork_only_ioctls_enotty_is_ignored(caplog):
    fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    with caplog.at_level(logging.WARNING):
        assert hv.setup_asyncio(0x7F12_3456_7000) is False
        assert hv.setup_vm_event_ring(0x7F12_3456_8000) is False
        assert hv.setup_vm_event_fd(9) is False
    assert caplog.text.count("not supported by this kernel") == 3
    assert fake.calls[1:] == [
        (SETUP_ASYNCIO, 0x7F12_3456_7000),  # by value, as acrn-dm passes them
        (SETUP_VM_EVENT_RING, 0x7F12_3456_8000),
        (SETUP_VM_EVENT_FD, 9),
    ]
    fake.supported_fork_only = {SETUP_ASYNCIO}
    assert hv.setup_asyncio(0x1000) is True
    hv.close()


@pytest.mark.parametrize(
    "gsi,op,raw",
    [
        (4, abi.GSI_SET_HIGH, 0x0000_0000_0000_0004),
        (4, abi.GSI_SET_LOW, 0x0000_0001_0000_0004),
        (5, abi.GSI_RAISING_PULSE, 0x0000_0002_0000_0005),
        (47, abi.GSI_FALLING_PULSE, 0x0000_0003_0000_002F),
    ],
)
def test_irqline_is_passed_by_value(gsi, op, raw):
    fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    hv.set_irqline(gsi, op)
    assert fake.calls[-1] == (SET_IRQLINE, raw)
    assert isinstance(fake.calls[-1][1], int)
    hv.close()


def test_libc_layer_passes_a_u64_above_2_31_by_value():
    """fcntl.ioctl would overflow here; the libc layer hands the full 64 bits to ioctl(2)."""
    seen = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
    def fake_ioctl(fd, request, arg):
        seen.append((fd, request, arg))
        return 0

    layer = LibcIoctlLayer()
    layer._ioctl = fake_ioctl
    assert layer.ioctl(7, SET_IRQLINE, 0x0000_0003_0000_002F) == (0, None)
    assert layer.ioctl(7, SET_IRQLINE, 0xFFFF_FFFF_FFFF_FFFF) == (0, None)
    assert seen == [(7, SET_IRQLINE, 0x3_0000_002F), (7, SET_IRQLINE, 0xFFFF_FFFF_FFFF_FFFF)]


def test_libc_layer_reports_errno_from_the_kernel():
    r, w = os.pipe()
    try:
        layer = LibcIoctlLayer()
        ret, out = layer.ioctl(r, CREATE_VM, bytes(48))
        assert ret == -errno.ENOTTY and out == bytes(48)
        assert layer.ioctl(r, START_VM)[0] == -errno.ENOTTY
    finally:
        os.close(r)
        os.close(w)


# --- the other calls' argument bytes -----------------------------------------------------


def test_set_vcpu_regs_bytes():
    fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    regs = VcpuRegs(
        rip=0xFFF0, rsp=0x7000, rflags=0x2, cr0=0x6000_0010, cr3=0x1000, cr4=0x20,
        ia32_efer=0x500, cs_base=0xFFFF_0000, cs_limit=0xFFFF, cs_ar=0x9B, cs_sel=0xF000,
        ss_sel=0x18, ds_sel=0x18, es_sel=0x18, fs_sel=0x18, gs_sel=0x18, ldt_sel=0, tr_sel=0x20,
        gdt_base=0x2000, gdt_limit=0x27, idt_base=0x3000, idt_limit=0xFF,
        gprs={"rsi": 0x9_0000, "rbx": 7},
    )
    hv.set_vcpu_regs(0, regs)
    want = bytearray(296)
    r = 8  # struct acrn_regs inside acrn_vcpu_regs
    struct.pack_into("<Q", want, r + 8 * 3, 7)  # rbx
    struct.pack_into("<Q", want, r + 8 * 4, 0x7000)  # rsp
    struct.pack_into("<Q", want, r + 8 * 6, 0x9_0000)  # rsi
    struct.pack_into("<HQ", want, r + 128, 0x27, 0x2000)  # gdt (packed)
    struct.pack_into("<HQ", want, r + 144, 0xFF, 0x3000)  # idt
    struct.pack_into("<7Q", want, r + 160, 0xFFF0, 0xFFFF_0000, 0x6000_0010, 0x20, 0x1000,
                     0x500, 0x2)  # rip cs_base cr0 cr4 cr3 efer rflags
    struct.pack_into("<II", want, r + 248, 0x9B, 0xFFFF)  # cs_ar, cs_limit
    struct.pack_into("<8H", want, r + 268, 0xF000, 0x18, 0x18, 0x18, 0x18, 0x18, 0, 0x20)
    assert fake.calls[-1] == (SET_VCPU_REGS, bytes(want))
    with pytest.raises(HypervisorError, match="unknown registers"):
        hv.set_vcpu_regs(0, VcpuRegs(gprs={"eax": 1}))
    hv.close()


def test_interrupt_fast_path_and_passthrough_bytes():
    fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    del fake.calls[:]
    hv.inject_msi(0xFEE0_1000, 0x4031)
    hv.ioeventfd(11, 0xC000_1000, 4, pio=False, datamatch=2)
    hv.ioeventfd(12, 0x6040, 2, pio=True, deassign=True)
    hv.irqfd(13, 0xFEE0_0000, 0x41)
    hv.irqfd(13, 0xFEE0_0000, 0x41, deassign=True)
    dev = PciDevAssignment(virt_bdf=0x0028, phys_bdf=0x0300, intr_line=10, intr_pin=1,
                           bars=(0xF000_0000, 0, 0xE000, 0, 0, 0), quirk=True)
    hv.assign_pcidev(dev)
    hv.deassign_pcidev(dev)
    intx = PtdevIntx(virt_bdf=0x0028, phys_bdf=0x0300, virt_pin=10, phys_pin=16,
                     is_pic_pin=True)
    hv.set_ptdev_intr(intx)
    hv.reset_ptdev_intr(intx)
    hv.unset_mmio(0xF000_0000, 0x1000)
    hv.clear_vm_ioreq()
    pcidev = struct.pack("<IHHBB2x6I", 1, 0x28, 0x300, 10, 1, 0xF000_0000, 0, 0xE000, 0, 0, 0)
    assert fake.calls == [
        (INJECT_MSI, struct.pack("<QQ", 0xFEE0_1000, 0x4031)),
        (IOEVENTFD, struct.pack("<IIQIIQ", 11, 0x2, 0xC000_1000, 4, 0, 2)),
        (IOEVENTFD, struct.pack("<IIQIIQ", 12, 0x1 | 0x4, 0x6040, 2, 0, 0)),
        (IRQFD, struct.pack("<iIQQ", 13, 0, 0xFEE0_0000, 0x41)),
        (IRQFD, struct.pack("<iIQQ", 13, 1, 0xFEE0_0000, 0x41)),
        (ASSIGN_PCIDEV, pcidev),
        (DEASSIGN_PCIDEV, pcidev),
        (SET_PTDEV_INTR, struct.pack("<IHHIII", 0, 0x28, 0x300, 10, 16, 1)),
        (RESET_PTDEV_INTR, struct.pack("<IHHIII", 0, 0x28, 0x300, 10, 0, 1)),
        (UNSET_MEMSEG, struct.pack("<IIQQQ", 1, 7, 0xF000_0000, 0, 0x1000)),
        (CLEAR_IOREQ, None),
    ]
    assert hv.supports_eventfds and hv.emulates_passthrough_config
    hv.close()


def test_reset_sequence_order():
    fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    hv.start_vm()
    del fake.calls[:]
    hv.reset(  # the callbacks leave their marks in the same record as the ioctls
        reset_devices=lambda: fake.calls.append(("devices reset", None)),
        reload=lambda: fake.calls.append(("reloaded", None)) or VcpuRegs(rip=0xFFF0),
    )
    assert fake.names() == ["PAUSE_VM", "CLEAR_IOREQ", "devices reset", "RESET_VM", "reloaded",
                            "SET_VCPU_REGS", "START_VM"]
    hv.close()


def test_a_failing_reset_step_raises_and_stops_the_sequence():
    fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    fake.errors[CLEAR_IOREQ] = [errno.EINVAL]
    called = []
    with pytest.raises(HypervisorError, match="CLEAR_VM_IOREQ"):
        hv.reset(reset_devices=lambda: called.append(1), reload=lambda: None)
    assert called == [] and fake.names()[-1] == "CLEAR_IOREQ"
    hv.close()


def test_close_destroys_a_live_client_first_so_attach_wakes():
    fake, hv = new_hv()
    hv.create_vm("vm1", new_ioreq_page())
    hv.create_ioreq_client()
    hv.close()
    assert fake.names()[-1] == "DESTROY_CLIENT" and fake.open_fds == set()


@pytest.mark.skipif(any(os.path.exists(p) for p in ("/dev/acrn_hsm", "/dev/acrn_vhm")),
                    reason="this machine has an HSM node")
def test_acrn_backend_without_hsm_on_this_machine():
    from devicemodel.hsm import open_hypervisor

    with pytest.raises(HypervisorError, match="no ACRN HSM device"):
        open_hypervisor("acrn")


# --- the waiter thread: one long-lived thread in ATTACH, answers on it when it can ---------


class ThreadRecorder(Recorder):
    """Records which thread answered each access."""

    def __init__(self, answer: int, *, safe: bool) -> None:
        super().__init__(answer=answer)
        self.vcpu_safe = safe
        self.threads: list[int] = []

    def read(self, offset: int, size: int) -> int:
        self.threads.append(threading.get_ident())
        return super().read(offset, size)


async def _serve_posts(fake: FakeHsm, hv: AcrnHypervisor, dev: ThreadRecorder, n: int) -> None:
    page = new_ioreq_page()
    hv.create_vm("vm1", page)
    ports = PortBus()
    ports.register(0x510, 8, dev, "rec")
    server = IoreqServer(hv, page, 2, ports, MmioBus())
    hv.create_ioreq_client()
    hv.start_vm()
    def guest() -> None:  # the vCPUs, on another thread as the real ones are
        for i in range(n):
            fake.post(i % 2, PORTIO, READ, 0x512, 1)
            deadline = time.monotonic() + 5
            while len(fake.notified) != i + 1:
                assert time.monotonic() < deadline, "request not completed"
                time.sleep(0.0002)
            assert fake.slot(i % 2)[88] == 0x5A

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        await trio.to_thread.run_sync(guest)
        hv.destroy_ioreq_client()


async def test_a_vcpu_safe_handler_is_answered_on_the_waiter_thread_without_the_loop():
    fake, hv = new_hv(FakeHsm(vcpu_num=2))
    dev = ThreadRecorder(0x5A, safe=True)
    threads_before = threading.active_count()
    await _serve_posts(fake, hv, dev, 40)
    # the loop sleeps while the guest thread posts: the waiter answers (the loop only
    # when it happened to be awake, e.g. at the start)
    loop = threading.get_ident()
    waiter_threads = set(dev.threads) - {loop}
    assert len(waiter_threads) == 1 and dev.threads.count(loop) <= 2
    assert fake.notified == [i % 2 for i in range(40)]
    notify = [arg for req, arg in fake.calls if req == NOTIFY]
    assert notify[:2] == [struct.pack("<HHI", 3, 0, 0), struct.pack("<HHI", 3, 0, 1)]
    assert threading.active_count() <= threads_before + 1  # no thread per request
    hv.close()


async def test_a_handler_on_the_loop_gets_one_wake_per_request_from_one_thread():
    fake, hv = new_hv(FakeHsm(vcpu_num=2))
    dev = ThreadRecorder(0x5A, safe=False)
    attach_threads: set[int] = set()
    orig = fake._attach

    def attach():
        attach_threads.add(threading.get_ident())
        return orig()

    fake._attach = attach  # type: ignore[method-assign]
    await _serve_posts(fake, hv, dev, 40)
    assert set(dev.threads) == {threading.get_ident()}  # the loop answered
    assert len(attach_threads) == 1  # one long-lived waiter, not a thread per wake
    hv.close()


async def test_a_notify_failure_on_the_waiter_thread_stops_the_server_as_on_the_loop():
    fake, hv = new_hv(FakeHsm(vcpu_num=2))
    page = new_ioreq_page()
    hv.create_vm("vm1", page)
    ports = PortBus()
    ports.register(0x510, 8, ThreadRecorder(0x5A, safe=True), "rec")
    server = IoreqServer(hv, page, 2, ports, MmioBus())
    hv.create_ioreq_client()
    fake.errors[NOTIFY] = [errno.EINVAL]
    with pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            await trio.to_thread.run_sync(fake.post, 0, PORTIO, READ, 0x512, 1)
            with trio.fail_after(5):
                await trio.sleep_forever()
    (error,) = caught.value.exceptions
    assert isinstance(error, HypervisorError) and "NOTIFY_REQUEST_FINISH" in str(error)
    hv.close()
