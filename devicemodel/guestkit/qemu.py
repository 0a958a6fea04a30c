"""Boot an unmodified Debian kernel in QEMU (TCG) whose virtio devices are served by acrn-pydm
over vhost-user, run a shell script inside it, and read the verdict from the serial console.

Why this shape: ACRN cannot run on the development machines and a stock kernel does not boot
under their paravirtual KVM (reference/guests.md), but QEMU TCG boots one in seconds and
speaks vhost-user, so the same device code the ioreq path uses is driven by a real Linux
driver. Everything comes from Debian packages: the kernel is ``apt-get download``-ed into a
cache and unpacked (never installed), the initramfs is busybox-static plus the virtio modules.

The guest script reports with ``pass NAME`` / ``fail NAME WHY`` (shell functions defined by
our ``/init``), which print marker lines on ttyS0; ``GuestRun.check`` turns a missing or
failed marker into an AssertionError that carries the whole serial log.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

MARK = "ACRN-PYDM-RESULT"
# where ``python -m devicemodel`` finds this package: the repository in a checkout (or an
# editable install), site-packages otherwise
REPO = Path(__file__).resolve().parents[2]

# The virtio modules we load; the order comes from their own ``depends`` (modinfo), because
# it differs between kernel builds (6.1.0-56's virtio needs virtio_ring first).
MODULES = (
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/char/virtio_console.ko",
    "drivers/char/hw_random/virtio-rng.ko",
)

# What an AHCI disk and CD-ROM need in the generic kernel (the cloud one has no AHCI):
# the SATA and SCSI layers, sd and sr, ISO 9660 and ext4 (which also mounts ext2), and
# the CRC algorithms they ask the crypto API for (no modprobe in our initramfs).
AHCI_MODULES = (
    "crypto/crc32c_generic.ko", "crypto/crct10dif_common.ko", "crypto/crct10dif_generic.ko",
    "lib/crc-t10dif.ko", "lib/crc64.ko", "crypto/crc64_rocksoft_generic.ko",
    "lib/crc64-rocksoft.ko", "block/t10-pi.ko", "drivers/scsi/scsi_common.ko",
    "drivers/scsi/scsi_mod.ko", "drivers/ata/libata.ko", "drivers/ata/libahci.ko",
    "drivers/ata/ahci.ko", "drivers/scsi/sd_mod.ko", "drivers/cdrom/cdrom.ko",
    "drivers/scsi/sr_mod.ko", "fs/isofs/isofs.ko", "lib/crc16.ko", "fs/mbcache.ko",
    "fs/jbd2/jbd2.ko", "fs/ext4/ext4.ko",
)

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
    # module parameters from the kernel command line (module.param=value), as modprobe
    # would pass them: insmod alone does not
    mod=$(echo "${m%.ko}" | tr - _)
    args=$(for w in $(cat /proc/cmdline); do case $w in "$mod".*) echo "${w#"$mod".}";; esac; done)
    insmod "/lib/modules/$m" $args || echo "insmod $m failed"
done
pass() { echo "{mark} PASS $1"; }
fail() { n="$1"; shift; echo "{mark} FAIL $n: $*"; }
info() { echo "{mark} INFO $*"; }
echo "{mark} BOOTED"
( . /test.sh )
echo "{mark} DONE rc=$?"
sync
poweroff -f
"""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/acrn-pydm`` (or ``~/.cache/acrn-pydm``): kernels survive runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "acrn-pydm"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package: the bzImage and its module tree."""

    release: str
    vmlinuz: Path
    modules: Path


def _apt_kernel_package(flavour: str) -> str | None:
    """The versioned image package the ``linux-image-<flavour>`` meta-package depends on."""
    try:
        out = subprocess.run(
            ["apt-cache", "depends", f"linux-image-{flavour}"],
            capture_output=True, text=True, timeout=60, check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Depends:\s+(linux-image-\S+-" + re.escape(flavour) + r")\b", out)
    return m.group(1) if m else None


def _unpacked(root: Path) -> Kernel | None:
    images = sorted(root.glob("boot/vmlinuz-*"))
    if not images:
        return None
    release = images[-1].name.removeprefix("vmlinuz-")
    mods = root / "lib/modules" / release / "kernel"
    return Kernel(release, images[-1], mods) if mods.is_dir() else None


#: the flavours ``fetch_kernel`` tries, fastest to boot first
FLAVOURS = ("cloud-amd64", "amd64")
#: the generic flavour alone: it has the drivers the cloud one leaves out (AHCI, ...)
GENERIC = ("amd64",)


def _of_flavour(root: Path, flavours: Sequence[str]) -> bool:
    return any(re.fullmatch(r"linux-image-[0-9.]+-[0-9]+-" + re.escape(f), root.name)
               for f in flavours)


def fetch_kernel(cache: Path | None = None, *, flavours: Sequence[str] = FLAVOURS) -> Kernel:
    """Download (once) and unpack the current kernel of the first of ``flavours`` apt
    has (the cloud kernel, else the generic one; ``GENERIC`` for drivers only the
    generic kernel builds, such as AHCI).

    A kernel already unpacked in the cache is reused without asking apt, so runs work
    offline after the first one.
    """
    cache = cache or cache_dir()
    if _apt_kernel_package("amd64") is None and os.geteuid() == 0:
        # a fresh container often ships without package lists
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    for flavour in flavours:
        pkg = _apt_kernel_package(flavour)
        if pkg is None:
            continue
        root = cache / pkg
        kernel = _unpacked(root)
        if kernel:
            return kernel
        debs = list(cache.glob(f"{pkg}_*.deb"))
        if not debs:
            subprocess.run(
                ["apt-get", "download", "-q", pkg], cwd=cache, check=False,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            debs = list(cache.glob(f"{pkg}_*.deb"))
        if not debs:
            continue
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], check=True)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        kernel = _unpacked(root)
        if kernel:
            return kernel
    for root in sorted(cache.glob("linux-image-*")):  # offline: anything unpacked earlier
        kernel = _unpacked(root) if root.is_dir() and _of_flavour(root, flavours) else None
        if kernel:
            return kernel
    raise RuntimeError(
        "no Debian kernel: `apt-get download linux-image-cloud-amd64` found nothing "
        "(run apt-get update?)"
    )


def fetch_package(name: str, cache: Path | None = None) -> Path:
    """Download (once) the Debian package ``name`` and unpack it into the cache (never
    installed): the folder its files are under, e.g. ``.../usr/sbin/hdparm``."""
    cache = cache or cache_dir()
    root = cache / f"pkg-{name}"
    if root.is_dir():
        return root
    debs = sorted(cache.glob(f"{name}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", "-q", name], cwd=cache, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        debs = sorted(cache.glob(f"{name}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {name} found nothing (run apt-get update?)")
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], check=True)
    tmp.rename(root)
    return root


def with_libraries(exe: Path, guest_path: str) -> dict[str, Path]:
    """``files`` for ``build_initramfs``: a dynamically linked host program at
    ``guest_path`` and the shared libraries ``ldd`` says it needs (busybox's guest has
    no C library of its own)."""
    files = {guest_path: exe}
    out = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            files[m.group(1)] = Path(os.path.realpath(m.group(1)))
    return files


def _busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(cand).is_file():
            return Path(cand)
    raise RuntimeError("busybox not found: apt-get install busybox-static")


def _depends(ko: Path) -> list[str]:
    out = subprocess.run(["modinfo", "-F", "depends", str(ko)], capture_output=True,
                         text=True, check=False).stdout.strip()
    return [d.replace("-", "_") for d in out.split(",") if d]


def module_load_order(kernel: Kernel, extra: Sequence[str] = ()) -> list[Path]:
    """MODULES (and ``extra``, paths like MODULES') that exist in this kernel, each after
    the modules it depends on."""
    paths = {}
    for rel in (*MODULES, *extra):
        ko = kernel.modules / rel
        if ko.exists():
            paths[ko.stem.replace("-", "_")] = ko
    order: list[Path] = []
    done: set[str] = set()

    def visit(name: str, depth: int = 0) -> None:
        if name in done or name not in paths or depth > len(paths):
            return
        for dep in _depends(paths[name]):
            visit(dep, depth + 1)
        done.add(name)
        order.append(paths[name])

    for name in paths:
        visit(name)
    return order


def build_initramfs(
    kernel: Kernel, script: str, out: Path, files: dict[str, Path | bytes] | None = None,
    init: str = INIT, modules: Sequence[str] = (),
) -> Path:
    """A gzip'd newc cpio: busybox, the virtio modules, our /init and the test script.

    ``files`` maps guest paths to host files or contents (e.g. a static benchmark binary);
    ``init`` replaces the /init that runs the script (``{mark}`` stands for MARK);
    ``modules`` adds kernel modules (paths under the module tree, loaded in order).
    """
    with tempfile.TemporaryDirectory(prefix="initramfs-") as d:
        root = Path(d)
        (root / "bin").mkdir()
        shutil.copy2(_busybox(), root / "bin/busybox")
        moddir = root / "lib/modules"
        moddir.mkdir(parents=True)
        order = []
        for src in module_load_order(kernel, modules):
            shutil.copy2(src, moddir / src.name)
            order.append(src.name)
        (root / "modules.order").write_text("\n".join(order) + "\n")
        (root / "init").write_text(init.replace("{mark}", MARK))
        (root / "init").chmod(0o755)
        (root / "test.sh").write_text(script)
        for path, content in (files or {}).items():
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                shutil.copy2(content, dest)
            dest.chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
            input="\n".join(names).encode(), capture_output=True, check=True,
        ).stdout
    out.write_bytes(gzip.compress(cpio, compresslevel=1))
    return out


@dataclass
class GuestRun:
    """The outcome of one boot: the serial log and the markers found in it."""

    log: str
    returncode: int | None
    timed_out: bool
    passed: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    info: list[str] = field(default_factory=list)
    done: bool = False

    @classmethod
    def parse(cls, log: str, returncode: int | None, timed_out: bool) -> GuestRun:
        run = cls(log, returncode, timed_out)
        for line in log.splitlines():
            _, sep, rest = line.partition(MARK + " ")
            if not sep:
                continue
            kind, _, text = rest.strip().partition(" ")
            if kind == "PASS":
                run.passed.add(text)
            elif kind == "FAIL":
                name, _, why = text.partition(":")
                run.failed[name] = why.strip()
            elif kind == "INFO":
                run.info.append(text)
            elif kind == "DONE":
                run.done = True
        return run

    def report(self) -> str:
        state = "timed out" if self.timed_out else f"exit {self.returncode}"
        return f"guest {state}; serial log:\n{self.log}"

    def check(self, *names: str) -> None:
        """Every named step passed; otherwise fail with the guest's serial log."""
        problems = [f"{n}: {self.failed[n]}" for n in names if n in self.failed]
        problems += [f"{n}: no result" for n in names if n not in self.failed
                     and n not in self.passed]
        if problems:
            raise AssertionError("guest steps failed: " + "; ".join(problems) + "\n"
                                 + self.report())


def qemu_command(kernel: Kernel, initrd: Path, devices: Sequence[str], mem_mb: int = 512,
                 append: str = "") -> list[str]:
    """QEMU TCG with guest RAM in a shared memfd, so vhost-user back ends can map it.

    One vCPU, but room for a second (``maxcpus=2``): QEMU before 8.1 emits no host
    barrier for the guest's memory barriers unless its machine may have more than one
    vCPU (``tcg_cpu_init_cflags(cpu, max_cpus > 1)``), and a virtio driver whose
    barriers are gone now and then misses an interrupt or a kick of a back end running on
    another host CPU (ours or qemu-storage-daemon's): the guest then waits for ever."""
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-m", str(mem_mb), "-smp", "1,maxcpus=2",
        "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
        "-machine", "memory-backend=mem",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 loglevel=4 {append}".strip(),
        *devices,
    ]


def run_qemu(cmd: Sequence[str], timeout: float, echo: bool = False) -> GuestRun:
    """Run QEMU to completion (or kill it at the timeout); collect the serial log."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    chunks: list[bytes] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            chunks.append(line)
            if echo:
                sys.stdout.write(line.decode(errors="replace").replace("\r", ""))
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    reader.join(5)
    log = b"".join(chunks).decode(errors="replace").replace("\r", "")
    return GuestRun.parse(log, proc.returncode, timed_out)


@dataclass
class Backend:
    """One ``acrn-pydm vhost-user`` (or ``vfio-user``) process serving a device on a UNIX
    socket."""

    spec: str
    socket: Path
    proc: subprocess.Popen[bytes]
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""


def start_backend(spec: str, sock: Path, netns: str | None = None,
                  extra: Sequence[str] = (), command: str = "vhost-user") -> Backend:
    """Start a back end (``acrn-pydm <command>``) and wait until it listens (QEMU connects
    as the client)."""
    with suppress(FileNotFoundError):
        sock.unlink()
    errpath = sock.with_suffix(".log")
    cmd = [sys.executable, "-m", "devicemodel", command, spec, "--socket-path", str(sock),
           *extra]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with open(errpath, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    backend = Backend(spec, sock, proc, errpath)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"back end {spec} exited {proc.returncode}:\n{backend.log()}")
        if accepts(sock):
            time.sleep(0.05)
            return backend
        time.sleep(0.05)
    stop_backend(backend)
    raise RuntimeError(f"back end {spec} did not listen on {sock}:\n{backend.log()}")


def accepts(path: Path) -> bool:
    """Whether a listener at unix socket ``path`` takes a connection now (the file
    appears at bind(), before listen(): only a connect proves a server is there)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def connect_unix(path: Path, within: float) -> socket.socket:
    """A stream socket connected to ``path``, retrying for ``within`` seconds while the
    listener starts (then the last OSError)."""
    deadline = time.monotonic() + within
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def reap(proc: subprocess.Popen, timeout: float = 5.0) -> bool:  # type: ignore[type-arg]
    """Wait for ``proc`` to end; kill it if it has not within ``timeout`` (False then)."""
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def stop_backend(backend: Backend, timeout: float = 5.0) -> int | None:
    """SIGTERM (the back-end convention), then SIGKILL if it does not end in time."""
    if backend.proc.poll() is None:
        backend.proc.send_signal(signal.SIGTERM)
        if not reap(backend.proc, timeout):
            return None
    return backend.proc.returncode


def backend_logs(backends: dict[str, Backend]) -> str:
    """Every back end's log under a header, for a failing test's report."""
    return "\n".join(f"--- {n} back end ---\n{b.log()}" for n, b in backends.items())


@contextmanager
def backends(specs: dict[str, str], workdir: Path, netns: dict[str, str] | None = None,
             command: str = "vhost-user") -> Iterator[dict[str, Backend]]:
    """Start one back end per name; stop them all afterwards (even if the test fails)."""
    started: dict[str, Backend] = {}
    try:
        for name, spec in specs.items():
            started[name] = start_backend(spec, workdir / f"{name}.sock",
                                          (netns or {}).get(name), command=command)
        yield started
    finally:
        for b in started.values():
            stop_backend(b)


def vhost_device_args(name: str, kind: str, sock: Path, queues: int = 1) -> list[str]:
    """QEMU options that attach one vhost-user device of ``kind`` (blk, net, rnd)."""
    chardev = ["-chardev", f"socket,id={name},path={sock}"]
    if kind == "blk":
        return [*chardev, "-device", f"vhost-user-blk-pci,chardev={name},num-queues={queues}"]
    if kind == "rnd":
        return [*chardev, "-device", f"vhost-user-rng-pci,chardev={name}"]
    if kind == "net":
        # vectors=0 (INTx): QEMU 7.2 segfaults in msix_set_vector_notifiers when a guest
        # enables MSI-X on a virtio-net-pci whose peer is vhost-user (before it sends
        # us a single ring message), whatever the back end.
        return [*chardev, "-netdev", f"vhost-user,id={name}n,chardev={name}",
                "-device",
                f"virtio-net-pci,netdev={name}n,mac=52:54:00:12:34:56,romfile=,vectors=0"]
    raise ValueError(f"no QEMU vhost-user device for {kind!r}")


def vfio_user_device_args(sock: Path, addr: int | None = None) -> list[str]:
    """QEMU (10.1 or later) options that attach a whole PCI function served by
    ``acrn-pydm vfio-user`` on ``sock`` (the path as QEMU sees it); its socket is an
    object, so only the JSON form of -device takes it."""
    dev: dict[str, object] = {"driver": "vfio-user-pci",
                              "socket": {"type": "unix", "path": str(sock)}}
    if addr is not None:
        dev["addr"] = f"{addr:#x}"
    return ["-device", json.dumps(dev, separators=(",", ":"))]


@contextmanager
def netns(name: str) -> Iterator[str]:
    """A private network namespace for the back end's tap (the caller addresses it).

    Nothing in the namespace routes anywhere else, so guest traffic can only reach
    addresses we created here.
    """
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def can_run_guests() -> str | None:
    """Why guests cannot run here (None if they can): used to skip, never to hide failure."""
    for tool in ("qemu-system-x86_64", "cpio", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        _busybox()
    except RuntimeError as e:
        return str(e)
    return None
