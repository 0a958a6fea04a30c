"""Real-hardware discovery: the checks against a fake sysfs tree (one per thing that can
be wrong), binding with a fake kernel, pyudev enumeration of this machine's real PCI
devices (read-only), and the VFIO ioctl numbers against the system's linux/vfio.h."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from devicemodel.config import ConfigError
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.passthru import vfio
from devicemodel.passthru.host import HostBar, PassthroughError, SimHostDevice
from devicemodel.passthru.kernel_msi import KernelOwnedMsi
from devicemodel.passthru.vfio import Sysfs, SysfsHostDevice, bind, check_assignable
from devicemodel.passthru.vmsix_on_msi import check_eligible
from devicemodel.vm import running

DEV = "0000:03:00.0"
RESOURCE = (
    "0x00000000feb00000 0x00000000feb00fff 0x0000000000040200\n"  # BAR0 mem32
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x0000006000000000 0x0000006000003fff 0x000000000014220c\n"  # BAR2 mem64 prefetch
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"  # (BAR2's upper half)
    "0x000000000000e000 0x000000000000e01f 0x0000000000040101\n"  # BAR4 io
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x00000000fea00000 0x00000000fea7ffff 0x0000000000046200\n"  # ROM: not a BAR
)


class FakeTree:
    """A sysfs tree in tmp: devices, drivers, IOMMU groups."""

    def __init__(self, root: Path, *, iommu: bool = True) -> None:
        self.root = root / "sys"
        self.pci = self.root / "bus" / "pci"
        (self.pci / "devices").mkdir(parents=True)
        (self.pci / "drivers_probe").write_text("")
        self.iommu = iommu
        if iommu:
            (self.root / "kernel" / "iommu_groups").mkdir(parents=True)

    def device(self, name: str, driver: str | None, group: str | None = "7",
               config: bytes | None = None) -> Path:
        d = self.pci / "devices" / name
        d.mkdir()
        (d / "config").write_bytes(config or SimHostDevice(4).snapshot())
        (d / "resource").write_text(RESOURCE)
        (d / "reset").write_text("")
        (d / "irq").write_text("16\n")
        (d / "driver_override").write_text("(null)\n")
        if driver:
            self.bind(name, driver)
        if group and self.iommu:
            g = self.root / "kernel" / "iommu_groups" / group / "devices"
            g.mkdir(parents=True, exist_ok=True)
            os.symlink(d, g / name)
            os.symlink(g.parent, d / "iommu_group")
        return d

    def bind(self, name: str, driver: str) -> None:
        drv = self.pci / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        link = self.pci / "devices" / name / "driver"
        if link.is_symlink():
            link.unlink()
        os.symlink(drv, link)


class FakeKernel(Sysfs):
    """Plays the kernel for driver_override, unbind and drivers_probe writes."""

    def __init__(self, tree: FakeTree, native: dict[str, str]) -> None:
        super().__init__(tree.root)
        self.tree = tree
        self.native = native
        self.writes: list[tuple[str, str]] = []

    def write(self, path: Path, value: str) -> None:
        self.writes.append((str(path.relative_to(self.root)), value))
        if path.name == "driver_override":
            path.write_text(value)
        elif path.name == "unbind":
            (self.tree.pci / "devices" / value / "driver").unlink()
        elif path.name == "drivers_probe":
            override = (self.device(value) / "driver_override").read_text().strip()
            drv = override if override not in ("", "(null)") else self.native.get(value)
            if drv and self.driver(value) is None:
                self.tree.bind(value, drv)


def opener_ok(path: str, flags: int) -> int:
    return os.open(os.devnull, os.O_RDONLY)


# --- the checks ----------------------------------------------------------------------------
def test_absent_device(tmp_path):
    tree = FakeTree(tmp_path)
    with pytest.raises(PassthroughError, match=f"passthru {DEV}: no such PCI device"):
        check_assignable(Sysfs(tree.root), DEV, opener=opener_ok)


def test_wrong_driver_says_which_and_how_to_rebind(tmp_path):
    tree = FakeTree(tmp_path)
    tree.device(DEV, "e1000e")
    with pytest.raises(PassthroughError, match="bound to e1000e, needs vfio-pci; bind it"):
        check_assignable(Sysfs(tree.root), DEV, opener=opener_ok)
    tree2 = FakeTree(tmp_path / "b")
    tree2.device(DEV, None)
    with pytest.raises(PassthroughError, match="bound to no driver, needs pci-stub or vfio"):
        check_assignable(Sysfs(tree2.root), DEV, ("pci-stub", "vfio-pci"), opener=opener_ok)


def test_pci_stub_is_enough_for_acrn(tmp_path):
    tree = FakeTree(tmp_path, iommu=False)
    tree.device(DEV, "pci-stub")
    assert check_assignable(Sysfs(tree.root), DEV, ("pci-stub", "vfio-pci")) is None
    with pytest.raises(PassthroughError, match="bound to pci-stub, needs vfio-pci"):
        check_assignable(Sysfs(tree.root), DEV)


def test_no_iommu(tmp_path):
    tree = FakeTree(tmp_path, iommu=False)
    tree.device(DEV, "vfio-pci")
    with pytest.raises(PassthroughError, match="no IOMMU: .*intel_iommu=on"):
        check_assignable(Sysfs(tree.root), DEV, opener=opener_ok)


def test_group_not_viable_names_the_other_device(tmp_path):
    tree = FakeTree(tmp_path)
    tree.device(DEV, "vfio-pci")
    tree.device("0000:03:00.1", "snd_hda_intel")
    tree.device("0000:03:00.2", None)  # unbound devices do not spoil the group
    with pytest.raises(PassthroughError, match="IOMMU group 7 is not viable: 0000:03:00.1 "
                                               "in the same group is bound to snd_hda_intel"):
        check_assignable(Sysfs(tree.root), DEV, opener=opener_ok)
    tree.bind("0000:03:00.1", "vfio-pci")
    assert check_assignable(Sysfs(tree.root), DEV, opener=opener_ok) == "7"


def test_busy_group(tmp_path):
    tree = FakeTree(tmp_path)
    tree.device(DEV, "vfio-pci")
    seen = []

    def busy(path: str, flags: int) -> int:
        seen.append(path)
        raise OSError(errno.EBUSY, "Device or resource busy")

    with pytest.raises(PassthroughError, match=r"busy: IOMMU group 7 \(.*\) is held by"):
        check_assignable(Sysfs(tree.root), DEV, opener=busy)
    assert seen == [str(tmp_path / "dev" / "vfio" / "7")]


def test_resources_and_config_of_a_sysfs_device(tmp_path):
    tree = FakeTree(tmp_path)
    tree.device(DEV, "vfio-pci")
    host = SysfsHostDevice(Sysfs(tree.root), DEV, "7")
    try:
        assert host.phys_bdf == 0x0300
        assert host.bars() == [
            HostBar(0, "mem32", 0xFEB0_0000, 0x1000),
            HostBar(2, "mem64", 0x60_0000_0000, 0x4000, prefetchable=True),
            HostBar(4, "io", 0xE000, 0x20),
        ]
        assert host.legacy_irq() == 11  # INTLINE, as acrn-dm reads it
        msi, bar = check_eligible(host)  # vMSI-X eligibility read through sysfs config
        assert (msi.offset, msi.count, bar) == (0x50, 4, 1)
        host.config_write(0x04, 2, 0x0406)
        assert (tree.pci / "devices" / DEV / "config").read_bytes()[4:6] == b"\x06\x04"
        assert host.reset()
    finally:
        host.close()


def test_bind_and_restore_the_original_driver(tmp_path):
    tree = FakeTree(tmp_path)
    tree.device(DEV, "igc")
    kernel = FakeKernel(tree, {DEV: "igc"})
    binding = bind(kernel, DEV, "vfio-pci")
    assert kernel.driver(DEV) == "vfio-pci" and binding.original == "igc"
    assert kernel.writes == [
        (f"bus/pci/devices/{DEV}/driver_override", "vfio-pci"),
        (f"bus/pci/devices/{DEV}/driver/unbind", DEV),
        ("bus/pci/drivers_probe", DEV),
    ]
    binding.restore()
    assert kernel.driver(DEV) == "igc"
    assert (tree.pci / "devices" / DEV / "driver_override").read_text() == "\n"


def test_bind_reports_a_driver_that_did_not_take_the_device(tmp_path):
    tree = FakeTree(tmp_path)
    tree.device(DEV, "igc")

    class NoVfio(FakeKernel):
        def write(self, path, value):  # vfio-pci module not loaded: probe binds nothing
            if path.name != "drivers_probe":
                super().write(path, value)

    with pytest.raises(PassthroughError, match="vfio-pci did not take the device .*loaded"):
        bind(NoVfio(tree, {DEV: "igc"}), DEV)


# --- this machine's real devices (read-only) -------------------------------------------------
def real_devices() -> list[str]:
    return sorted(os.listdir("/sys/bus/pci/devices"))


@pytest.mark.skipif(not os.path.isdir("/sys/bus/pci/devices"), reason="no PCI in sysfs")
def test_pyudev_enumerates_the_real_pci_devices():
    infos = vfio.list_pci_devices()
    assert [i.name for i in infos] == real_devices()
    sysfs = Sysfs()
    for info in infos:
        assert info.driver == sysfs.driver(info.name)
        assert info.vendor == int(sysfs.read(info.name, "vendor"), 16)
        assert vfio.udev_device(info.name) == info
    assert vfio.udev_device("0000:ff:1f.7") is None
    if shutil.which("lspci"):
        out = subprocess.run(["lspci", "-D", "-n"], capture_output=True, text=True,
                             check=True).stdout
        assert sorted(line.split()[0] for line in out.splitlines()) == real_devices()


@pytest.mark.skipif(not os.path.isdir("/sys/bus/pci/devices"), reason="no PCI in sysfs")
def test_real_resources_match_the_bar_registers():
    sysfs = Sysfs()
    for name in real_devices():
        cfg = (sysfs.device(name) / "config").read_bytes()[:0x28]
        for bar in sysfs.resources(name):
            reg = int.from_bytes(cfg[0x10 + 4 * bar.index : 0x14 + 4 * bar.index], "little")
            if bar.kind == "io":
                assert reg & 1 and reg & ~3 == bar.base
            else:
                assert not reg & 1 and (reg >> 1 & 3) == (2 if bar.kind == "mem64" else 0)
                assert reg & ~0xF == bar.base & 0xFFFF_FFF0


def bdf_arg(name: str) -> str:
    bus, rest = name.split(":")[1:]
    dev, func = rest.split(".")
    return f"{int(bus, 16):x}/{int(dev, 16):x}/{int(func, 16):x}"


def busy_real_device() -> str | None:
    return next((n for n in real_devices() if Sysfs().driver(n) not in vfio.VFIO_FRIENDLY),
                None)


@pytest.mark.skipif(not os.path.isdir("/sys/bus/pci/devices"), reason="no PCI in sysfs")
async def test_acrn_refuses_a_device_bound_to_its_host_driver_by_name():
    from tests.support.acrn_fake import ASSIGN_PCIDEV, FakeHsm, new_hv

    name = busy_real_device()
    if name is None:
        pytest.skip("every PCI device here is already free")
    drv = Sysfs().driver(name)
    fake, hv = new_hv(FakeHsm(vcpu_num=1))
    with pytest.raises(ConfigError,
                       match=f"passthru {name}: bound to {drv}, needs pci-stub or vfio-pci"):
        async with running(["-m", "128M", "-s", f"5,passthru,{bdf_arg(name)}", "vm1"],
                           hypervisor=hv):
            pass
    assert not [c for c in fake.calls if c[0] == ASSIGN_PCIDEV]


@pytest.mark.skipif(not os.path.isdir("/sys/bus/pci/devices"), reason="no PCI in sysfs")
async def test_sim_shows_a_real_device_without_touching_it():
    name = busy_real_device() or real_devices()[-1]
    config = Sysfs().device(name) / "config"
    before = config.read_bytes()[:64]
    sim = SimHypervisor()
    async with running(["-m", "128M", "-s", f"5,passthru,{bdf_arg(name)}", "vm1"],
                       hypervisor=sim) as vm:
        g = sim.guest(0)
        ids = await g.pci_cfg_read(0, 5, 0, 0, 4)
        assert ids == int.from_bytes(before[:4], "little")  # the device's own IDs
        host = vm.passthrough(5).host
        assert host.read_only and not host.can_reset
        await g.pci_cfg_write(0, 5, 0, 0x04, 2, 0x0000)  # would stop the real device
        for off in range(0x40, 0x100, 4):
            await g.pci_cfg_write(0, 5, 0, off, 4, 0xFFFF_FFFF)
    after = config.read_bytes()[:64]
    assert after[:6] == before[:6] and after[8:] == before[8:]  # status may move; rest not


# --- VFIO ABI ---------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("gcc") is None or not Path("/usr/include/linux/vfio.h").exists(),
                    reason="needs gcc and linux/vfio.h")
def test_vfio_ioctl_numbers_match_the_system_header(tmp_path):
    src = tmp_path / "v.c"
    src.write_text(
        "#include <stdio.h>\n#include <linux/vfio.h>\n"
        "int main(void){printf(\"%lu %lu %lu %lu %lu %lu %lu %lu %zu %zu %zu %d %d\\n\","
        "(unsigned long)VFIO_GET_API_VERSION,(unsigned long)VFIO_CHECK_EXTENSION,"
        "(unsigned long)VFIO_SET_IOMMU,(unsigned long)VFIO_GROUP_GET_STATUS,"
        "(unsigned long)VFIO_GROUP_SET_CONTAINER,(unsigned long)VFIO_GROUP_GET_DEVICE_FD,"
        "(unsigned long)VFIO_DEVICE_SET_IRQS,(unsigned long)VFIO_IOMMU_MAP_DMA,"
        "sizeof(struct vfio_group_status),sizeof(struct vfio_irq_set),"
        "sizeof(struct vfio_iommu_type1_dma_map),VFIO_PCI_MSI_IRQ_INDEX,"
        "VFIO_IRQ_SET_DATA_EVENTFD|VFIO_IRQ_SET_ACTION_TRIGGER);return 0;}\n")
    exe = tmp_path / "v"
    subprocess.run(["gcc", str(src), "-o", str(exe)], check=True)
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True,
                                          check=True).stdout.split()]
    assert got == [vfio.VFIO_GET_API_VERSION, vfio.VFIO_CHECK_EXTENSION, vfio.VFIO_SET_IOMMU,
                   vfio.VFIO_GROUP_GET_STATUS, vfio.VFIO_GROUP_SET_CONTAINER,
                   vfio.VFIO_GROUP_GET_DEVICE_FD, vfio.VFIO_DEVICE_SET_IRQS,
                   vfio.VFIO_IOMMU_MAP_DMA, vfio.GROUP_STATUS.size, vfio.IRQ_SET_HDR.size,
                   vfio.DMA_MAP.size, vfio.VFIO_PCI_MSI_IRQ_INDEX,
                   vfio.VFIO_IRQ_SET_DATA_EVENTFD | vfio.VFIO_IRQ_SET_ACTION_TRIGGER]


class KvmLike(SimHypervisor):
    """A backend that owns config space and routes irqfds, like KVM (no sim remap table)."""

    name = "kvm"

    def interrupt_remapper(self) -> None:
        return None


async def test_kvm_refuses_a_real_msix_device_but_takes_an_msi_one(tmp_path, monkeypatch):
    from devicemodel.passthru import device as ptdev

    tree = FakeTree(tmp_path)
    tree.device(DEV, "vfio-pci", config=SimHostDevice(4, features=("msix",)).snapshot())
    tree.device("0000:03:00.1", "vfio-pci")
    opened = []

    def fake_open(opts, slot, ctx):
        if slot.dev == 5:
            opened.append(SysfsHostDevice(Sysfs(tree.root), DEV, "7"))
        else:  # sysfs only: no VFIO group to open in the fake tree
            opened.append(SysfsHostDevice(Sysfs(tree.root), "0000:03:00.1"))
        return opened[-1]

    monkeypatch.setattr(ptdev, "open_host", fake_open)
    with pytest.raises(ConfigError, match=f"passthru {DEV}: MSI-X devices are passed through "
                                          "on the ACRN backend only"):
        async with running(["-m", "128M", "-s", "5,passthru,3/0/0", "vm1"],
                           hypervisor=KvmLike()):
            pass
    cfg = tree.pci / "devices" / "0000:03:00.1" / "config"
    before = cfg.read_bytes()
    async with running(["-m", "128M", "-s", "6,passthru,3/0/1,vmsix_on_msi,no_reset", "vm1"],
                       hypervisor=KvmLike()) as vm:
        dev = vm.passthrough(6)
        assert dev.host.drives_hardware
        assert dev.cfg.get8(0x50) == 0x11  # the vMSI-X view of a sysfs-backed device
        # VFIO's kernel owns the device's MSI on KVM: we never write the capability
        assert isinstance(dev.vmsix.msi, KernelOwnedMsi)
        assert cfg.read_bytes()[0x50:0x68] == before[0x50:0x68]
    assert cfg.read_bytes() == before  # and put back as found


def test_missing_vfio_nodes_are_a_clean_error(tmp_path):
    tree = FakeTree(tmp_path)
    tree.device(DEV, "vfio-pci")
    host = SysfsHostDevice(Sysfs(tree.root), DEV, "7")
    try:
        with pytest.raises(PassthroughError, match=f"passthru {DEV}: VFIO: .*/dev/vfio/vfio"):
            host.message_eventfds([])
    finally:
        host.close()
