"""A QEMU new enough to attach a vhost-user console: Debian 13 (trixie) + backports, in a chroot.

Why: QEMU 7.2 (Debian 12) has no vhost-user console device and crashes when a guest enables
MSI-X on virtio-net over vhost-user. QEMU's generic vhost-user device (any virtio ID, config
space read from the back end with GET_CONFIG) can only be created by users since it was
renamed ``vhost-user-test-device-pci``: Debian 13's own QEMU 10.0 has it as
``vhost-user-device-pci`` with ``user_creatable = false`` ("expects a pluggable device
type"), trixie-backports' QEMU 11.1 has the user-creatable one.

So on a Debian 12 host the tests ``debootstrap`` a minimal trixie root once (about 70 s and
250 MB here), install ``qemu-system-x86`` from trixie-backports into it, cache it under
``~/.cache/acrn-pydm`` like the guest kernel, and run QEMU in it with ``chroot``. A host
whose own QEMU already has the device is used as it is. Files QEMU must open (kernel,
initramfs, vhost-user sockets) go into a work directory inside the root.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devicemodel.guestkit.qemu import Kernel, cache_dir

DEVICE = "vhost-user-test-device-pci"
SUITE = "trixie"
BACKPORTS = "trixie-backports"
MIRROR = os.environ.get("ACRN_PYDM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ROOT_NAME = "debian13-qemu"
READY = ".acrn-pydm-ready"  # written last: a root without it is an interrupted build
BUILD_TIMEOUT_S = 900
CONSOLE_CONFIG_SIZE = 12  # cols, rows, max_nr_ports, emerg_wr (virtio 1.2 §5.3.4)
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}


@dataclass(frozen=True)
class Qemu:
    """A qemu-system-x86_64 that has ``DEVICE``: the host's, or one inside a chroot."""

    root: Path  # "/" for the host's own QEMU
    version: str

    @property
    def chrooted(self) -> bool:
        return self.root != Path("/")

    def command(self, args: list[str]) -> list[str]:
        """A QEMU command line (paths as QEMU sees them) made runnable from the host."""
        return ["chroot", str(self.root), *args] if self.chrooted else args

    def inner(self, path: Path) -> Path:
        """The path QEMU sees for a host path inside ``self.root``."""
        return Path("/") / path.relative_to(self.root)

    def stage_kernel(self, kernel: Kernel, work: Path) -> Kernel:
        """``kernel`` as QEMU sees it: a chrooted QEMU gets a copy of the bzImage in ``work``."""
        if not self.chrooted:
            return kernel
        shutil.copy2(kernel.vmlinuz, work / "vmlinuz")
        return Kernel(kernel.release, self.inner(work / "vmlinuz"), kernel.modules)

    @contextmanager
    def workdir(self) -> Iterator[Path]:
        """A fresh host directory QEMU can reach too (inside the root's /tmp); removed after."""
        base = self.root / "tmp"
        base.mkdir(exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="acrn-pydm-", dir=base))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


def console_device_args(name: str, sock: Path, ports: int = 1) -> list[str]:
    """QEMU options that present a vhost-user virtio-console (virtio ID 3) through DEVICE.

    The generic device knows nothing about consoles: it needs the queue count (two per port
    plus the two control queues) and the config size; the config itself (max_nr_ports)
    comes from the back end through GET_CONFIG. ``sock`` is the path as QEMU sees it.
    """
    return ["-chardev", f"socket,id={name},path={sock}",
            "-device", f"{DEVICE},chardev={name},virtio-id=3,num_vqs={2 * ports + 2},"
                       f"config_size={CONSOLE_CONFIG_SIZE}"]


def _has_device(cmd: list[str]) -> str | None:
    """QEMU's version line if ``cmd`` (a qemu-system-x86_64 invocation) offers DEVICE."""
    try:
        devices = subprocess.run([*cmd, "-device", "help"], capture_output=True, text=True,
                                 timeout=60, check=False).stdout
        if f'name "{DEVICE}"' not in devices:
            return None
        return subprocess.run([*cmd, "--version"], capture_output=True, text=True,
                              timeout=60, check=False).stdout.splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def why_not() -> str | None:
    """Why no suitable QEMU can be had here (None if it can): for pytest.skip."""
    if shutil.which("qemu-system-x86_64") and _has_device(["qemu-system-x86_64"]):
        return None
    if os.geteuid() != 0:
        return f"needs root to debootstrap and chroot a Debian 13 root for QEMU's {DEVICE}"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (scripts/test.sh installs it)"
    return None


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return sorted((m for m in points if m.startswith(prefix)), key=len, reverse=True)


def _discard(path: Path) -> None:
    """Remove a (possibly half-built) root; never descend into something still mounted."""
    for mount in _mounts_under(path):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    if _mounts_under(path):
        raise RuntimeError(f"{path} still has mounts; not removing it")
    shutil.rmtree(path, ignore_errors=True)


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False,
                              env=CHROOT_ENV)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{tail}")


def _build(root: Path, log: Path) -> None:
    """debootstrap a minbase trixie root and install trixie-backports' QEMU into it."""
    _run(["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR], log, BUILD_TIMEOUT_S)
    (root / "etc/apt/sources.list.d/backports.list").write_text(
        f"deb {MIRROR} {BACKPORTS} main\n")
    chroot = ["chroot", str(root)]
    _run([*chroot, "apt-get", "update", "-qq"], log, BUILD_TIMEOUT_S)
    _run([*chroot, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
          "-t", BACKPORTS, "qemu-system-x86"], log, BUILD_TIMEOUT_S)
    _run([*chroot, "apt-get", "clean"], log, 60)
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)  # ~100 MB, not needed


def needs_build(cache: Path | None = None) -> bool:
    """Whether ensure_qemu would have to build the root first (to tell a user it takes a while)."""
    if shutil.which("qemu-system-x86_64") and _has_device(["qemu-system-x86_64"]):
        return False
    return not ((cache or cache_dir()) / ROOT_NAME / READY).exists()


def ensure_qemu(cache: Path | None = None) -> Qemu:
    """The host's QEMU if it has DEVICE, else the cached trixie root (built on first use).

    Builds are serialised by a lock file, happen in a temporary directory and are renamed
    into place when complete, so an interrupted build is never mistaken for a root.
    """
    host = shutil.which("qemu-system-x86_64") and _has_device(["qemu-system-x86_64"])
    if host:
        return Qemu(Path("/"), host)
    cache = cache or cache_dir()
    root = cache / ROOT_NAME
    with open(cache / f"{ROOT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / READY).exists():
            if root.exists():
                _discard(root)
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{ROOT_NAME}-"))
            tmp.chmod(0o755)  # it becomes the chroot's /
            log = cache / f"{ROOT_NAME}.build.log"
            log.write_text("")
            try:
                _build(tmp, log)
                version = _has_device(["chroot", str(tmp), "qemu-system-x86_64"])
                if version is None:
                    raise RuntimeError(f"{BACKPORTS}' qemu-system-x86_64 has no {DEVICE}")
                (tmp / READY).write_text(version + "\n")
                tmp.rename(root)
            except BaseException:
                _discard(tmp)
                raise
    return Qemu(root, (root / READY).read_text().strip())
