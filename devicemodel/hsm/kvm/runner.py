"""The vCPU threads: one per vCPU sits in KVM_RUN and turns each I/O exit into requests.

A KVM_EXIT_IO or KVM_EXIT_MMIO becomes one request per element (string I/O included, as
ACRN posts it) through ``Requests.post``; the answer goes back into ``kvm_run`` and the
thread re-enters KVM_RUN, which finishes the instruction.  A vCPU that cannot go on
(triple fault, failed entry, emulation error, HLT with interrupts off) stops the VM.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
import time

from .. import abi
from ..base import HypervisorError
from . import uapi as k
from .requests import Requests
from .syscall import raw_ioctl
from .vcpu import Vcpu, describe_exit, install_kick_handler, probe_halted

log = logging.getLogger(__name__)

#: how long RESET_VM / SET_VCPU_REGS wait for every vCPU to leave KVM_RUN
PARK_TIMEOUT = 5.0

_LE = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
       8: struct.Struct("<Q")}
_PIO = abi.IOREQ_TYPE_PORTIO
_MMIO = abi.IOREQ_TYPE_MMIO
_READ = abi.IOREQ_DIR_READ
_WRITE = abi.IOREQ_DIR_WRITE
_EXIT_IO = k.KVM_EXIT_IO
_EXIT_MMIO = k.KVM_EXIT_MMIO
_IO_OUT = k.KVM_EXIT_IO_OUT
_EXIT_OFF = k.RUN_EXIT_OFF
_RUN_IO = k.RUN_IO.unpack_from


class VcpuRunner:
    """Runs, parks and stops the vCPU threads of one VM.

    ``running`` says whether threads may enter KVM_RUN (START_VM/PAUSE_VM); ``stopping``
    makes them exit for good.  Both change under ``cond``, which threads wait on while
    parked."""

    def __init__(self, vm_name: str, vcpus: list[Vcpu], requests: Requests) -> None:
        self.vm_name = vm_name
        self.vcpus = vcpus
        self.requests = requests
        self.cond = threading.Condition()
        self.running = False
        self.stopping = False
        self._started = False
        #: why the VM stopped by itself (None while it has not)
        self.exit_reason: str | None = None
        self.can_kick = install_kick_handler()
        if not self.can_kick:
            log.warning("cannot install the vCPU kick signal handler outside the main "
                        "thread; halted vCPUs will only stop at the next exit")

    # --- control (any thread) ---------------------------------------------------------
    def start_threads(self) -> None:
        if self._started:
            return
        self._started = True
        for vc in self.vcpus:
            vc.alive = True
            vc.parked = False  # until the thread itself parks (at once if not running)
            vc.thread = threading.Thread(target=self._main, args=(vc,),
                                         name=f"{self.vm_name}-vcpu{vc.index}", daemon=True)
            vc.thread.start()

    def stop_threads(self) -> None:
        """Stop every thread for good and join it (a waiting request is abandoned)."""
        with self.cond:
            self.stopping = True
            self.running = False
            self.requests.stop_posting()
            self.cond.notify_all()
            self.kick_all()
        self.requests.release_waiters()
        for vc in self.vcpus:
            if vc.thread is not None:
                vc.thread.join(timeout=10)
                if vc.thread.is_alive():
                    log.error("vCPU %d thread did not stop", vc.index)
                else:
                    vc.thread = None

    def set_running(self, running: bool) -> None:
        """START_VM (True) or PAUSE_VM (False, and every thread leaves KVM_RUN)."""
        with self.cond:
            self.running = running
            if running:
                self.cond.notify_all()
            else:
                self.kick_all()

    def kick_all(self) -> None:
        """Get every vCPU out of KVM_RUN (caller holds ``cond``)."""
        for vc in self.vcpus:
            vc.kick(self.can_kick)

    def wait_parked(self, what: str) -> None:
        """Wait until every vCPU is out of KVM_RUN and holds no request (the VM must be
        paused); ``what`` names the call in the error."""
        deadline = time.monotonic() + PARK_TIMEOUT
        with self.cond:
            while not all(vc.parked or not vc.alive for vc in self.vcpus):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HypervisorError(f"{what}: a vCPU is still running or holds a "
                                          "request (pause and clear the VM first)", errno.EBUSY)
                self.kick_all()
                self.cond.wait(min(left, 0.05))

    def fatal(self, reason: str) -> None:
        """The VM cannot go on: stop every vCPU; a waiting attach returns False."""
        if self.exit_reason is None:
            self.exit_reason = reason
            log.error("VM %s stops: %s", self.vm_name, reason)
        with self.cond:
            self.running = False
            self.kick_all()
        self.requests.vm_stopped()

    # --- the vCPU thread --------------------------------------------------------------
    def _main(self, vc: Vcpu) -> None:
        try:
            self._loop(vc)
        except Exception as e:  # a bug here must stop the VM, not hang it
            log.exception("vCPU %d thread failed", vc.index)
            self.fatal(f"vCPU {vc.index}: internal error: {e!r}")
        finally:
            with self.cond:
                vc.alive = False
                vc.parked = True
                self.cond.notify_all()

    def _loop(self, vc: Vcpu) -> None:
        run, fd = vc.kvm_run, vc.fd
        # locals: one lookup less each per exit
        call, kvm_run, reason_at, unpack_u32 = (raw_ioctl, k.KVM_RUN, k.RUN_EXIT_REASON_OFF,
                                               k.RUN_U32.unpack_from)
        exit_io, exit_mmio = self._exit_io, self._exit_mmio
        post, index, unpack_io, exit_off = self.requests.post, vc.index, _RUN_IO, _EXIT_OFF
        while True:
            if not self.running:
                if vc.settle:  # finish the last I/O instruction so the state is whole
                    run[k.RUN_IMMEDIATE_EXIT_OFF] = 1
                    call(fd, k.KVM_RUN, None)
                    run[k.RUN_IMMEDIATE_EXIT_OFF] = 0
                    vc.settle = False
                with self.cond:
                    vc.parked = True
                    self.cond.notify_all()
                    while not self.running and not self.stopping:
                        self.cond.wait()
                    if self.stopping:
                        return
                    vc.parked = False
                continue
            ret = call(fd, kvm_run, None)
            vc.settle = False
            if ret < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    # EINTR: kicked; EAGAIN: an AP just left wait-for-SIPI (call again)
                    run[k.RUN_IMMEDIATE_EXIT_OFF] = 0
                    if vc.probe:
                        probe_halted(vc)
                    continue
                self.fatal(f"vCPU {vc.index}: KVM_RUN failed: {os.strerror(err)}")
                continue
            vc.exits += 1
            (reason,) = unpack_u32(run, reason_at)
            if reason == _EXIT_IO:
                vc.settle = True
                # one IN or OUT (nearly every port exit) is served right here: each call
                # level less is measurable on an exit path that runs cache-cold
                direction, size, port, count, data_off = unpack_io(run, exit_off)
                fmt = _LE.get(size)
                if count != 1 or fmt is None:
                    exit_io(vc)  # string I/O, or a size to refuse
                elif direction == _IO_OUT:
                    post(index, _PIO, _WRITE, port, size, fmt.unpack_from(run, data_off)[0])
                else:
                    value = post(index, _PIO, _READ, port, size, 0)
                    if value is not None:
                        fmt.pack_into(run, data_off, value)
            elif reason == _EXIT_MMIO:
                vc.settle = True
                exit_mmio(vc)
            elif reason in (k.KVM_EXIT_INTR, k.KVM_EXIT_IRQ_WINDOW_OPEN):
                continue
            elif reason == k.KVM_EXIT_HLT:
                if not run[k.RUN_IF_FLAG_OFF]:
                    self.fatal(f"vCPU {vc.index} halted with interrupts disabled")
            else:
                self.fatal(describe_exit(vc, reason))

    def _exit_io(self, vc: Vcpu) -> None:
        """String port I/O (``count`` elements) or a size to refuse; ``_loop`` serves a
        single IN or OUT itself."""
        run = vc.kvm_run
        direction, size, port, count, data_off = _RUN_IO(run, _EXIT_OFF)
        fmt = _LE.get(size)
        if fmt is None:
            self.fatal(f"vCPU {vc.index}: port access of size {size}")
            return
        post, index = self.requests.post, vc.index
        if direction == _IO_OUT:
            for i in range(count):
                (value,) = fmt.unpack_from(run, data_off + i * size)
                if post(index, _PIO, _WRITE, port, size, value) is None:
                    return
        else:
            for i in range(count):
                value = post(index, _PIO, _READ, port, size, 0)
                if value is None:
                    return
                fmt.pack_into(run, data_off + i * size, value)

    def _exit_mmio(self, vc: Vcpu) -> None:
        run = vc.kvm_run
        gpa, data, length, is_write = k.RUN_MMIO.unpack_from(run, k.RUN_EXIT_OFF)
        if not 1 <= length <= 8:
            self.fatal(f"vCPU {vc.index}: MMIO access of {length} bytes at {gpa:#x}")
            return
        if is_write:
            value = int.from_bytes(data[:length], "little")
            self.requests.post(vc.index, _MMIO, _WRITE, gpa, length, value)
        else:
            value = self.requests.post(vc.index, _MMIO, _READ, gpa, length, 0)
            if value is not None:
                run[k.RUN_MMIO_DATA_OFF : k.RUN_MMIO_DATA_OFF + length] = value.to_bytes(
                    length, "little")
