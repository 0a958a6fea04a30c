"""An unmodified Linux enumerates *our* PCI functions, served whole over vfio-user.

QEMU 11.1 (trixie-backports, devicemodel/guestkit/trixie.py) attaches each function with
``vfio-user-pci``; config space, BARs, capabilities and interrupt logic are acrn-pydm's
own PciDevice objects, the same the ACRN path uses. Three boots of the Debian kernel:

* ``msix``: virtio-blk (modern), virtio-net on a tap in a private namespace, virtio-rnd
  and virtio-console (both legacy, acrn-dm's default), MSI-X everywhere. The guest makes
  an ext2 filesystem, reads a pattern the host planted and writes one the host checks,
  pings through the tap, reads /dev/hwrng, and talks over hvc0 both ways.
* ``intx``: virtio-blk transitional driven by the legacy driver
  (``virtio_pci.force_legacy=1``) and virtio-rnd, with ``pci=nomsi``: INTx through our
  level-triggered line and QEMU's automask/unmask.
* ``vmsix``: the synthetic MSI-only passthrough device with ``vmsix_on_msi``, on a q35
  machine with QEMU's intel-iommu, so the guest's own vfio-pci can take it: a tiny static
  program (tests/support/guest_vfio_msix.c) enables all 8 MSI-X vectors and rings the
  device's doorbell for each, and each must arrive on its own eventfd.

The guest runs the real ``lspci -vvv -xxx`` (pciutils and its libraries copied into the
initramfs) on each of our functions; its hex dump is compared with ``acrn-pydm lspci``
for the same ``-s`` line, and the fields that may differ (what QEMU's client virtualizes
and what the guest programs) are listed in VIRTUALIZED with the reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devicemodel.guestkit import qemu as g
from devicemodel.guestkit import trixie
from devicemodel.pci import caps as pcaps
from tests.support.console_peer import ConsolePeer

pytestmark = pytest.mark.integration

NETNS, TAP = "acrnpydm-vfu", "pydmvfu0"
HOST_IP, GUEST_IP = "10.213.79.1", "10.213.79.2"  # a /30 that exists only inside NETNS
DISK_SIZE = 64 << 20
PLANTED_AT = 40 << 20  # past the 32 MiB ext2 filesystem
PLANTED = (b"planted-by-the-host-" * 3300)[:65536]
GUEST_AT = 48 << 20
HOST_LINE = "host-to-guest-over-our-virtio-console"
GUEST_LINE = "guest-to-host-over-our-virtio-console"
VFIO_MODULES = ("virt/lib/irqbypass.ko", "drivers/vfio/vfio.ko",
                "drivers/vfio/vfio_iommu_type1.ko", "drivers/vfio/vfio_virqfd.ko",
                "drivers/vfio/pci/vfio-pci-core.ko", "drivers/vfio/pci/vfio-pci.ko")
VMSIX_VECTORS = 8

# one line per PCI function: slot, ids, driver, the 256 config bytes; one per virtio
# device: its virtio id, features and interrupt lines (kind and count)
INVENTORY = r"""
for d in /sys/bus/pci/devices/*; do
  drv=$(basename "$(readlink $d/driver)" 2>/dev/null)
  info "pci $(basename $d) $(cat $d/vendor):$(cat $d/device) ${drv:--} \
$(od -An -tx1 -v -N 256 $d/config | tr -d ' \n')"
done
for d in /sys/bus/pci/devices/*; do
  case "$(cat $d/vendor)" in 0x1af4|0x1b36) ;; *) continue;; esac
  s=$(basename $d | cut -d: -f3 | cut -d. -f1)
  lspci -vvv -xxx -nn -s 00:$s.0 2>&1 | while IFS= read -r l; do info "lspci $s $l"; done
done
for v in /sys/bus/virtio/devices/virtio*; do
  n=$(basename $v)
  irqs=$(grep -aE " $n(-[^ ,]+)?(,|$)" /proc/interrupts | awk '{print $2 ":" $3}' | tr '\n' ,)
  info "virtio $n $(cat $v/device) $(basename $(readlink -f $v/..)) $(cat $v/features) $irqs"
done
"""

BLK = f"""
pat=$(dd if=/dev/vda bs=65536 skip={PLANTED_AT // 65536} count=1 iflag=direct 2>/dev/null \
      | md5sum | cut -d' ' -f1)
[ "$pat" = {hashlib.md5(PLANTED).hexdigest()} ] && pass blk-planted \
  || fail blk-planted "read [$pat]"
yes guest-wrote-this- | tr -d '\\n' | head -c 65536 > /tmp/gpat
dd if=/tmp/gpat of=/dev/vda bs=65536 seek={GUEST_AT // 65536} conv=fsync 2>/dev/null \
  && pass blk-write || fail blk-write "dd failed"
if mke2fs -q -b 1024 /dev/vda 32768 && mount -t ext2 /dev/vda /mnt \\
   && cp /tmp/gpat /mnt/gpat && umount /mnt && echo 3 > /proc/sys/vm/drop_caches \\
   && mount -t ext2 -o ro /dev/vda /mnt && cmp /tmp/gpat /mnt/gpat && umount /mnt
then pass blk-ext2; else fail blk-ext2 "mkfs/mount/write/read failed"; fi
"""

RND = """
if dd if=/dev/hwrng of=/tmp/rnd bs=64 count=1 2>/dev/null && [ "$(wc -c < /tmp/rnd)" = 64 ]
then pass rng; else fail rng "could not read 64 bytes from /dev/hwrng"; fi
"""

NET = f"""
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up && ip addr add {GUEST_IP}/30 dev eth0
  if ping -c 3 -W 3 {HOST_IP}; then pass net-ping; else fail net-ping "no reply"; fi
else
  fail net-ping "no eth0"
fi
"""

CONSOLE = f"""
name=$(cat /sys/class/virtio-ports/vport*p0/name 2>/dev/null)
[ "$name" = con0 ] && pass con-name || fail con-name "port name is [$name]"
if [ -e /sys/class/tty/hvc0 ] && exec 3<>/dev/hvc0; then
  stty raw -echo <&3
  echo {GUEST_LINE} >&3
  line=""
  read -t 60 line <&3
  [ "$line" = {HOST_LINE} ] && pass con-in || fail con-in "read [$line]"
  exec 3<&-
else
  fail con-in "no /dev/hvc0"
fi
"""

VMSIX = f"""
dev=$(grep -l 0x1b36 /sys/bus/pci/devices/*/vendor | head -1)
dev=$(dirname $dev); bdf=$(basename $dev)
echo 1 > /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
echo vfio-pci > $dev/driver_override && echo $bdf > /sys/bus/pci/drivers_probe
drv=$(basename "$(readlink $dev/driver)" 2>/dev/null)
[ "$drv" = vfio-pci ] && pass vfio-bound || fail vfio-bound "driver [$drv]"
/bin/vfio_msix $(basename $(readlink $dev/iommu_group)) $bdf {VMSIX_VECTORS} > /tmp/vfio.out
while read line; do info "vfio $line"; done < /tmp/vfio.out
"""


@dataclass
class Boot:
    name: str
    run: g.GuestRun
    specs: dict[str, str]
    slots: dict[str, int]
    logs: str
    host_got: bytes = b""
    image: bytes = b""
    #: device -> the 256 config bytes ``acrn-pydm lspci`` shows for its -s line (slot 3)
    ours: dict[str, bytes] = field(default_factory=dict)

    def check(self, *steps: str) -> None:
        try:
            self.run.check(*steps)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs}") from None

    def pci(self) -> dict[int, tuple[str, str, bytes]]:
        """slot -> (vendor:device, driver, config bytes) as the guest saw them."""
        out = {}
        for line in self.run.info:
            m = re.match(r"pci 0000:00:([0-9a-f]{2})\.0 (\S+) (\S+) ([0-9a-f]+)$", line)
            if m:
                out[int(m.group(1), 16)] = (m.group(2), m.group(3), bytes.fromhex(m.group(4)))
        return out

    def lspci(self, slot: int) -> str:
        """What ``lspci -vvv -xxx -nn`` printed in the guest for the function in ``slot``."""
        tag = f"lspci {slot:02x} "
        return "\n".join(line[len(tag):] for line in self.run.info if line.startswith(tag))

    def virtio(self) -> dict[int, tuple[int, str, str, list[tuple[int, str]]]]:
        """slot -> (virtio id, features, driver's interrupt lines as (count, kind))."""
        out = {}
        for line in self.run.info:
            m = re.match(r"virtio virtio\d+ (0x[0-9a-f]+) 0000:00:([0-9a-f]{2})\.0 ([01]+) "
                         r"(\S*)$", line)
            if m:
                irqs = [(int(c), kind) for c, kind in
                        (x.split(":") for x in m.group(4).split(",") if x)]
                out[int(m.group(2), 16)] = (int(m.group(1), 16), m.group(3), irqs)
        return out


def _lspci_files() -> dict[str, Path]:
    """The host's pciutils lspci and the libraries it links, for the guest's initramfs
    (busybox has no lspci -vvv): the guest then runs the real one on its own sysfs."""
    exe = shutil.which("lspci")
    assert exe is not None
    files = {"/bin/lspci": Path(exe)}
    for line in subprocess.run(["ldd", exe], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            files[m.group(1)] = Path(os.path.realpath(m.group(1)))
    return files


def _why_not() -> str | None:
    return (g.can_run_guests() or trixie.why_not()
            or (None if os.geteuid() == 0 else "needs root (a network namespace and a tap)")
            or (None if shutil.which("gcc") else "gcc is not installed")
            or (None if shutil.which("lspci") else "pciutils is not installed"))


def _boot(name: str, script: str, specs: dict[str, str], slots: dict[str, int], *,
          append: str = "", machine: tuple[str, ...] = (),
          work_files: dict[str, Path] | None = None,
          modules: tuple[str, ...] = (), image: Path | None = None,
          console: str | None = None) -> Boot:
    qemu = trixie.ensure_qemu()
    kernel = g.fetch_kernel()
    with qemu.workdir() as work:
        files = {**_lspci_files(), **(work_files or {})}
        g.build_initramfs(kernel, script + INVENTORY, work / "initrd.gz", files=files,
                          modules=modules)
        specs = {k: v.replace("{work}", str(work)) for k, v in specs.items()}
        netns = {"net": NETNS} if "net" in specs else {}
        with (g.netns(NETNS) if netns else _nothing()), \
                g.backends(specs, work, netns=netns, command="vfio-user") as be:
            if netns:
                subprocess.run(["ip", "-n", NETNS, "addr", "add", f"{HOST_IP}/30", "dev",
                                TAP], check=True)
                subprocess.run(["ip", "-n", NETNS, "link", "set", TAP, "up"], check=True)
            peer = ConsolePeer(Path(console.replace("{work}", str(work))), HOST_LINE,
                                timeout=150, connect_for=15) if console else None
            args = list(machine)
            for dev, slot in slots.items():
                args += g.vfio_user_device_args(qemu.inner(be[dev].socket), addr=slot)
            cmd = g.qemu_command(qemu.stage_kernel(kernel, work), qemu.inner(work / "initrd.gz"),
                                 args, append=append)
            try:
                run = g.run_qemu(qemu.command(cmd), timeout=240)
            finally:
                host_got = peer.close() if peer else b""
            logs = g.backend_logs(be)
            ours = {dev: _acrn_pydm_lspci(spec, work, NETNS if dev in netns else None)
                    for dev, spec in specs.items()}
    return Boot(name, run, specs, slots, logs, host_got,
                image.read_bytes() if image is not None else b"", ours)


def _acrn_pydm_lspci(spec: str, work: Path, netns: str | None) -> bytes:
    """The config space ``acrn-pydm lspci -s 3,<spec>`` shows (the served device's slot),
    for a twin of the device: its own tap or console socket, the same config space."""
    spec = spec.replace(f"tap={TAP}", "tap=pydmvfu1").replace("con0.sock", "con0-lspci.sock")
    cmd = [sys.executable, "-m", "devicemodel", "lspci", "-s", "0:0,hostbridge", "-s",
           f"3,{spec}", "vfu"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, cwd=g.REPO, capture_output=True, text=True, check=True,
                         timeout=60).stdout
    block = out.split("00:03.0", 1)[1].splitlines()[1:17]
    return bytes.fromhex("".join(line.split(":", 1)[1] for line in block))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(PLANTED_AT)
        f.write(PLANTED)
    return path


@pytest.fixture(scope="module")
def msix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    why = _why_not()
    if why:
        pytest.skip(why)
    img = _disk(tmp_path_factory.mktemp("vfu-msix") / "disk.img")
    specs = {"blk": f"virtio-blk,{img},modern", "net": f"virtio-net,tap={TAP}",
             "rnd": "virtio-rnd", "con": "virtio-console,@socket:con0={work}/con0.sock:server"}
    yield _boot("msix", BLK + NET + RND + CONSOLE, specs,
                {"blk": 3, "net": 4, "rnd": 5, "con": 6}, image=img,
                console="{work}/con0.sock")


@pytest.fixture(scope="module")
def intx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    why = _why_not()
    if why:
        pytest.skip(why)
    img = _disk(tmp_path_factory.mktemp("vfu-intx") / "disk.img")
    specs = {"blk": f"virtio-blk,{img},transitional", "rnd": "virtio-rnd"}
    yield _boot("intx", BLK + RND, specs, {"blk": 3, "rnd": 5},
                append="pci=nomsi virtio_pci.force_legacy=1", image=img)


@pytest.fixture(scope="module")
def vmsix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    why = _why_not()
    if why:
        pytest.skip(why)
    prog = tmp_path_factory.mktemp("vfu-prog") / "vfio_msix"
    src = Path(__file__).resolve().parents[1] / "support" / "guest_vfio_msix.c"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(prog), str(src)], check=True)
    yield _boot("vmsix", VMSIX, {"pt": f"passthru,sim:{VMSIX_VECTORS},vmsix_on_msi"},
                {"pt": 3}, append="intel_iommu=on",
                machine=("-machine", "q35", "-device", "intel-iommu,caching-mode=on"),
                work_files={"/bin/vfio_msix": prog}, modules=VFIO_MODULES)


# --- what the guest saw ----------------------------------------------------------------------
VIRTIO_IDS = {"blk": 2, "net": 1, "rnd": 4, "con": 3}
F_VERSION_1 = 32


def _virtio(boot: Boot, dev: str) -> tuple[int, str, list[tuple[int, str]]]:
    slot = boot.slots[dev]
    assert boot.pci()[slot][1] == "virtio-pci", boot.run.report()
    found = boot.virtio().get(slot)
    assert found is not None, boot.run.report()
    assert found[0] == VIRTIO_IDS[dev]
    return found


def test_msix_boot_finishes(msix: Boot) -> None:
    assert msix.run.done and not msix.run.timed_out, msix.run.report() + msix.logs


def test_blk_modern_with_msix(msix: Boot) -> None:
    msix.check("blk-planted", "blk-write", "blk-ext2")
    _, features, irqs = _virtio(msix, "blk")
    assert features[F_VERSION_1] == "1"  # the modern driver
    assert msix.pci()[3][0] == "0x1af4:0x1042"  # modern-only device id
    assert irqs and all(kind == "PCI-MSI" for _, kind in irqs), irqs
    assert sum(n for n, _ in irqs) > 0
    guest = msix.image[GUEST_AT : GUEST_AT + 65536]
    assert guest == (b"guest-wrote-this-" * 4000)[:65536]


def test_net_ping_through_our_tap(msix: Boot) -> None:
    msix.check("net-ping")
    _, features, irqs = _virtio(msix, "net")
    assert features[F_VERSION_1] == "0"  # legacy device (acrn-dm's default), legacy driver
    assert any(kind == "PCI-MSI" and n > 0 for n, kind in irqs), irqs


def test_rnd_hwrng(msix: Boot) -> None:
    msix.check("rng")
    _, _, irqs = _virtio(msix, "rnd")
    assert any(kind == "PCI-MSI" and n > 0 for n, kind in irqs), irqs


def test_console_both_ways(msix: Boot) -> None:
    msix.check("con-name", "con-in")
    assert msix.host_got == GUEST_LINE.encode() + b"\n", msix.run.report()
    _virtio(msix, "con")


def test_intx_boot_finishes(intx: Boot) -> None:
    assert intx.run.done and not intx.run.timed_out, intx.run.report() + intx.logs


def test_blk_transitional_with_the_legacy_driver_on_intx(intx: Boot) -> None:
    intx.check("blk-planted", "blk-write", "blk-ext2")
    _, features, irqs = _virtio(intx, "blk")
    assert intx.pci()[3][0] == "0x1af4:0x1001"  # transitional device id
    assert features[F_VERSION_1] == "0"  # force_legacy: the legacy driver
    assert irqs and all(kind == "IO-APIC" for _, kind in irqs), irqs
    assert sum(n for n, _ in irqs) > 0
    assert intx.image[GUEST_AT : GUEST_AT + 65536] == (b"guest-wrote-this-" * 4000)[:65536]


def test_rnd_on_intx(intx: Boot) -> None:
    intx.check("rng")
    _, _, irqs = _virtio(intx, "rnd")
    assert irqs and all(kind == "IO-APIC" for _, kind in irqs) and irqs[0][0] > 0, irqs


def test_vmsix_guest_sees_msix_and_no_msi(vmsix: Boot) -> None:
    assert vmsix.run.done, vmsix.run.report() + vmsix.logs
    ids, _, cfg = vmsix.pci()[3]
    assert ids == "0x1b36:0x0005"
    found = {c.cap_id: c for c in pcaps.walk(cfg)}
    assert pcaps.CAP_ID_MSI not in found
    msix = found[pcaps.CAP_ID_MSIX]
    assert (int.from_bytes(cfg[msix.offset + 2 : msix.offset + 4], "little") & 0x7FF) + 1 \
        == VMSIX_VECTORS


def test_vmsix_vectors_the_guest_enables_are_delivered(vmsix: Boot) -> None:
    vmsix.check("vfio-bound")
    out = [line.removeprefix("vfio ") for line in vmsix.run.info if line.startswith("vfio ")]
    assert f"msix-count {VMSIX_VECTORS}" in out, out
    fired = {int(m.group(1)): int(m.group(2)) for m in
             (re.match(r"vector (\d+) fired (-?\d+)", line) for line in out) if m}
    assert fired == {k: k for k in range(VMSIX_VECTORS)}, (out, vmsix.logs)


# --- the guest's lspci vs ours ---------------------------------------------------------------
# Bytes of config space that may differ between what the guest reads and what
# ``acrn-pydm lspci`` shows for the same -s line (everything else must be equal):
VIRTUALIZED = """
command         guest-programmed: the PCI core and drivers set SERR#, INTx disable (with
                MSI/MSI-X on), bus mastering; passthrough starts with decoding off
latency timer   guest-programmed (SeaBIOS/Linux write 64); writable on every function
BAR addresses   QEMU virtualizes the BAR registers and its firmware (SeaBIOS) places the
                BARs; acrn-pydm lspci shows acrn-dm's placement. The type bits must agree
interrupt line  QEMU's PCI core emulates it; SeaBIOS writes its PIRQ routing, acrn-pydm lspci
                shows acrn-dm's
MSI-X / MSI     QEMU emulates both capabilities from ours (same offsets, sizes, table and PBA
                location, vector counts); the guest's enable, function mask, MME and
                message address/data/mask live there
PowerState      PMCSR bits 1:0 as the guest left them (vfio-pci parks an idle device in D3hot)
"""


def _programmable(cfg: bytes) -> bytearray:
    """A mask of the VIRTUALIZED bits of a config space (1 = may differ)."""
    mask = bytearray(256)
    mask[0x04:0x06] = b"\xff\xff"  # command
    mask[0x0D] = 0xFF  # latency timer
    mask[0x3C] = 0xFF  # interrupt line
    for i in range(6):  # BAR addresses, not their type bits
        bar = int.from_bytes(cfg[0x10 + 4 * i : 0x14 + 4 * i], "little")
        low = 0x3 if bar & 1 else 0xF
        mask[0x10 + 4 * i : 0x14 + 4 * i] = (0xFFFF_FFFF & ~low).to_bytes(4, "little")
    for cap in pcaps.walk(cfg):
        o = cap.offset
        if cap.cap_id == pcaps.CAP_ID_MSIX:
            mask[o + 3] = 0xC0  # enable, function mask
        elif cap.cap_id == pcaps.CAP_ID_MSI:
            mask[o + 2] = 0x71  # enable, MME
            mask[o + 4 : o + 24] = b"\xff" * 20  # address, data, mask (pending is ours)
        elif cap.cap_id == pcaps.CAP_ID_PM:
            mask[o + 4] = 0x03
    return mask


def _lspci(cfg: bytes, work: Path, name: str) -> str:
    dump = work / f"{name}.txt"
    rows = [f"{r:02x}: " + " ".join(f"{b:02x}" for b in cfg[r : r + 16]) for r in range(0, 256, 16)]
    dump.write_text("00:03.0 " + name + "\n" + "\n".join(rows) + "\n")
    return subprocess.run(["lspci", "-F", str(dump), "-vvv", "-nn"], capture_output=True,
                          text=True, check=True).stdout


def _hexdump(text: str) -> bytes:
    """The config bytes in an ``lspci -xxx`` listing."""
    rows = re.findall(r"^([0-9a-f]{2}): ((?:[0-9a-f]{2} ?){16})$", text, re.M)
    return b"".join(bytes.fromhex(r[1]) for r in rows)


def _compare(boot: Boot, dev: str, tmp_path: Path) -> str:
    """The guest's ``lspci -vvv -xxx`` of ``dev``, after checking that its config bytes
    are ours (acrn-pydm lspci, same -s line) outside the VIRTUALIZED fields."""
    slot = boot.slots[dev]
    text = boot.lspci(slot)
    guest = _hexdump(text)
    assert guest == boot.pci()[slot][2], f"lspci -xxx and sysfs disagree:\n{text}"
    ours = boot.ours[dev]
    assert len(guest) == len(ours) == 256, text
    mask = _programmable(ours)
    differ = [off for off in range(256) if (guest[off] ^ ours[off]) & ~mask[off] & 0xFF]
    assert not differ, (f"{dev}: config bytes differ outside the virtualized fields at "
                        f"{[hex(o) for o in differ]}\n--- the guest's lspci ---\n{text}\n"
                        f"--- acrn-pydm lspci ---\n{_lspci(ours, tmp_path, 'ours')}")
    return text


@pytest.mark.parametrize("dev", ["blk", "net", "rnd", "con"])
def test_lspci_msix_boot(msix: Boot, dev: str, tmp_path: Path) -> None:
    text = _compare(msix, dev, tmp_path)
    assert re.search(r"MSI-X: Enable\+ Count=\d+ Masked-", text), text
    assert "Kernel driver in use: virtio-pci" in text, text


@pytest.mark.parametrize("dev", ["blk", "rnd"])
def test_lspci_intx_boot(intx: Boot, dev: str, tmp_path: Path) -> None:
    text = _compare(intx, dev, tmp_path)
    assert "Kernel driver in use: virtio-pci" in text, text
    assert "MSI-X: Enable-" in text and re.search(r"Interrupt: pin A routed to IRQ 1[01]", text), \
        text


def test_lspci_vmsix_boot(vmsix: Boot, tmp_path: Path) -> None:
    """The guest's lspci -vvv: an MSI-X capability with the emulated table size (8) in the
    emulated BAR, and no MSI capability."""
    text = _compare(vmsix, "pt", tmp_path)
    assert f"MSI-X: Enable- Count={VMSIX_VECTORS} Masked-" in text, text
    assert "Vector table: BAR=1 offset=00000000" in text and "PBA: BAR=1 offset=00000800" in text
    assert "MSI:" not in text, text
