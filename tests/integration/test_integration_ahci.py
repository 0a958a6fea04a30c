"""An unmodified Linux binds its ``ahci`` driver to our AHCI controller, served whole
over vfio-user to QEMU 11.1, and uses the disk and the CD-ROM behind it.

The Debian cloud kernel has no AHCI driver, so this boots the generic one
(``linux-image-*-amd64``) with ahci, libahci, libata, sd_mod, sr_mod, cdrom, isofs and
ext4 from its module tree, plus hdparm from Debian's package. One controller,
``ahci,hd:<disk>,writeback,cd:<iso>``: port 0 a disk, port 1 a CD-ROM with an ISO 9660
image xorriso made on the host. The guest

* reads a pattern the host planted, writes one the host finds in the image, makes an
  ext2 filesystem, writes a file, and reads it back after dropping its caches;
* discards a range the host filled (blkdiscard: DATA SET MANAGEMENT TRIM) that must then
  be a hole in the image, and runs fstrim on the filesystem;
* prints ``hdparm -I`` (IDENTIFY as Linux decodes it), turns the write cache off and on
  (SET FEATURES) and flushes it (FLUSH CACHE EXT);
* mounts /dev/sr0, checks a file's checksum against the host's, ejects the tray (the
  drive then has no medium), closes it again and reads the file once more.

``acrn-pydm vfio-user -v`` logs every ATA and ATAPI opcode the first time the guest sends
it; ``test_commands_linux_sent`` lists them and which we serve.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devicemodel.guestkit import qemu as g
from devicemodel.guestkit import trixie

pytestmark = pytest.mark.integration

MiB = 1 << 20
DISK_SIZE = 64 * MiB
PLANTED_AT, GUEST_AT, TRIM_AT, TRIM_LEN = 40 * MiB, 48 * MiB, 56 * MiB, 4 * MiB
PLANTED = (b"planted-by-the-host-" * 3300)[:65536]
GUEST_PATTERN = (b"guest-wrote-this-" * 4000)[:65536]
CD_FILE = os.urandom(300_000)  # not a multiple of the 2048-byte block
CD_LABEL = "ACRNPYDM"
SLOT = 3

SCRIPT = f"""
for i in $(seq 50); do [ -b /dev/sda ] && [ -b /dev/sr0 ] && break; sleep 0.1; done
drv=$(basename "$(readlink /sys/bus/pci/devices/0000:00:0{SLOT}.0/driver)" 2>/dev/null)
[ "$drv" = ahci ] && pass bound || fail bound "driver [$drv]"
[ -b /dev/sda ] && pass sda || fail sda "no /dev/sda"
[ -b /dev/sr0 ] && pass sr0 || fail sr0 "no /dev/sr0"
q=/sys/block/sda/queue
info "sda size=$(cat /sys/block/sda/size) rotational=$(cat $q/rotational) \
depth=$(cat /sys/block/sda/device/queue_depth) discard_max=$(cat $q/discard_max_bytes) \
cache=$(cat $q/write_cache | tr ' ' _) lbs=$(cat $q/logical_block_size)"
grep -E 'ahci|ata' /proc/interrupts | while IFS= read -r l; do info "irq $l"; done
lspci -vvv -s 00:0{SLOT}.0 2>&1 | while IFS= read -r l; do info "lspci $l"; done

hdparm -I /dev/sda > /tmp/hdparm 2>&1 && pass hdparm || fail hdparm "$(cat /tmp/hdparm)"
while IFS= read -r l; do info "hdparm $l"; done < /tmp/hdparm

pat=$(dd if=/dev/sda bs=65536 skip={PLANTED_AT // 65536} count=1 iflag=direct 2>/dev/null \\
      | md5sum | cut -d' ' -f1)
[ "$pat" = {hashlib.md5(PLANTED).hexdigest()} ] && pass planted || fail planted "read [$pat]"
yes guest-wrote-this- | tr -d '\\n' | head -c 65536 > /tmp/gpat
dd if=/tmp/gpat of=/dev/sda bs=65536 seek={GUEST_AT // 65536} conv=fsync 2>/dev/null \\
  && pass write || fail write "dd failed"
if mke2fs -q -b 1024 /dev/sda 32768 && mount -t ext2 /dev/sda /mnt \\
   && cp /tmp/gpat /mnt/gpat && sync && umount /mnt && echo 3 > /proc/sys/vm/drop_caches \\
   && mount -t ext2 /dev/sda /mnt && cmp /tmp/gpat /mnt/gpat
then pass ext2; else fail ext2 "mkfs/mount/write/read failed"; fi
fstrim -v /mnt > /tmp/fstrim 2>&1 && pass fstrim || fail fstrim "$(cat /tmp/fstrim)"
info "fstrim $(cat /tmp/fstrim)"
umount /mnt
blkdiscard -o {TRIM_AT} -l {TRIM_LEN} /dev/sda && pass trim || fail trim "blkdiscard failed"
z=$(dd if=/dev/sda bs=65536 skip={TRIM_AT // 65536} count=1 iflag=direct 2>/dev/null \\
    | md5sum | cut -d' ' -f1)
[ "$z" = {hashlib.md5(bytes(65536)).hexdigest()} ] && pass trim-zeroes \\
  || fail trim-zeroes "read [$z]"
wc() {{ hdparm -I /dev/sda | grep 'Write cache' | tr -d ' \t' | tr '\n' ' '; }}
hdparm -W0 /dev/sda >/dev/null 2>&1 && [ "$(wc)" = "Writecache " ] \\
  && pass cache-off || fail cache-off "[$(wc)]"
hdparm -W1 /dev/sda >/dev/null 2>&1 && [ "$(wc)" = "*Writecache " ] \\
  && pass cache-on || fail cache-on "[$(wc)]"
hdparm -F /dev/sda > /tmp/flush 2>&1 && pass flush || fail flush "$(cat /tmp/flush)"

mkdir -p /cdrom
cdsum() {{ md5sum /cdrom/readme.bin 2>/dev/null | cut -d' ' -f1; }}
if mount -t iso9660 -o ro /dev/sr0 /cdrom; then
  info "cd label $(ls /dev/disk/by-label 2>/dev/null)"
  s=$(cdsum); umount /cdrom
  [ "$s" = {hashlib.md5(CD_FILE).hexdigest()} ] && pass cd-read || fail cd-read "md5 [$s]"
else
  fail cd-read "mount failed"
fi
cat /proc/sys/dev/cdrom/info > /tmp/cdinfo  # busybox read gets nothing from sysctl files
while IFS= read -r l; do info "cdinfo $l"; done < /tmp/cdinfo
/bin/guest_cdrom /dev/sr0 eject && pass cd-eject || fail cd-eject "CDROMEJECT failed"
st=$(/bin/guest_cdrom /dev/sr0 status)
[ "$st" = tray-open ] && pass cd-tray-open || fail cd-tray-open "status [$st]"
dd if=/dev/sr0 of=/dev/null bs=2048 count=1 2>/dev/null \\
  && fail cd-no-medium "read a block with the tray open" || pass cd-no-medium
/bin/guest_cdrom /dev/sr0 close && pass cd-close || fail cd-close "CDROMCLOSETRAY failed"
st=$(/bin/guest_cdrom /dev/sr0 status)
if [ "$st" = disc-ok ] && mount -t iso9660 -o ro /dev/sr0 /cdrom; then
  s=$(cdsum); umount /cdrom
  [ "$s" = {hashlib.md5(CD_FILE).hexdigest()} ] && pass cd-reload || fail cd-reload "md5 [$s]"
else
  fail cd-reload "status [$st], or mount failed"
fi
sync
"""

# ahci-cd,<iso>,hd:<disk>: the CD-ROM on port 0, the disk on port 1
INTX_SCRIPT = f"""
for i in $(seq 50); do [ -b /dev/sda ] && [ -b /dev/sr0 ] && break; sleep 0.1; done
grep -E 'ahci' /proc/interrupts | while IFS= read -r l; do info "irq $l"; done
d=/sys/bus/pci/devices/0000:00:0{SLOT}.0
info "config $(od -An -tx1 -v -N 256 $d/config | tr -d ' \\n')"
pat=$(dd if=/dev/sda bs=65536 skip={PLANTED_AT // 65536} count=1 iflag=direct 2>/dev/null \\
      | md5sum | cut -d' ' -f1)
[ "$pat" = {hashlib.md5(PLANTED).hexdigest()} ] && pass planted || fail planted "read [$pat]"
yes guest-wrote-this- | tr -d '\\n' | head -c 65536 > /tmp/gpat
dd if=/tmp/gpat of=/dev/sda bs=65536 seek={GUEST_AT // 65536} conv=fsync 2>/dev/null \\
  && pass write || fail write "dd failed"
mkdir -p /cdrom
if mount -t iso9660 -o ro /dev/sr0 /cdrom; then
  s=$(md5sum /cdrom/readme.bin | cut -d' ' -f1); umount /cdrom
  [ "$s" = {hashlib.md5(CD_FILE).hexdigest()} ] && pass cd-read || fail cd-read "md5 [$s]"
else
  fail cd-read "mount failed"
fi
"""


@dataclass
class Boot:
    run: g.GuestRun
    log: str
    image: Path
    #: the config space ``acrn-pydm lspci`` shows for the same -s line
    ours: bytes

    def check(self, *steps: str) -> None:
        try:
            self.run.check(*steps)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- acrn-pydm vfio-user ---\n{self.log}") from None

    def info(self, prefix: str) -> list[str]:
        return [line[len(prefix):] for line in self.run.info if line.startswith(prefix)]

    def commands(self) -> list[str]:
        """The ATA/ATAPI opcodes the guest sent, "port N: <kind> <opcode> <name>", as the
        device logged each the first time."""
        return sorted(set(re.findall(r"(port \d+ \((?:hd|cd)\)): first "
                                     r"((?:ATA|ATAPI) 0x[0-9a-f]{2} [^\n\[]*?)\s*(?:\[|$)",
                                     self.log, re.M)))


def _why_not() -> str | None:
    return (g.can_run_guests() or trixie.why_not()
            or (None if shutil.which("gcc") else "gcc is not installed")
            or (None if shutil.which("lspci") else "pciutils is not installed")
            or (None if shutil.which("xorriso") else "xorriso is not installed"))


def _disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(PLANTED_AT)
        f.write(PLANTED)
        f.seek(TRIM_AT)
        f.write(b"\xa5" * TRIM_LEN)
    return path


def _iso(path: Path) -> Path:
    src = path.parent / "iso-root"
    src.mkdir()
    (src / "readme.bin").write_bytes(CD_FILE)
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", CD_LABEL, "-o", str(path),
                    str(src)], check=True, capture_output=True)
    return path


def _guest_files(work: Path) -> dict[str, Path]:
    prog = work / "guest_cdrom"
    src = Path(__file__).resolve().parents[1] / "support" / "guest_cdrom.c"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(prog), str(src)], check=True)
    lspci = shutil.which("lspci")
    assert lspci is not None
    hdparm = g.fetch_package("hdparm") / "sbin/hdparm"
    return {**g.with_libraries(Path(lspci), "/bin/lspci"),
            **g.with_libraries(hdparm, "/sbin/hdparm"), "/bin/guest_cdrom": prog}




def _boot(name: str, spec: str, script: str, image: Path, *, append: str = "") -> Boot:
    """The generic kernel on ``acrn-pydm vfio-user -v <spec>`` at slot 3."""
    qemu = trixie.ensure_qemu()
    kernel = g.fetch_kernel(flavours=g.GENERIC)
    with qemu.workdir() as work:
        g.build_initramfs(kernel, script, work / "initrd.gz", files=_guest_files(work),
                          modules=g.AHCI_MODULES)
        sock = work / "ahci.sock"
        be = g.start_backend(spec, sock, extra=["-v"], command="vfio-user")
        try:
            cmd = g.qemu_command(qemu.stage_kernel(kernel, work),
                                 qemu.inner(work / "initrd.gz"),
                                 g.vfio_user_device_args(qemu.inner(sock), addr=SLOT),
                                 append=append)
            run = g.run_qemu(qemu.command(cmd), timeout=300)
        finally:
            g.stop_backend(be)
        log = be.log()
        ours = _acrn_pydm_config(spec)
    if os.environ.get("ACRN_PYDM_AHCI_LOG"):  # for debugging: both logs, whole
        Path(f"{os.environ['ACRN_PYDM_AHCI_LOG']}.{name}").write_text(
            run.log + "\n---\n" + log)
    return Boot(run, log, image, ours)


def _acrn_pydm_config(spec: str) -> bytes:
    """The 256 config bytes ``acrn-pydm lspci -s 3,<spec>`` shows."""
    out = subprocess.run([sys.executable, "-m", "devicemodel", "lspci", "-s", "0:0,hostbridge",
                          "-s", f"{SLOT},{spec}", "ahci"], cwd=g.REPO, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    rows = out.split(f"00:0{SLOT}.0", 1)[1].splitlines()[1:17]
    return bytes.fromhex("".join(row.split(":", 1)[1] for row in rows))


def _media(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, Path]:
    """A disk image and a CD image for one boot (or the reason guests cannot run here)."""
    why = _why_not()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp(name)
    return _disk(tmp / "disk.img"), _iso(tmp / "cd.iso")


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    image, iso = _media(tmp_path_factory, "ahci")
    yield _boot("msi", f"ahci,hd:{image},writeback,cd:{iso}", SCRIPT, image)


@pytest.fixture(scope="module")
def intx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    """``pci=nomsi``: the controller's level-triggered INTx, through QEMU's line."""
    image, iso = _media(tmp_path_factory, "ahci-intx")
    yield _boot("intx", f"ahci-cd,{iso},hd:{image}", INTX_SCRIPT, image, append="pci=nomsi")


def test_boot_finishes(boot: Boot) -> None:
    assert boot.run.done and not boot.run.timed_out, boot.run.report() + boot.log


def test_linux_binds_ahci_and_sees_both_drives(boot: Boot) -> None:
    boot.check("bound", "sda", "sr0")
    (sda,) = boot.info("sda ")
    fields = dict(kv.split("=", 1) for kv in sda.split())
    assert fields["size"] == str(DISK_SIZE // 512)
    assert fields["rotational"] == "0"  # IDENTIFY word 217
    assert int(fields["depth"]) > 1  # NCQ
    assert int(fields["discard_max"]) > 0  # TRIM
    assert fields["cache"] == "write_back"  # the writeback option: the write cache is on
    lspci = "\n".join(boot.info("lspci "))
    assert "Class 0106: Device 8086:2821 (prog-if 01)" in lspci, lspci  # no pci.ids here
    assert "Kernel driver in use: ahci" in lspci, lspci
    assert re.search(r"MSI: Enable\+", lspci), lspci


def test_disk_data(boot: Boot) -> None:
    boot.check("planted", "write", "ext2")
    data = boot.image.read_bytes()
    assert data[GUEST_AT : GUEST_AT + 65536] == GUEST_PATTERN


def test_trim_punches_holes(boot: Boot) -> None:
    boot.check("trim", "trim-zeroes", "fstrim")
    data = boot.image.read_bytes()
    assert data[TRIM_AT : TRIM_AT + TRIM_LEN] == bytes(TRIM_LEN)
    fd = os.open(boot.image, os.O_RDONLY)
    try:  # deallocated, not written with zeroes
        assert os.lseek(fd, TRIM_AT, os.SEEK_HOLE) == TRIM_AT
    finally:
        os.close(fd)


def test_hdparm_identify(boot: Boot) -> None:
    boot.check("hdparm", "cache-off", "cache-on", "flush")
    text = "\n".join(boot.info("hdparm "))
    assert re.search(r"Model Number:\s+ACRN-DM SATA DISK\s*$", text, re.M), text
    assert re.search(r"Serial Number:\s+ACRN--[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}", text), text
    assert re.search(r"Firmware Revision:\s+001", text), text
    assert re.search(rf"LBA48\s+user addressable sectors:\s+{DISK_SIZE // 512}\b", text), text
    assert re.search(r"Logical\s+Sector size:\s+512 bytes", text), text
    assert re.search(r"Nominal Media Rotation Rate: Solid State Device", text), text
    assert re.search(r"\*\s+Data Set Management TRIM supported", text), text
    assert re.search(r"\*\s+Native Command Queueing \(NCQ\)", text), text
    assert re.search(r"\*\s+FLUSH_CACHE_EXT", text), text
    assert re.search(r"\*\s+48-bit Address feature set", text), text
    assert re.search(r"Queue depth: 32", text), text
    assert re.search(r"Checksum: correct", text), text


def test_cdrom(boot: Boot) -> None:
    boot.check("cd-read", "cd-eject", "cd-tray-open", "cd-no-medium", "cd-close", "cd-reload")
    info = "\n".join(boot.info("cdinfo "))
    assert re.search(r"Can open tray:\s+1", info) and re.search(r"Can lock tray:\s+1", info), \
        boot.run.report()


def test_commands_linux_sent(boot: Boot) -> None:
    """Every ATA/ATAPI opcode the guest (SeaBIOS, then Linux) sent; the ones Linux
    needs for what it did are served, and the only one refused is the one a disk must
    refuse: SeaBIOS probes each port with IDENTIFY PACKET DEVICE first."""
    seen = boot.commands()
    print("\n".join(f"{port}: {cmd}" for port, cmd in seen))
    served = {cmd for _, cmd in seen if "(not served)" not in cmd}
    for must in ("ATA 0xec IDENTIFY DEVICE", "ATA 0xa1 IDENTIFY PACKET DEVICE",
                 "ATA 0x60 READ FPDMA QUEUED", "ATA 0x61 WRITE FPDMA QUEUED",
                 "ATA 0x06 DATA SET MANAGEMENT", "ATA 0xea FLUSH CACHE EXT",
                 "ATA 0xef SET FEATURES", "ATAPI 0x28 READ(10)",
                 "ATAPI 0x00 TEST UNIT READY", "ATAPI 0x1b START STOP UNIT"):
        assert must in served, seen
    refused = [(port, cmd) for port, cmd in seen if "(not served)" in cmd]
    assert refused == [("port 0 (hd)", "ATA 0xa1 IDENTIFY PACKET DEVICE (not served)")], seen


def test_intx_boot(intx: Boot) -> None:
    """With MSI off, INTx carries every completion: the drives in the other order
    (ahci-cd: the CD-ROM on port 0) still read, write and mount."""
    assert intx.run.done and not intx.run.timed_out, intx.run.report() + intx.log
    intx.check("planted", "write", "cd-read")
    assert intx.image.read_bytes()[GUEST_AT : GUEST_AT + 65536] == GUEST_PATTERN
    irqs = " ".join(intx.info("irq "))
    assert "IO-APIC" in irqs and "ahci" in irqs, irqs


# Config bytes QEMU's client virtualizes or the guest programs (command, latency timer,
# BAR address, interrupt line, the MSI capability's enable/MME/address/data/mask): the
# rest must be ours, byte for byte.
def _ours_outside_the_virtualized(ours: bytes, guest: bytes) -> list[int]:
    skip = {0x04, 0x05, 0x0D, 0x24, 0x25, 0x26, 0x27, 0x3C}
    skip |= {0x42} | set(range(0x44, 0x58))
    return [off for off in range(256) if off not in skip and ours[off] != guest[off]]


def test_the_guest_sees_our_config_space(intx: Boot) -> None:
    (line,) = intx.info("config ")
    guest = bytes.fromhex(line)
    assert len(guest) == 256 and len(intx.ours) == 256
    assert _ours_outside_the_virtualized(intx.ours, guest) == [], (guest.hex(), intx.ours.hex())
    assert guest[0x42] & 0x0E == intx.ours[0x42] & 0x0E  # 8 messages capable
    assert guest[0x24] & 0x0F == intx.ours[0x24] & 0x0F  # BAR5: 32-bit memory
