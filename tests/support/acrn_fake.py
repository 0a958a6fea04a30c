"""A recording fake of the ACRN backend's ioctl layer (``FakeHsm``: answers like the HSM,
acrn-facts §1.1, §1.5) and the ioctl numbers it names (acrn-facts §1.2)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
import threading
from collections import defaultdict

from devicemodel.hsm import abi
from devicemodel.hsm.acrn import AcrnHypervisor, IoctlArg, IoctlLayer

# Encoded values from acrn-facts §1.2 (measured with gcc against linux/acrn.h).
CREATE_VM = 0xC030A210
DESTROY_VM = 0x0000A211
START_VM = 0x0000A212
PAUSE_VM = 0x0000A213
RESET_VM = 0x0000A215
SET_VCPU_REGS = 0x4128A216
INJECT_MSI = 0x4010A223
VM_INTR_MONITOR = 0x4008A224
SET_IRQLINE = 0x4008A225
NOTIFY = 0x4008A231
CREATE_CLIENT = 0x0000A232
ATTACH = 0x0000A233
DESTROY_CLIENT = 0x0000A234
CLEAR_IOREQ = 0x0000A235
SET_MEMSEG = 0x4020A241
UNSET_MEMSEG = 0x4020A242
SET_PTDEV_INTR = 0x4014A253
RESET_PTDEV_INTR = 0x4014A254
ASSIGN_PCIDEV = 0x4024A255
DEASSIGN_PCIDEV = 0x4024A256
ASSIGN_MMIODEV = 0x4068A257
DEASSIGN_MMIODEV = 0x4068A258
CREATE_VDEV = 0x40C0A259
DESTROY_VDEV = 0x40C0A25A
PM_GET_CPU_STATE = 0xC008A260
IOEVENTFD = 0x4020A270
IRQFD = 0x4018A271
SETUP_ASYNCIO = 0x4008A290
SETUP_VM_EVENT_RING = 0x4008A2A0
SETUP_VM_EVENT_FD = 0x4004A2A1
FORK_ONLY = {SETUP_ASYNCIO, SETUP_VM_EVENT_RING, SETUP_VM_EVENT_FD}

NAMES = {v: k for k, v in globals().items() if k.isupper() and isinstance(v, int)}

SLOT = 256
PROCESSING, COMPLETE, FREE = 2, 1, 3
PORTIO, MMIO, PCICFG = 0, 1, 2
READ, WRITE = 0, 1


def va_of(mm: mmap.mmap) -> int:
    buf = (ctypes.c_char * len(mm)).from_buffer(mm)
    try:
        return ctypes.addressof(buf)
    finally:
        del buf


class FakeHsm(IoctlLayer):
    """Records every call and answers like the HSM (acrn-facts §1.1, §1.5).

    Like the kernel, it reads and writes the request page through the user VA that
    CREATE_VM passed, so a wrong ``ioreq_buf`` shows up as a page we never see change.
    ``errors[request]`` is a queue of errnos to return instead of the normal answer.
    """

    def __init__(self, *, nodes=("/dev/acrn_hsm",), vmid: int = 3, vcpu_num: int = 2) -> None:
        self.nodes = set(nodes)
        self.vmid = vmid
        self.vcpu_num = vcpu_num
        self.calls: list[tuple[int, IoctlArg]] = []
        self.errors: dict[int, list[int]] = defaultdict(list)
        self.supported_fork_only: set[int] = set()
        self.open_error: OSError | None = None
        self.opened: list[str] = []
        self.open_fds: set[int] = set()
        self.closed_fds: list[int] = []
        self.cond = threading.Condition()
        self.pending: set[int] = set()
        self.notified: list[int] = []
        self.client = False
        self.has_vm = False
        self.page_va = 0
        self.attach_waiting = 0
        self._next_fd = 100
        #: what the hypervisor answers PM_GET_CPU_STATE with: packed acrn_pstate_data
        #: (48 B) and acrn_cstate_data (32 B) entries
        self.px: list[bytes] = []
        self.cx: list[bytes] = []
        #: VM_INTR_MONITOR GET_DATA's answer: (irq, count) pairs; DELAY_INT calls recorded
        self.intr_counts: list[tuple[int, int]] = []
        self.intr_delays: list[int] = []

    # --- IoctlLayer -----------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return path in self.nodes

    def open(self, path: str) -> int:
        if self.open_error is not None:
            raise self.open_error
        self._next_fd += 1
        self.opened.append(path)
        self.open_fds.add(self._next_fd)
        return self._next_fd

    def close(self, fd: int) -> None:
        self.open_fds.remove(fd)  # a double close is a bug
        self.closed_fds.append(fd)
        with self.cond:  # closing the fd destroys the VM
            self.has_vm = self.client = False
            self.cond.notify_all()

    def ioctl(self, fd: int, request: int, arg: IoctlArg = None) -> tuple[int, bytes | None]:
        with self.cond:
            assert fd in self.open_fds, f"{NAMES.get(request)} on fd {fd} that is not open"
            if isinstance(arg, bytearray):
                arg = bytes(arg)
            self.calls.append((request, arg))
            if self.errors[request]:
                return -self.errors[request].pop(0), arg  # type: ignore[return-value]
            if request == CREATE_VM:
                return self._create_vm(arg)
            if not self.has_vm:
                return -errno.EINVAL, None
            if request in FORK_ONLY:
                return (0 if request in self.supported_fork_only else -errno.ENOTTY), None
            if request == CREATE_CLIENT:
                if self.client:
                    return -errno.EEXIST, None
                self.client = True
            elif request == DESTROY_CLIENT:
                self.client = False
                self.cond.notify_all()
            elif request == ATTACH:
                return self._attach()
            elif request == NOTIFY:
                return self._notify(arg)
            elif request == PM_GET_CPU_STATE:
                return self._pm(arg)
            elif request == VM_INTR_MONITOR:
                return self._intr_monitor(arg)
            elif request == DESTROY_VM:
                self.has_vm = self.client = False
                self.cond.notify_all()
            return 0, arg if isinstance(arg, bytes) else None

    def _create_vm(self, arg) -> tuple[int, bytes | None]:
        if self.has_vm:
            return -errno.EEXIST, arg
        assert isinstance(arg, bytes) and len(arg) == 48
        vmid, res0, _vcpus, res1, _name, _flag, ioreq_buf, _aff = struct.unpack(
            "<HHHH16sQQQ", arg
        )
        assert (res0, res1) == (0, 0)
        self.page_va = ioreq_buf
        for v in range(abi.ACRN_IO_REQUEST_MAX):  # the HV marks every slot FREE
            self._put(v, 136, struct.pack("<I", FREE))
        self.has_vm = True
        return 0, struct.pack("<HHHH", self.vmid, 0, self.vcpu_num, 0) + arg[8:]

    def _attach(self) -> tuple[int, None]:
        if not self.client:
            return -errno.ENODEV, None
        self.attach_waiting += 1
        try:
            self.cond.wait_for(lambda: self.pending or not self.client, timeout=10)
        finally:
            self.attach_waiting -= 1
        if not self.client:
            return -errno.ENODEV, None
        return 0, None

    def _notify(self, arg) -> tuple[int, bytes]:
        _vmid, reserved, vcpu = struct.unpack("<HHI", arg)
        if reserved or vcpu >= self.vcpu_num:
            return -errno.EINVAL, arg
        self.pending.discard(vcpu)
        self._put(vcpu, 136, struct.pack("<I", COMPLETE))
        self.notified.append(vcpu)
        return 0, arg

    def _pm(self, arg) -> tuple[int, bytes | None]:
        (cmd,) = struct.unpack_from("<Q", arg)
        kind, state = cmd & 0xFF, (cmd >> 8) & 0xFF
        if (cmd >> 24) & 0xFF != self.vmid & 0xFF or (cmd >> 16) & 0xFF >= self.vcpu_num:
            return -errno.EINVAL, arg
        if kind in (abi.PMCMD_GET_PX_CNT, abi.PMCMD_GET_CX_CNT):
            count = len(self.px if kind == abi.PMCMD_GET_PX_CNT else self.cx)
            return 0, struct.pack("<Q", count) + arg[8:]
        table, first = (self.px, 0) if kind == abi.PMCMD_GET_PX_DATA else (self.cx, 1)
        if kind not in (abi.PMCMD_GET_PX_DATA, abi.PMCMD_GET_CX_DATA) or \
                not first <= state < first + len(table):
            return -errno.EINVAL, arg
        data = table[state - first]
        # like the kernel, it writes the whole answer, whatever size the caller declared
        assert len(arg) >= len(data), "the buffer is smaller than the answer"
        return 0, data + arg[len(data):]

    def _intr_monitor(self, va) -> tuple[int, None]:
        assert isinstance(va, int), "VM_INTR_MONITOR takes the page's address by value"
        cmd, buf_cnt = struct.unpack("<II", ctypes.string_at(va, 8))
        if cmd == abi.INTR_CMD_GET_DATA:
            words = [w for pair in self.intr_counts for w in pair][:buf_cnt]
            ctypes.memmove(va + 4, struct.pack("<I", len(words)), 4)
            ctypes.memmove(va + 8, struct.pack(f"<{len(words)}Q", *words), 8 * len(words))
        elif cmd == abi.INTR_CMD_DELAY_INT:
            (delay,) = struct.unpack("<Q", ctypes.string_at(va + 8, 8))
            self.intr_delays.append(delay)
        else:
            return -errno.EINVAL, None
        return 0, None

    # --- the hypervisor's side -------------------------------------------------------------
    def _put(self, vcpu: int, off: int, data: bytes) -> None:
        ctypes.memmove(self.page_va + vcpu * SLOT + off, data, len(data))

    def slot(self, vcpu: int) -> bytes:
        return ctypes.string_at(self.page_va + vcpu * SLOT, SLOT)

    def post(self, vcpu: int, rtype: int, direction: int, addr: int, size: int,
             value: int = 0, bdfr: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        """A guest access: HV fills the slot, HSM marks it PROCESSING and wakes ATTACH."""
        with self.cond:
            self._put(vcpu, 0, bytes(SLOT))
            self._put(vcpu, 0, struct.pack("<I", rtype))
            if rtype == PCICFG:
                req = struct.pack("<I12xQIIIII", direction, size, value, *bdfr)
            elif rtype == MMIO:
                req = struct.pack("<IIQQQ", direction, 0, addr, size, value)
            else:
                req = struct.pack("<IIQQI", direction, 0, addr, size, value)
            self._put(vcpu, 64, req)
            self._put(vcpu, 132, struct.pack("<II", 0, PROCESSING))
            self.pending.add(vcpu)
            self.cond.notify_all()

    def names(self, *, attach: bool = False) -> list[str]:
        return [NAMES.get(r, r) for r, _ in self.calls if attach or r != ATTACH]


def new_hv(fake: FakeHsm | None = None) -> tuple[FakeHsm, AcrnHypervisor]:
    fake = fake or FakeHsm()
    return fake, AcrnHypervisor(fake, create_retry_delay=0)
