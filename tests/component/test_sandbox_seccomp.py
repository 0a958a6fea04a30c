"""The systemd unit's syscall filter, checked by running a real VM under it.

systemd is not PID 1 here, so ``systemd-run -p SystemCallFilter=...`` cannot be used;
tests/support/seccomp_filter.py reads the unit's own sandbox lines, expands systemd's groups with
``systemd-analyze syscall-filter`` and loads the same filter with libseccomp before the
VM's Python starts. The VM is the adversarial suite's (virtio-blk on an image, virtio-rnd,
virtio-console to a file, dummy, hostbridge on the sim backend) doing real I/O.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.support import seccomp_filter as sf
from tests.support.paths import REPO as ROOT

pytestmark = pytest.mark.skipif(
    not (sf.have_systemd_analyze() and sf.have_libseccomp()),
    reason="needs systemd-analyze (Debian package systemd) and libseccomp.so.2")


def sandboxed(*cmd: str, kill: bool = False, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    wrapper = [sys.executable, str(ROOT / "tests" / "support" / "seccomp_filter.py"),
               *(["--kill"] if kill else []), "--", sys.executable, *cmd]
    # the suite's virtio-net check watches the tap with AF_PACKET, which the unit forbids
    env = {**os.environ, "ACRN_PYDM_ADVERSARIAL_NET": "0"}
    return subprocess.run(wrapper, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_unit_filter_is_what_the_unit_says() -> None:
    uf = sf.parse_unit()
    assert uf.errno_name == "EPERM" and uf.native_only
    assert uf.families == ["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"]
    # what the device model needs every day
    for name in ("ioctl", "mmap", "memfd_create", "eventfd2", "epoll_wait", "preadv2",
                 "pwritev2", "fdatasync", "fsync", "clone3", "getrandom", "socketpair",
                 "sendmsg", "recvmsg", "mlock", "openat", "ftruncate", "mprotect"):
        assert name in uf.allow, name
    # what the unit takes away (~@privileged @mount @swap @reboot @module @raw-io @obsolete)
    for name in ("mount", "umount2", "reboot", "init_module", "iopl", "ioperm", "swapon",
                 "chroot", "pivot_root", "kexec_load", "settimeofday", "chown"):
        assert name not in uf.allow, name


def test_the_filter_really_bites() -> None:
    """A denied call fails with the unit's errno; an allowed one works."""
    code = ("import os, errno\n"
            "try:\n    os.chroot('/')\nexcept PermissionError as e:\n"
            "    assert e.errno == errno.EPERM\nelse:\n    raise SystemExit('chroot worked')\n"
            "import socket\n"
            "try:\n    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
            "except OSError:\n    pass\nelse:\n    raise SystemExit('AF_PACKET worked')\n"
            "socket.socketpair().__class__\nprint('ok')\n")
    r = sandboxed("-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_vm_with_virtio_io_runs_under_the_unit_filter() -> None:
    """The whole adversarial suite, under the unit's filter: same verdicts as without."""
    r = sandboxed("-m", "tests.support.adversarial", timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "WEDGED 0, FAIL 0" in r.stdout


def test_vm_never_attempts_a_denied_syscall() -> None:
    """With "deny" turned into SIGSYS, the VM still runs: nothing it does was refused
    (so EPERM is not silently hiding a broken path). On failure, strace names the call."""
    r = sandboxed("-m", "tests.support.adversarial", "--quick", kill=True, timeout=300)
    if r.returncode == -signal.SIGSYS:
        if shutil.which("strace") is None:
            pytest.fail("the VM made a syscall the unit denies (install strace to name it)")
        trace = subprocess.run(
            ["strace", "-f", "-qq", "-Z", "-e", "status=failed", sys.executable,
             str(ROOT / "tests" / "support" / "seccomp_filter.py"), "--", sys.executable, "-m",
             "tests.support.adversarial", "--quick"], cwd=ROOT, capture_output=True, text=True,
            timeout=300)
        denied = [x for x in trace.stderr.splitlines() if "EPERM" in x]
        pytest.fail("the VM made syscalls the unit denies:\n" + "\n".join(denied[:20]))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
