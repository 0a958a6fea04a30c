"""The HSM calls issue 16 adds, on the ACRN backend against the recording fake, each one's
bytes judged by gcc against linux/acrn.h: CREATE_VDEV/DESTROY_VDEV (the hypervisor's PCI
vUART and ivshmem), ASSIGN/DEASSIGN_MMIODEV (``--mmiodev_pt``, ``--acpidev_pt``),
CREATE_VM's real-time flags, PM_GET_CPU_STATE (the guest's _PSS/_CST, judged by ``iasl -d``)
and VM_INTR_MONITOR (the interrupt storm monitor). Then the sim backend presenting the
hypervisor's devices to its guest, and the device model's own ivshmem.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from devicemodel.config import parse_args
from devicemodel.hsm import abi
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.ioreq import new_ioreq_page
from devicemodel.vm import running
from devicemodel.vmm import mmio_devices
from devicemodel.vmm.intr_monitor import StormMonitor
from tests.support.acrn_fake import (
    ASSIGN_MMIODEV,
    CREATE_VDEV,
    CREATE_VM,
    DEASSIGN_MMIODEV,
    DESTROY_VDEV,
    PM_GET_CPU_STATE,
    VM_INTR_MONITOR,
    FakeHsm,
    new_hv,
)
from tests.support.cabi import gcc_struct_bytes, gcc_values, needs_gcc

IASL = shutil.which("iasl")
MiB = 1 << 20


def _bar(vm, dev: int, idx: int) -> int:
    return vm.devices[(0, dev, 0)].cfg.get32(0x10 + 4 * idx)


def _args_of(fake: FakeHsm, request: int) -> list[bytes]:
    return [arg for req, arg in fake.calls if req == request]


@needs_gcc
async def test_hypervisor_devices_and_mmio_devices_bytes(tmp_path):
    """acrn-dm's uart.c, ivshmem.c and mmio/core.c fill these structs so: BAR registers
    as the bus placed them (ivshmem's BAR2 with the 64-bit prefetchable bits), the region
    name with its hv:/ prefix and its size, the vUART index as a u32, the MMIO range at a
    guest address from 0xF0000000. DESTROY sends the same bytes when the VM goes."""
    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    args = ["-m", "256M", "-s", "0:0,hostbridge", "-s", "8,ivshmem,hv:/shm_region_0,2,7",
            "-s", "16,uart,vuart_idx:1", "--mmiodev_pt", "0xfed40000,0x5000", "--rtvm", "vm1"]
    async with running(args, hv) as vm:
        iv = [_bar(vm, 8, i) for i in range(4)]
        vu = [_bar(vm, 16, i) for i in range(2)]
    c = gcc_struct_bytes(tmp_path, {
        "ivshmem": ("acrn_vdev", [
            "id.fields.vendor = 0x1af4", "id.fields.device = 0x1110", "slot = 8 << 3",
            f"io_addr[0] = {iv[0]:#x}", f"io_addr[1] = {iv[1]:#x}",
            f"io_addr[2] = {iv[2]:#x} | 0xc", f"io_addr[3] = {iv[3]:#x}",
            f"io_size[2] = {2 * MiB:#x}", 'memcpy(V.args, "hv:/shm_region_0", 16)']),
        "vuart": ("acrn_vdev", [
            "id.fields.vendor = 0x9710", "id.fields.device = 0x9900", "slot = 16 << 3",
            f"io_addr[0] = {vu[0]:#x}", f"io_addr[1] = {vu[1]:#x}",
            "args[0] = 1"]),
        "mmiodev": ("acrn_mmiodev", [
            'name[0] = \'M\'', 'name[1] = \'M\'', 'name[2] = \'I\'', 'name[3] = \'O\'',
            'name[4] = \'D\'', 'name[5] = \'E\'', 'name[6] = \'V\'',
            "res[0].user_vm_pa = 0xf0000000", "res[0].service_vm_pa = 0xfed40000",
            "res[0].size = 0x5000"]),
    })
    assert iv[0] and iv[1] and iv[2] & 0x4 and vu[0] and vu[1]
    assert _args_of(fake, CREATE_VDEV) == [c["ivshmem"], c["vuart"]]
    assert sorted(_args_of(fake, DESTROY_VDEV)) == sorted([c["ivshmem"], c["vuart"]])
    assert _args_of(fake, ASSIGN_MMIODEV) == [c["mmiodev"]]
    assert _args_of(fake, DEASSIGN_MMIODEV) == [c["mmiodev"]]
    # --rtvm: acrn-dm's vm_create sets LAPIC_PASSTHROUGH, RT, IO_COMPLETION_POLLING, PMU
    flags = gcc_values(tmp_path, {"rt": "GUEST_FLAG_LAPIC_PASSTHROUGH | GUEST_FLAG_RT | "
                                        "GUEST_FLAG_IO_COMPLETION_POLLING | "
                                        "GUEST_FLAG_PMU_PASSTHROUGH"}) \
        if "GUEST_FLAG_RT" in Path("/usr/include/linux/acrn.h").read_text() else \
        {"rt": (1 << 1) | (1 << 4) | (1 << 2) | (1 << 11)}
    (create,) = _args_of(fake, CREATE_VM)
    assert struct.unpack_from("<Q", create, 24)[0] == flags["rt"]
    numbers = gcc_values(tmp_path, {n: f"ACRN_IOCTL_{n}" for n in (
        "CREATE_VDEV", "DESTROY_VDEV", "ASSIGN_MMIODEV", "DEASSIGN_MMIODEV",
        "PM_GET_CPU_STATE", "VM_INTR_MONITOR")})
    assert (numbers["CREATE_VDEV"], numbers["DESTROY_VDEV"]) == (CREATE_VDEV, DESTROY_VDEV)
    assert (numbers["ASSIGN_MMIODEV"], numbers["DEASSIGN_MMIODEV"]) == (ASSIGN_MMIODEV,
                                                                        DEASSIGN_MMIODEV)
    assert (numbers["PM_GET_CPU_STATE"], numbers["VM_INTR_MONITOR"]) == (PM_GET_CPU_STATE,
                                                                         VM_INTR_MONITOR)


@needs_gcc
@pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
async def test_cpu_power_states_become_pss_and_cst(tmp_path):
    """PM_GET_CPU_STATE as acrn-dm's acpi_pm.c asks (the command word in, the answer in
    the same buffer), and the DSDT iasl reads back: _PSS with the hypervisor's P-states,
    _CST with its C-states, _PPC and _PCT for vCPU 0, references for vCPU 1."""
    px_c = [f"core_frequency = {f}" for f in (2400, 1800, 800)]
    items = {f"px{i}": ("acrn_pstate_data", [px_c[i], f"power = {15000 - 5000 * i}",
                                             "transition_latency = 10",
                                             "bus_master_latency = 10",
                                             f"control = {0x1800 - 0x400 * i:#x}",
                                             f"status = {0x1800 - 0x400 * i:#x}"])
             for i in range(3)}
    items |= {f"cx{i}": ("acrn_cstate_data", [
        "cx_reg.space_id = 0x7f", "cx_reg.bit_width = 1", "cx_reg.bit_offset = 2",
        "cx_reg.access_size = 1", f"cx_reg.address = {0x10 * i:#x}", f"type = {i + 1}",
        f"latency = {1 + 50 * i}", f"power = {1000 - 500 * i}"]) for i in range(2)}
    packed = gcc_struct_bytes(tmp_path, items)
    fake = FakeHsm(vcpu_num=2)
    fake.px = [packed[f"px{i}"] for i in range(3)]
    fake.cx = [packed[f"cx{i}"] for i in range(2)]
    fake, hv = new_hv(fake)
    async with running(["-m", "256M", "--cpu_affinity", "0,1", "-s", "0:0,hostbridge",
                        "vm1"], hv) as vm:
        dsdt = vm.platform.tables[0xF2400 + 0x1100]
    words = gcc_values(tmp_path, {
        "px2": "(3ULL << 24) | (1ULL << 16) | (2ULL << 8) | ACRN_PMCMD_GET_PX_DATA",
        "cx1": "(3ULL << 24) | (0ULL << 16) | (1ULL << 8) | ACRN_PMCMD_GET_CX_DATA",
        "pxsize": "sizeof(struct acrn_pstate_data)", "cxsize": "sizeof(struct acrn_cstate_data)"})
    calls = _args_of(fake, PM_GET_CPU_STATE)
    sent = {struct.unpack_from("<Q", a)[0]: len(a) for a in calls}
    assert sent[words["px2"]] >= words["pxsize"] and sent[words["cx1"]] >= words["cxsize"]
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    proc = subprocess.run([IASL, "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'Name (_HID, "ACPI0007"' in dsl and "Device (PR01)" in dsl
    for freq in ("0x0960", "0x0708", "0x0320"):  # 2400, 1800, 800 MHz
        assert freq in dsl
    assert dsl.count("Method (_PSS") == 2 and dsl.count("Method (_CST") == 2
    assert "Register (FFixedHW" in dsl and "Name (_PPC, Zero)" in dsl
    assert "Return (^^PR00._PPC)" in dsl and "Return (^^PR00._PCT" in dsl


async def test_zero_p_states_give_cpc_and_no_data_gives_bare_processors(tmp_path):
    """A hypervisor reporting 0 P-states means the CPU scales itself: _CPC (acrn-dm);
    the KVM backend reports nothing: processor devices only."""
    sim = SimHypervisor()
    async with running(["-m", "256M", "-s", "0:0,hostbridge", "vm1"], sim) as vm:
        dsdt = vm.platform.tables[0xF2400 + 0x1100]
    assert b"_CPC" in dsdt and b"_PSS" not in dsdt and b"ACPI0007" in dsdt
    from devicemodel.platform.acpi_pm import processor_objects, query_states

    def nothing(cmd: int, size: int) -> bytes:
        raise OSError("no PM data")

    bare = processor_objects([query_states(nothing, 0, 0)])
    assert b"ACPI0007" in bare and b"_CPC" not in bare and b"_CST" not in bare


async def test_storm_monitor_delays_a_storming_interrupt(autojump_clock):
    """monitor.c's loop through VM_INTR_MONITOR: the page's address goes by value; a count
    that grew past threshold × period gets DELAY_INT with the delay, then 0."""
    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    hv.create_vm("vm1", new_ioreq_page())
    setting = parse_args(["--intr_monitor", "100,2,3,400", "vm"]).intr_monitor
    monitor = StormMonitor(hv, setting)
    fake.intr_counts = [(44, 1000), (45, 10)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        await trio.sleep(2.5)  # the first GET_DATA is done
        fake.intr_counts = [(44, 1150), (45, 10)]  # 150 in 2 s: not above 100/s × 2
        await trio.sleep(2)
        assert monitor.storms == [] and fake.intr_delays == []
        fake.intr_counts = [(44, 1401), (45, 10)]  # 251 in 2 s: a storm
        await trio.sleep(2)
        assert monitor.storms == [(44, 251)]
        await trio.sleep(0.5)  # the delay lasted 400 ms
        nursery.cancel_scope.cancel()
    assert fake.intr_delays == [3, 0]
    calls = _args_of(fake, VM_INTR_MONITOR)
    assert len(calls) >= 4 and all(isinstance(a, int) for a in calls)  # the VA, by value
    # the last request: cmd u32, buf_cnt u32 (MAX_PTDEV_NUM pairs), buffer[0] = 0 ms
    assert struct.unpack_from("<IIQ", monitor.page) == (abi.INTR_CMD_DELAY_INT, 48, 0)
    monitor.close()


async def test_sim_presents_the_hypervisor_devices():
    """What a guest on ACRN finds at the reserved slots: the hypervisor's ivshmem (MSI-X
    with 8 vectors, IVPosition, the region shared by every VM that names it) and its PCI
    vUART (an MCS9900 16550 over MMIO), at the BARs the device model reserved."""
    sims = [SimHypervisor(), SimHypervisor()]
    args = ["-m", "256M", "-s", "0:0,hostbridge", "-s", "8,ivshmem,hv:/pydm_shared,2,3",
            "-s", "16,uart,vuart_idx:1", "vm1"]
    async with running(args, sims[0]) as vm1, running([*args[:-1], "vm2"], sims[1]):
        g1, g2 = sims[0].guest(0), sims[1].guest(0)
        assert await g1.pci_cfg_read(0, 8, 0, 0, 4) == 0x1110_1AF4
        assert await g1.pci_cfg_read(0, 8, 0, 0x08, 4) == 0x0500_0001
        assert await g1.pci_cfg_read(0, 8, 0, 0x34, 1) == 0x40
        assert await g1.pci_cfg_read(0, 8, 0, 0x40, 4) & 0x07FF_00FF == 0x0007_0011
        bar0 = await g1.pci_cfg_read(0, 8, 0, 0x10, 4)
        assert bar0 == vm1.devices[(0, 8, 0)].cfg.get32(0x10)
        lo = await g1.pci_cfg_read(0, 8, 0, 0x18, 4)
        hi = await g1.pci_cfg_read(0, 8, 0, 0x1C, 4)
        shm = (hi << 32) | (lo & ~0xF)
        await g1.mmio_write(shm + 0x100, 8, 0x1122334455667788)
        assert await g2.mmio_read(shm + 0x100, 8) == 0x1122334455667788  # one region
        await g1.pci_cfg_write(0, 8, 0, 0x10, 4, 0xFFFF_FFFF)  # sizing: 256 bytes
        assert await g1.pci_cfg_read(0, 8, 0, 0x10, 4) == 0xFFFF_FF00
        await g1.pci_cfg_write(0, 8, 0, 0x10, 4, bar0)
        assert await g1.mmio_read(bar0 + 8, 4) == 0  # IVPosition: the VM's id
        assert await g1.pci_cfg_read(0, 16, 0, 0, 4) == 0x9900_9710
        assert await g1.pci_cfg_read(0, 16, 0, 0x08, 4) == 0x0700_0200
        uart = await g1.pci_cfg_read(0, 16, 0, 0x10, 4) & ~0xF
        for ch in b"ok\n":
            await g1.mmio_write(uart, 1, ch)
        assert await g1.mmio_read(uart + 5, 1) & 0x60 == 0x60
        assert bytes(sims[0].hv_side.vdevs[16 << 3].output) == b"ok\n"
        assert len(sims[0].hv_side.vdevs) == 2
    assert "destroy_vdev" in sims[0].calls


async def test_dm_ivshmem_maps_dev_shm_into_the_guest():
    """ivshmem,dm: BAR2 is /dev/shm/<name> mapped into the guest (guest accesses never
    exit), BAR0's registers read as acrn-dm's do, a peer with another size is refused."""
    name = f"pydm-ivshmem-{os.getpid()}"
    path = f"/dev/shm/{name}"
    sim = SimHypervisor()
    try:
        args = ["-m", "256M", "-s", "0:0,hostbridge", "-s", f"9,ivshmem,dm:/{name},2,5", "vm1"]
        async with running(args, sim):
            g = sim.guest(0)
            assert await g.pci_cfg_read(0, 9, 0, 0x2C, 4) == 0x0005_8086  # region id 5
            bar0 = await g.pci_cfg_read(0, 9, 0, 0x10, 4) & ~0xF
            lo = await g.pci_cfg_read(0, 9, 0, 0x18, 4)
            shm = ((await g.pci_cfg_read(0, 9, 0, 0x1C, 4)) << 32) | (lo & ~0xF)
            await g.mmio_write(shm + 4096, 4, 0xCAFEF00D)
            with open(path, "rb") as f:
                f.seek(4096)
                assert f.read(4) == struct.pack("<I", 0xCAFEF00D)
            assert [await g.mmio_read(bar0 + o, 4) for o in (0, 4, 8)] == [0, 0, 0]
            await g.mmio_write(bar0 + 0xC, 4, 0x0001_0002)  # doorbell: ignored, warned
        assert os.path.getsize(path) == 2 * MiB  # left for the peer, as acrn-dm leaves it
        from devicemodel.config import ConfigError
        from devicemodel.vm import Vm
        peer = Vm(parse_args(["-s", "0:0,hostbridge", "-s", f"9,ivshmem,dm:/{name},4", "vm2"]),
                  SimHypervisor())
        with pytest.raises(ConfigError, match="exists with 2097152 bytes, not the 4194304"):
            peer.build()
    finally:
        if os.path.exists(path):
            os.unlink(path)


async def test_acpidev_pt_passes_the_host_tpm_through(tmp_path, monkeypatch):
    """--acpidev_pt MSFT0101,00: the CRB buffer /proc/iomem names, identity-mapped, its
    event log at a guest address of the MMIO device window; \\_SB.TPM and TPM2 for the guest."""
    iomem = tmp_path / "iomem"
    iomem.write_text("fed40000-fed44fff : MSFT0101:00\n")
    tpm2 = tmp_path / "TPM2"
    tpm2.write_bytes(b"TPM2" + struct.pack("<I", 76) + bytes(28)
                     + struct.pack("<HHQI12sIQ", 0, 0, 0xFED40040, 7, bytes(12), 0x10000,
                                   0x7FFF0000))
    monkeypatch.setattr(mmio_devices, "PROC_IOMEM", str(iomem))
    monkeypatch.setattr(mmio_devices, "TPM2_TABLE", str(tpm2))
    sim = SimHypervisor()
    async with running(["-m", "256M", "-s", "0:0,hostbridge", "--acpidev_pt", "MSFT0101,00",
                        "vm1"], sim) as vm:
        (dev,) = sim.hv_side.mmiodevs
        tables = vm.platform.tables
    assert dev.name == "MSFT0101"
    assert (dev.resources[0].user_vm_pa, dev.resources[0].service_vm_pa,
            dev.resources[0].size) == (0xFED40000, 0xFED40000, 0x5000)
    assert (dev.resources[1].user_vm_pa, dev.resources[1].service_vm_pa) == (0xF0000000,
                                                                              0x7FFF0000)
    assert b"MSFT0101" in tables[0xF2400 + 0x1100]
    tpm2_table = tables[0xF2400 + 0xC00]
    assert tpm2_table[:4] == b"TPM2" and len(tpm2_table) == 76
    assert struct.unpack_from("<QI", tpm2_table, 40) == (0xFED40040, 7)
    assert struct.unpack_from("<IQ", tpm2_table, 64) == (0x10000, 0xF0000000)
    assert sim.hv_side.mmiodevs == []  # given back when the VM stopped


def test_every_hsm_ioctl_has_a_user_and_a_bytes_test():
    """Acceptance of issue 16: every ioctl of linux/acrn.h is issued by devicemodel/ (the
    ACRN backend names it) and a test checks its bytes (the fake records it by number)."""
    header = Path("/usr/include/linux/acrn.h")
    if not header.exists():
        pytest.skip("linux/acrn.h (linux-libc-dev) is missing")
    import re

    names = re.findall(r"#define\s+(ACRN_IOCTL_\w+)\s*\\?\s*\n?\s*_IO", header.read_text())
    names = [n for n in names if n != "ACRN_IOCTL_TYPE"]
    assert len(names) == 27
    root = Path(__file__).resolve().parents[2]
    backend = (root / "devicemodel/hsm/acrn.py").read_text()
    tests = "".join(p.read_text() for p in [
        root / "tests/component/test_acrn_backend.py", Path(__file__),
        root / "tests/component/test_passthru_acrn.py"])
    from tests.support import acrn_fake

    for name in names:
        assert f"abi.{name}" in backend, f"{name}: no user in devicemodel/hsm/acrn.py"
        short = name.removeprefix("ACRN_IOCTL_")
        fake_name = {"NOTIFY_REQUEST_FINISH": "NOTIFY", "CREATE_IOREQ_CLIENT": "CREATE_CLIENT",
                     "ATTACH_IOREQ_CLIENT": "ATTACH", "DESTROY_IOREQ_CLIENT": "DESTROY_CLIENT",
                     "CLEAR_VM_IOREQ": "CLEAR_IOREQ"}.get(short, short)
        assert getattr(acrn_fake, fake_name) == getattr(abi, name), name
        assert re.search(rf"\b{fake_name}\b", tests), f"{name}: no test names it"
