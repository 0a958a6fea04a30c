"""A fake HSM for benchmarks of the ACRN backend: ATTACH blocks in a real system call.

The device model's side is ``IpcHsm``, an ``IoctlLayer`` for ``AcrnHypervisor``: its
ATTACH_IOREQ_CLIENT sleeps in read(2) on an eventfd until a request is pending (the
kernel's sleeps in wait_event until the client's bitmap is non-empty), its
NOTIFY_REQUEST_FINISH clears the pending flag, stores COMPLETE and wakes the vCPU.  The
other side, a guest vCPU with the hypervisor and the HSM's dispatch, is ``fake_hsm.c``'s
poster, a separate process at C speed, as the real ones are not ours either; the same
program's responder is the floor a device model cannot beat.

Shared state: a memfd (page 0 the request page, page 1 one pending byte per vCPU and a
"client destroyed" byte at 64), the ATTACH eventfd and the completion eventfd.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import struct
import subprocess
from pathlib import Path

from devicemodel.hsm import abi
from devicemodel.hsm.acrn import IoctlArg, IoctlLayer

SOURCE = Path(__file__).resolve().parent / "fake_hsm.c"
DESTROYED = 64
_NOTIFY = struct.Struct("<HHI")
_U32 = struct.Struct("<I")


def build(out_dir: Path) -> Path:
    """Compile fake_hsm.c (gcc -O2) into ``out_dir``; SystemExit if gcc is missing."""
    if shutil.which("gcc") is None:
        raise SystemExit("bench/ioreq.py --backend acrn-fake needs gcc (apt-get install gcc)")
    exe = out_dir / "fake_hsm"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(SOURCE)],
                   check=True)
    return exe


class Shared:
    """The memfd and the two eventfds one run shares with fake_hsm.c."""

    def __init__(self) -> None:
        self.memfd = os.memfd_create("fake-hsm", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, 2 * mmap.PAGESIZE)
        self.page = mmap.mmap(self.memfd, abi.IOREQ_PAGE_SIZE, mmap.MAP_SHARED)
        self.ctl = mmap.mmap(self.memfd, mmap.PAGESIZE, mmap.MAP_SHARED,
                             offset=mmap.PAGESIZE)
        self.attach_efd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking: ATTACH sleeps in it
        self.done_efd = os.eventfd(0, os.EFD_CLOEXEC)
        for v in range(abi.ACRN_IO_REQUEST_MAX):  # the hypervisor marks every slot FREE
            _U32.pack_into(self.page, abi.slot_offset(v) + abi.SLOT_PROCESSED_OFF,
                           abi.IOREQ_STATE_FREE)

    @property
    def fds(self) -> tuple[int, int, int]:
        return self.memfd, self.attach_efd, self.done_efd

    def args(self) -> list[str]:
        return [str(fd) for fd in self.fds]

    def destroy_client(self) -> None:
        """DESTROY_IOREQ_CLIENT as the responder sees it: the flag, then a wake."""
        self.ctl[DESTROYED] = 1
        os.eventfd_write(self.attach_efd, 1)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.ctl.close()
        try:
            self.page.close()
        except BufferError:
            pass  # a view of it is still alive; the mapping goes with the process


class IpcHsm(IoctlLayer):
    """The ioctl layer of one VM on the fake HSM (``vcpus`` vCPUs); ``poll``: the VM
    polls for completion, so NOTIFY wakes nobody (acrn-facts §1.5 step 5)."""

    def __init__(self, shared: Shared, vcpus: int = 1, poll: bool = False) -> None:
        self.s = shared
        self.vcpus = vcpus
        self.poll = poll

    def exists(self, path: str) -> bool:
        return True

    def open(self, path: str) -> int:
        return 1_000_000  # never used for a system call here

    def close(self, fd: int) -> None:
        pass

    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> tuple[int, bytes | None]:
        if request == abi.ACRN_IOCTL_ATTACH_IOREQ_CLIENT:
            return self._attach(), None
        if request == abi.ACRN_IOCTL_NOTIFY_REQUEST_FINISH:
            assert isinstance(arg, bytes)
            _, _, vcpu = _NOTIFY.unpack(arg)
            if vcpu >= self.vcpus:
                return -errno.EINVAL, arg
            self.s.ctl[vcpu] = 0
            _U32.pack_into(self.s.page, abi.slot_offset(vcpu) + abi.SLOT_PROCESSED_OFF,
                           abi.IOREQ_STATE_COMPLETE)
            if not self.poll:
                os.eventfd_write(self.s.done_efd, 1)
            return 0, arg
        if request == abi.ACRN_IOCTL_CREATE_VM:
            assert isinstance(arg, bytes)
            return 0, struct.pack("<HHHH", 1, 0, self.vcpus, 0) + arg[8:]
        if request == abi.ACRN_IOCTL_DESTROY_IOREQ_CLIENT:
            self.s.destroy_client()
        return 0, arg if isinstance(arg, bytes) else None

    def _attach(self) -> int:
        ctl, n, efd = self.s.ctl, self.vcpus, self.s.attach_efd
        while True:
            if ctl[DESTROYED]:
                return -errno.ENODEV
            if any(ctl[:n]):
                return 0
            try:
                os.read(efd, 8)  # the GIL is released while the thread sleeps here
            except InterruptedError:
                return -errno.EINTR
