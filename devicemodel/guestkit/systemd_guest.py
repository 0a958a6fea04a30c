"""A Debian 13 guest whose PID 1 is systemd, booted in QEMU (TCG), for checks that need a
real service manager (the acrn-pydm@.service sandbox, watchdog, restarts, networkd).

Why this shape: the development machines have no systemd as PID 1, but the Debian cloud
kernel that ``qemu`` already caches boots a Debian root with systemd under TCG. The root is
``debootstrap``-ed once (minbase trixie plus ``PACKAGES``: about 35 s + 20 s here), given the
kernel's whole module tree, and packed with ``mkfs.ext4 -d`` into a raw disk image that is
cached under ``~/.cache/acrn-pydm`` and keyed by everything that went into it, so a second run
only boots. QEMU opens the image with ``snapshot=on``: every boot starts from the same root.

The cloud kernel has ext4 built in but virtio as modules, so a tiny busybox initramfs (made
by ``qemu.build_initramfs`` with another /init) loads the virtio modules, mounts the image,
copies the caller's files into it and ``switch_root``-s to ``/lib/systemd/systemd``. One of
those files is a service that runs the caller's script once the system is up, with its
output on the second serial port (a host file, apart from the console's noise), and then
powers the guest off. The script reports in sections (``section NAME cmd...`` in the
script's prelude), which ``parse_sections`` turns back into a dict for the test to judge.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from devicemodel.guestkit import trixie
from devicemodel.guestkit.qemu import (
    Kernel,
    build_initramfs,
    cache_dir,
    can_run_guests,
    run_qemu,
)

PACKAGES = ("systemd-sysv", "udev", "dbus", "kmod", "iproute2", "procps", "python3",
            "python3-pip", "python3-trio", "python3-construct", "python3-pyudev")
IMAGE_FORMAT = 1  # bump when the build steps below change what the image holds
IMAGE_SIZE = "1536M"  # sparse; the root uses about 350 MB
NIC_MAC = "52:54:00:12:34:56"  # the guest's wired port (ens2), which networkd puts on acrn-br0
CHECK_DIR = "/root/guest-check"  # where the caller's files land in the guest
SECTION = "@@"

# Runs the caller's script once the system is up; its output goes to the second serial port.
RUNNER_UNIT = f"""[Unit]
Description=Guest checks of the acrn-pydm integration test
After=systemd-networkd.service network.target dbus.service

[Service]
Type=oneshot
# through a pipe, so that nothing in the script thinks it writes to a terminal (colours)
ExecStart=/bin/sh -c '/bin/bash {CHECK_DIR}/run 2>&1 | cat >/dev/ttyS1'
TimeoutStartSec=infinity
ExecStopPost=/usr/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
"""

# The prelude every check script gets: ``section NAME cmd...`` runs cmd and frames its output.
PRELUDE = f"""set -u
section() {{
    local name=$1 rc
    shift
    echo "{SECTION} BEGIN $name"
    "$@" 2>&1
    rc=$?
    echo "{SECTION} END $name rc=$rc"
    return $rc
}}
"""

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
    insmod "/lib/modules/$m" 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "{mark} FAIL boot: cannot mount the root image on /dev/vda"
    poweroff -f
fi
cp -a /payload/. /newroot/
chmod 0644 /newroot/etc/systemd/system/guest-check.service
wants=/newroot/etc/systemd/system/multi-user.target.wants
ln -sf /etc/systemd/system/guest-check.service "$wants/guest-check.service"
umount /proc /sys
umount /dev
exec switch_root /newroot /lib/systemd/systemd
"""


class RootUnavailable(RuntimeError):
    """The root cannot be built here (no Debian mirror reachable): a reason to skip."""


@dataclass(frozen=True)
class SystemdImage:
    """A cached root image and the kernel whose modules it carries."""

    path: Path
    kernel: Kernel
    versions: dict[str, str]  # package -> Debian version, as installed


@dataclass
class Section:
    rc: int
    text: str


@dataclass
class SystemdRun:
    """One boot: the console log, what the script printed, and its sections."""

    console: str
    output: str
    timed_out: bool
    sections: dict[str, Section] = field(default_factory=dict)

    def report(self, tail: int = 12000) -> str:
        state = "timed out" if self.timed_out else "ended"
        return (f"guest {state}\n--- check output ---\n{self.output[-tail:]}\n"
                f"--- console (tail) ---\n{self.console[-tail:]}")

    def section(self, name: str) -> Section:
        """A section the script must have printed (else an AssertionError with the logs)."""
        if name not in self.sections:
            raise AssertionError(f"the guest printed no section {name!r}\n{self.report()}")
        return self.sections[name]


def parse_sections(text: str) -> dict[str, Section]:
    """``@@ BEGIN name`` ... ``@@ END name rc=N`` blocks; an unfinished one gets rc -1."""
    sections: dict[str, Section] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.replace("\r", "").splitlines():
        begin = re.fullmatch(rf"{SECTION} BEGIN (\S+)", line)
        end = re.fullmatch(rf"{SECTION} END (\S+) rc=(\d+)", line)
        if begin:
            if name is not None:
                sections[name] = Section(-1, "\n".join(lines))
            name, lines = begin.group(1), []
        elif end and end.group(1) == name:
            sections[name] = Section(int(end.group(2)), "\n".join(lines))
            name = None
        elif name is not None:
            lines.append(line)
    if name is not None:
        sections[name] = Section(-1, "\n".join(lines))
    return sections


def why_not() -> str | None:
    """Why the image cannot be built or booted here (None if it can): for pytest.skip."""
    for tool in ("debootstrap", "mkfs.ext4", "depmod"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test.sh installs it)"
    if os.geteuid() != 0:
        return "needs root to debootstrap and chroot the Debian 13 root"
    return can_run_guests()


def image_key(kernel: Kernel) -> str:
    """What the image is made of, hashed: a new package list or kernel gives a new image."""
    what = {"format": IMAGE_FORMAT, "suite": trixie.SUITE, "packages": sorted(PACKAGES),
            "kernel": kernel.release, "size": IMAGE_SIZE}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _build_root(root: Path, kernel: Kernel, log: Path) -> None:
    """debootstrap minbase trixie, install PACKAGES, add the kernel's modules, set it up."""
    try:
        trixie._run(["debootstrap", "--variant=minbase", trixie.SUITE, str(root),
                     trixie.MIRROR], log, trixie.BUILD_TIMEOUT_S)
    except RuntimeError as e:
        text = str(e)
        if "Failed getting release file" in text or "Temporary failure" in text or \
                "Could not resolve" in text or "unable to resolve" in text.lower():
            raise RootUnavailable(f"cannot debootstrap {trixie.SUITE} from {trixie.MIRROR} "
                                  "(no network?)") from None
        raise
    chroot = ["chroot", str(root)]
    trixie._run([*chroot, "apt-get", "update", "-qq"], log, trixie.BUILD_TIMEOUT_S)
    trixie._run([*chroot, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 *PACKAGES], log, trixie.BUILD_TIMEOUT_S)
    trixie._run([*chroot, "apt-get", "clean"], log, 60)
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    # the whole module tree of the kernel that boots it (tun, bridge, ... on demand)
    src = kernel.modules.parent
    dest = root / "lib/modules" / kernel.release
    shutil.copytree(src, dest, symlinks=True)
    trixie._run(["depmod", "-b", str(root), kernel.release], log, 300)
    (root / "etc/hostname").write_text("sos\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 sos\n")
    (root / "etc/fstab").write_text("# the root is /dev/vda, mounted by the initramfs\n")
    (root / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    trixie._run([*chroot, "systemctl", "enable", "systemd-networkd.service"], log, 60)
    # nothing logs in: keep the console for the kernel and systemd
    trixie._run([*chroot, "systemctl", "mask", "serial-getty@ttyS0.service",
                 "getty@tty1.service", "serial-getty@ttyS1.service"], log, 60)


def _versions(root: Path) -> dict[str, str]:
    out = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f",
                          "${Package} ${Version}\\n", *PACKAGES],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def ensure_image(kernel: Kernel, cache: Path | None = None) -> SystemdImage:
    """The cached root image for ``kernel`` (built on first use, about a minute).

    Builds are serialised by a lock file and happen in a temporary directory renamed into
    place when complete; images of other keys (older package lists, kernels) are removed.
    """
    cache = cache or cache_dir()
    name = f"debian13-systemd-{image_key(kernel)}"
    done = cache / name
    with open(cache / "debian13-systemd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (done / trixie.READY).exists():
            for old in cache.glob("debian13-systemd-*"):
                if old.is_dir():
                    trixie._discard(old)
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".debian13-systemd-"))
            log = cache / "debian13-systemd.build.log"
            log.write_text("")
            try:
                root = tmp / "root"
                root.mkdir(mode=0o755)
                _build_root(root, kernel, log)
                versions = _versions(root)
                subprocess.run(["truncate", "-s", IMAGE_SIZE, str(tmp / "root.img")],
                               check=True)
                trixie._run(["mkfs.ext4", "-q", "-F", "-L", "sos-root", "-d", str(root),
                             str(tmp / "root.img")], log, 600)
                trixie._discard(root)
                (tmp / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
                (tmp / trixie.READY).write_text(kernel.release + "\n")
                tmp.rename(done)
            except BaseException:
                trixie._discard(tmp)
                raise
    versions = json.loads((done / "versions.json").read_text())
    return SystemdImage(done / "root.img", kernel, versions)


def build_wheel(repo: Path, out: Path, timeout: float = 600) -> Path:
    """``pip wheel`` of the checkout, from a copy (the build leaves egg-info and build/)."""
    with tempfile.TemporaryDirectory(prefix="acrn-pydm-src-") as d:
        src = Path(d) / "src"
        src.mkdir()
        for item in ("pyproject.toml", "README.md"):
            shutil.copy2(repo / item, src / item)
        shutil.copytree(repo / "devicemodel", src / "devicemodel",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["python3", "-m", "pip", "wheel", "-q", "--no-deps",
                               "--disable-pip-version-check", "-w", str(out), str(src)],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"pip wheel failed ({proc.returncode}):\n{proc.stdout}"
                               f"{proc.stderr}")
    wheels = sorted(out.glob("acrn_pydm-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip wheel made no acrn_pydm wheel in {out}")
    return wheels[-1]


def boot_initramfs(kernel: Kernel, script: str, files: dict[str, Path | bytes],
                   out: Path) -> Path:
    """The small initramfs: virtio modules, the switch_root /init and the check payload.

    ``files`` maps names under CHECK_DIR to host files or contents; ``script`` (after
    PRELUDE) becomes CHECK_DIR/run, started by the runner unit.
    """
    payload: dict[str, Path | bytes] = {
        f"/payload{CHECK_DIR}/{name}": content for name, content in files.items()}
    payload[f"/payload{CHECK_DIR}/run"] = (PRELUDE + script).encode()
    payload["/payload/etc/systemd/system/guest-check.service"] = RUNNER_UNIT.encode()
    return build_initramfs(kernel, "# unused: the runner unit starts the checks\n", out,
                           payload, init=INIT)


def run_guest(image: SystemdImage, initrd: Path, work: Path, timeout: float,
              mem_mb: int = 1024, cpus: int = 2, echo: bool = False) -> SystemdRun:
    """Boot the image with ``initrd``'s payload; return when the guest powers off."""
    output = work / "ttyS1.txt"
    output.write_bytes(b"")
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", str(mem_mb), "-smp", str(cpus),
        "-nodefaults", "-nographic", "-no-reboot", "-monitor", "none",
        "-serial", "stdio", "-serial", f"file:{output}",
        "-kernel", str(image.kernel.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 loglevel=4 systemd.show_status=error",
        "-drive", f"file={image.path},format=raw,if=virtio,snapshot=on",
        # a wired port that leads nowhere: the Service VM's e* interface on acrn-br0
        "-netdev", "hubport,id=lan,hubid=0",
        "-device", f"virtio-net-pci,netdev=lan,mac={NIC_MAC},romfile=",
    ]
    run = run_qemu(cmd, timeout, echo=echo)
    text = output.read_bytes().decode(errors="replace").replace("\r", "")
    return SystemdRun(run.log, text, run.timed_out, parse_sections(text))
