"""One vCPU: its fd, its ``kvm_run`` page and the flags its thread keeps, plus what the
thread asks of KVM about itself (am I halted for good? why did I stop?).

KICK_SIGNAL gets a thread out of KVM_RUN (with ``kvm_run.immediate_exit`` set first, so a
kick that lands just before KVM_RUN is not lost).
"""

from __future__ import annotations

import mmap
import os
import signal
import threading

from ..base import HypervisorError
from . import uapi as k
from .cpu import PowerOnState
from .syscall import ioctl

#: sent to a vCPU thread to get it out of KVM_RUN (with kvm_run.immediate_exit set first)
KICK_SIGNAL = signal.SIGRTMIN + 4


def _kick_noop(signum: int, frame: object) -> None:
    """Does nothing: the signal only exists to interrupt KVM_RUN."""


def install_kick_handler() -> bool:
    """Make KICK_SIGNAL harmless (it must not kill the process); False where it cannot be
    installed (outside the main thread, with no handler yet)."""
    current = signal.getsignal(KICK_SIGNAL)
    if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _kick_noop)
    return True


class Vcpu:
    """One vCPU: its fd and ``kvm_run`` page (public: a tool may drive KVM_RUN on them
    itself while no vCPU thread runs), its thread and the flags the runner keeps."""

    def __init__(self, index: int, fd: int, run: mmap.mmap) -> None:
        self.index = index
        self.fd = fd
        self._run_map = run
        #: the kvm_run page
        self.kvm_run = memoryview(run)
        self.thread: threading.Thread | None = None
        self.alive = False
        #: outside KVM_RUN and not holding a request: safe to change its registers
        self.parked = True
        #: the last exit needs a KVM_RUN (immediate_exit) to finish the instruction
        self.settle = False
        self.exits = 0
        #: the halt watchdog asks this thread to probe its state at the next kick ...
        self.probe = False
        #: ... and the answer: halted for good (None: not answered yet)
        self.probe_dead: bool | None = None
        self.power_on: PowerOnState | None = None

    def kick(self, signal_thread: bool) -> None:
        """Make the thread leave KVM_RUN: at its next entry (immediate_exit), and at once
        if ``signal_thread`` (the kick handler is installed)."""
        self.kvm_run[k.RUN_IMMEDIATE_EXIT_OFF] = 1
        thread = self.thread
        if signal_thread and self.alive and thread is not None and thread.ident is not None:
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def close(self) -> None:
        self.kvm_run.release()
        try:
            self._run_map.close()
        except BufferError:
            pass
        os.close(self.fd)


def probe_halted(vc: Vcpu) -> None:
    """On a kick, in ``vc``'s thread: is it halted for good (HLT with IF=0, or an AP still
    waiting for SIPI)?  The answer goes to ``vc.probe_dead``."""
    vc.probe = False
    mp = k.KvmMpState()
    regs = k.KvmRegs()
    try:
        ioctl(vc.fd, k.KVM_GET_MP_STATE, mp, "KVM_GET_MP_STATE")
        ioctl(vc.fd, k.KVM_GET_REGS, regs, "KVM_GET_REGS")
    except HypervisorError:
        vc.probe_dead = False
        return
    halted = mp.mp_state == k.KVM_MP_STATE_HALTED and not regs.rflags & 0x200
    vc.probe_dead = halted or (vc.index != 0 and mp.mp_state == k.KVM_MP_STATE_UNINITIALIZED)


def describe_exit(vc: Vcpu, reason: int) -> str:
    """Why a vCPU cannot go on, for the log and ``exit_reason``."""
    run = vc.kvm_run
    where = ""
    try:
        regs = k.KvmRegs()
        ioctl(vc.fd, k.KVM_GET_REGS, regs, "KVM_GET_REGS")
        where = f" at rip {regs.rip:#x}"
    except HypervisorError:
        pass
    if reason == k.KVM_EXIT_SHUTDOWN:
        return f"vCPU {vc.index}: shutdown (triple fault){where}"
    if reason == k.KVM_EXIT_FAIL_ENTRY:
        (hw,) = k.RUN_U64.unpack_from(run, k.RUN_EXIT_OFF)
        return f"vCPU {vc.index}: VM entry failed, hardware reason {hw:#x}{where}"
    if reason == k.KVM_EXIT_INTERNAL_ERROR:
        sub, ndata = k.RUN_INTERNAL.unpack_from(run, k.RUN_EXIT_OFF)
        ndata = min(ndata, k.RUN_INTERNAL_NDATA_MAX)
        data = [k.RUN_U64.unpack_from(run, k.RUN_INTERNAL_DATA_OFF + 8 * i)[0]
                for i in range(ndata)]
        return (f"vCPU {vc.index}: KVM internal error, suberror {sub}, data "
                f"{[hex(d) for d in data]}{where}")
    if reason == k.KVM_EXIT_SYSTEM_EVENT:
        (kind,) = k.RUN_U32.unpack_from(run, k.RUN_EXIT_OFF)
        names = {k.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", k.KVM_SYSTEM_EVENT_RESET: "reset",
                 k.KVM_SYSTEM_EVENT_CRASH: "crash"}
        return f"vCPU {vc.index}: system event {names.get(kind, kind)}{where}"
    return f"vCPU {vc.index}: unexpected KVM exit {reason}{where}"
