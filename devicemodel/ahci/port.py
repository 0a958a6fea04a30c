"""One AHCI port: its registers, the command list it runs, and the FISes and interrupts
with which commands end (AHCI 1.3.1 §3.3, §5).

The guest sets PxCI bits; each newly issued slot is fetched from guest memory and handed
to the drive in slot order, one unqueued command at a time, NCQ commands side by side
(each acknowledged at once with a register FIS that clears its PxCI bit, completed by a
set device bits FIS that clears its PxSACT bit). A command that moves image data runs in
a task of the controller's nursery; everything else ends inside the register write that
issued it.

Errors land in the registers, never in the device model: a failed command sets PxTFD's
ERR and PxIS.TFES, a pointer outside guest memory PxIS.HBFS, a malformed command PxIS.IFS;
after any of them the port runs nothing until the guest clears PxCMD.ST (its error
recovery, §6.2.2). Clearing ST, a COMRESET or an HBA reset abandons what was issued: a
command still in a thread cannot be interrupted, so its result is dropped when it ends,
and PxCMD.CR (GHC.HR) stays set until the last one has.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol

import trio

from ..memory import MemoryMap
from ..ratelimit import RateLimitedLog
from . import fis
from . import regs as r
from .command import BusError, Command, FisError, ShortBuffer, fetch, set_prdbc, view
from .drive import Done, Drive, aborted, log

_MASK64_LOW = 0xFFFF_FFFF
#: the registers a read returns as they are (the rest: the halves of CLB/FB, or 0)
_PLAIN = {r.P_IS: "is_", r.P_IE: "ie", r.P_CMD: "cmd", r.P_TFD: "tfd", r.P_SIG: "sig",
          r.P_SSTS: "ssts", r.P_SCTL: "sctl", r.P_SERR: "serr", r.P_SACT: "sact",
          r.P_CI: "ci", r.P_SNTF: "sntf"}


class PortHost(Protocol):
    """What a port uses of its controller (``hba.Ahci``)."""

    name: str
    memory: MemoryMap
    #: where commands that wait for the image run; None until the controller runs
    nursery: trio.Nursery | None

    def port_interrupt(self, port: Port, bits: int) -> None:
        """``port`` newly set enabled PxIS ``bits``."""

    def port_idle(self) -> None:
        """A port's last abandoned command ended."""


class Port:
    """Port ``index`` of ``hba``, with ``drive`` (None: nothing attached)."""

    def __init__(self, hba: PortHost, index: int, drive: Drive | None) -> None:
        self.hba = hba
        self.index = index
        self.drive = drive
        self.clb = self.fb = 0
        self.is_ = self.ie = self.cmd = 0
        self.tfd = 0x7F
        self.sig = r.SIG_NONE
        self.ssts = self.sctl = self.serr = self.sact = self.ci = self.sntf = 0
        #: issued slots not started yet
        self.pending = 0
        #: slots started in this epoch → whether queued (NCQ)
        self.running: dict[int, bool] = {}
        #: commands still in a task, of any epoch (PxCMD.CR stays set while > 0)
        self.inflight = 0
        #: bumped whenever issued commands are abandoned: older results are dropped
        self.epoch = 0
        #: a fatal error stopped the command list until PxCMD.ST is cleared
        self.halted = False
        self.srst = False
        self.stats = {"issued": 0, "errors": 0, "abandoned": 0}
        self._glog = RateLimitedLog(log)
        self.power_on()

    @property
    def memory(self) -> MemoryMap:
        return self.hba.memory

    # --- resets ---------------------------------------------------------------------------
    def power_on(self) -> None:
        """The state after an HBA reset: engine off, interrupts off, link up."""
        self._abandon()
        self.is_ = self.ie = 0
        self.cmd = r.CMD_SUD | r.CMD_POD | (r.CMD_CPS if self.drive is not None else 0)
        if self.inflight:
            self.cmd |= r.CMD_CR
        self.sctl = self.serr = self.sntf = 0
        self.srst = False
        self._link_up()

    def _abandon(self) -> None:
        """Drop every issued command: results still to come are ignored."""
        if self.running or self.pending:
            self.stats["abandoned"] += len(self.running) + bin(self.pending).count("1")
        self.ci = self.sact = self.pending = 0
        self.running.clear()
        self.epoch += 1
        self.halted = False
        self.cmd &= ~r.CMD_CCS_MASK

    def _link_up(self) -> None:
        """A COMRESET ended: the drive answers with its signature (not an interrupt)."""
        if self.drive is None:
            self.ssts, self.tfd, self.sig = 0, 0x7F, r.SIG_NONE
            return
        speed = self.sctl & r.SCTL_SPD_MASK or r.SSTS_SPD_GEN3
        self.ssts = r.SSTS_DET_PRESENT | speed | r.SSTS_IPM_ACTIVE
        self._device_reset()

    def _device_reset(self) -> None:
        assert self.drive is not None
        self.drive.reset()
        self.sig = self.drive.signature
        status = 0 if self.drive.atapi else r.ST_OK
        self.tfd = 0x01 << 8 | status  # error 01h: diagnostics passed
        self._post(r.RX_D2H, fis.d2h(status, 0x01, fis.signature_shadow(self.sig),
                                     interrupt=False))

    # --- registers ------------------------------------------------------------------------
    def read(self, offset: int) -> int:
        name = _PLAIN.get(offset)
        if name is not None:
            value: int = getattr(self, name)
            return value
        if offset == r.P_CLB:
            return self.clb & _MASK64_LOW
        if offset == r.P_CLBU:
            return self.clb >> 32
        if offset == r.P_FB:
            return self.fb & _MASK64_LOW
        if offset == r.P_FBU:
            return self.fb >> 32
        return 0

    def write(self, offset: int, value: int) -> None:
        running = self.cmd & r.CMD_ST
        if offset == r.P_CLB and not running:
            self.clb = (self.clb & ~_MASK64_LOW) | (value & ~0x3FF)
        elif offset == r.P_CLBU and not running:
            self.clb = (self.clb & _MASK64_LOW) | value << 32
        elif offset == r.P_FB and not self.cmd & r.CMD_FRE:
            self.fb = (self.fb & ~_MASK64_LOW) | (value & ~0xFF)
        elif offset == r.P_FBU and not self.cmd & r.CMD_FRE:
            self.fb = (self.fb & _MASK64_LOW) | value << 32
        elif offset == r.P_IS:
            self.is_ &= ~value
        elif offset == r.P_IE:
            old = self.ie
            self.ie = value & r.IE_MASK
            if self.is_ & self.ie & ~old:
                self.hba.port_interrupt(self, self.is_ & self.ie & ~old)
        elif offset == r.P_CMD:
            self._write_cmd(value)
        elif offset == r.P_SCTL:
            self._write_sctl(value)
        elif offset == r.P_SERR:
            self.serr &= ~value
        elif offset == r.P_SNTF:
            self.sntf &= ~value
        elif offset == r.P_SACT and running:
            self.sact |= value
        elif offset == r.P_CI and running:
            new = value & ~self.ci
            self.ci |= value
            self.pending |= new
            self.dispatch()

    def _write_cmd(self, value: int) -> None:
        old = self.cmd
        cmd = (old & ~r.CMD_WRITABLE) | (value & r.CMD_WRITABLE)
        cmd = cmd | r.CMD_FR if cmd & r.CMD_FRE else cmd & ~r.CMD_FR
        if cmd & r.CMD_CLO:  # command list override: forget BSY and DRQ
            self.tfd &= ~(r.ST_BSY | r.ST_DRQ)
        self.cmd = cmd & ~(r.CMD_CLO | r.CMD_ASP | r.CMD_ICC_MASK)
        if (old ^ cmd) & r.CMD_ST:
            if cmd & r.CMD_ST:
                self.cmd |= r.CMD_CR
                self.halted = False
                self.dispatch()
            else:
                self._abandon()
                self._settle()

    def _write_sctl(self, value: int) -> None:
        old = self.sctl & r.SCTL_DET_MASK
        self.sctl = value & 0xFFF
        det = value & r.SCTL_DET_MASK
        if det == r.SCTL_DET_COMRESET:  # the interface is held in reset
            self._abandon()
            self._settle()
            self.ssts = 0
            self.tfd = r.ST_BSY
        elif det == r.SCTL_DET_OFFLINE:
            self._abandon()
            self._settle()
            self.ssts = r.SCTL_DET_OFFLINE
        elif det == 0 and old in (r.SCTL_DET_COMRESET, r.SCTL_DET_OFFLINE):
            self._link_up()

    def _settle(self) -> None:
        """With the engine off and nothing left in a task, the command list is idle."""
        if not self.inflight and not self.cmd & r.CMD_ST:
            self.cmd &= ~r.CMD_CR
            self.hba.port_idle()

    # --- running commands -----------------------------------------------------------------
    def _next_slot(self) -> int:
        """The next pending slot after the current one (round robin, as CCS advances)."""
        start = ((self.cmd & r.CMD_CCS_MASK) >> r.CMD_CCS_SHIFT) + 1
        rotated = (self.pending >> (start % 32)) | (self.pending << (32 - start % 32))
        rotated &= 0xFFFF_FFFF
        return (start + (rotated & -rotated).bit_length() - 1) % 32

    def dispatch(self) -> None:
        """Start what was issued and may run now."""
        while (self.pending and self.cmd & r.CMD_ST and not self.halted
               and self.hba.nursery is not None):
            slot = self._next_slot()
            bit = 1 << slot
            if self.drive is None:  # nothing answers: the FIS is never taken
                self.pending &= ~bit
                continue
            try:
                command = fetch(self.memory, self.clb, slot)
            except BusError as e:
                self._fatal(r.IS_HBFS, f"slot {slot}: {e}")
                return
            except FisError as e:
                self._fatal(r.IS_IFS, f"slot {slot}: {e}")
                return
            if not command.is_command:
                self.pending &= ~bit
                self.ci &= ~bit
                self._control(command)
                continue
            queued = self.drive.queued(command)
            if slot in self.running:  # an NCQ tag issued again while it runs
                self.pending &= ~bit
                self._failed(command, queued, aborted())
                return
            if self.running and (not queued or not all(self.running.values())):
                return  # unqueued commands run alone; the rest wait for it
            self.pending &= ~bit
            self.cmd = (self.cmd & ~r.CMD_CCS_MASK) | slot << r.CMD_CCS_SHIFT
            self._start(command, queued)

    def _control(self, command: Command) -> None:
        """A device control FIS: SRST set, then cleared, is a software reset."""
        if command.control & r.CTL_SRST:
            self.srst = True
            self.tfd = r.ST_BSY
        elif self.srst:
            self.srst = False
            if self.drive is not None:
                self._device_reset()

    def _start(self, command: Command, queued: bool) -> None:
        assert self.drive is not None
        self.stats["issued"] += 1
        try:
            outcome = self.drive.execute(command)
        except ShortBuffer:
            outcome = aborted()
        except BusError as e:
            self._fatal(r.IS_HBFS, f"slot {command.slot}: {e}")
            return
        slot = command.slot
        self.running[slot] = queued
        if queued:  # accepted: the register FIS clears BSY and the slot's PxCI bit
            self.ci &= ~(1 << slot)
            self.tfd = (self.tfd & ~0xFF) | r.ST_OK
            self._post(r.RX_D2H, fis.d2h(r.ST_OK, 0, bytes(10), interrupt=False))
        else:
            self.tfd = (self.tfd & ~0xFF) | r.ST_BSY | r.ST_DRDY
        if isinstance(outcome, Done):
            self._finish(command, queued, outcome)
            return
        self.inflight += 1
        self.cmd |= r.CMD_CR
        assert self.hba.nursery is not None
        self.hba.nursery.start_soon(self._await, command, queued, outcome, self.epoch)

    async def _await(self, command: Command, queued: bool,
                     pending: Coroutine[Any, Any, Done], epoch: int) -> None:
        try:
            done = await pending
        except Exception:  # a fault in a drive fails the command, never the controller
            log.exception("port %d: slot %d failed", self.index, command.slot)
            done = aborted()
        finally:
            self.inflight -= 1
        if epoch == self.epoch and command.slot in self.running:
            self._finish(command, queued, done)
        self._settle()
        self.dispatch()

    def _finish(self, command: Command, queued: bool, done: Done) -> None:
        slot = command.slot
        self.running.pop(slot, None)
        set_prdbc(self.memory, command, done.count)
        if done.failed:
            self._failed(command, queued, done)
            return
        bit = 1 << slot
        self.tfd = done.error << 8 | done.status
        if queued:
            self.sact &= ~bit
            irq = r.IS_SDBS if self._post(
                r.RX_SDB, fis.sdb(done.status, 0, bit, interrupt=True)) else 0
        else:
            irq = 0
            shadow = done.shadow if done.shadow is not None else fis.shadow_of(command.cfis)
            if done.pio and self._post(r.RX_PIO_SETUP, fis.pio_setup(
                    r.ST_DRDY | r.ST_DRQ, done.status, done.count, shadow,
                    to_host=done.to_host, interrupt=True)):
                irq |= r.IS_PSS
            self.ci &= ~bit
            if self._post(r.RX_D2H, fis.d2h(done.status, done.error, shadow,
                                            interrupt=True)):
                irq |= r.IS_DHRS
        self.raise_is(irq)

    def _failed(self, command: Command, queued: bool, done: Done) -> None:
        """The drive refused or failed the command: ERR in the task file, PxIS.TFES, and
        the command list halts (the failed slot keeps its PxCI/PxSACT bit)."""
        self.running.pop(command.slot, None)
        self.stats["errors"] += 1
        log.debug("%s port %d: slot %d: command %#04x failed: status %#04x error %#04x",
                  self.hba.name, self.index, command.slot, command.opcode, done.status,
                  done.error)
        self.tfd = done.error << 8 | done.status
        self.halted = True
        if queued:
            self._post(r.RX_SDB, fis.sdb(done.status, done.error, 0, interrupt=True))
            irq = r.IS_SDBS
        else:
            shadow = done.shadow if done.shadow is not None else fis.shadow_of(command.cfis)
            self._post(r.RX_D2H, fis.d2h(done.status, done.error, shadow, interrupt=True))
            irq = r.IS_DHRS
        self.raise_is(irq | r.IS_TFES)

    def _fatal(self, bits: int, why: str) -> None:
        """The HBA cannot go on with the command list (a bad pointer, a bad FIS)."""
        self.stats["errors"] += 1
        self._glog.warning("%s port %d: %s", self.hba.name, self.index, why)
        self.halted = True
        self.tfd = r.ER_ABRT << 8 | r.ST_DRDY | r.ST_ERR
        self.raise_is(bits)

    def _post(self, offset: int, data: bytes) -> bool:
        """Put a FIS into the received-FIS area (if FIS receive is on); False if the area
        is not guest memory (then a host bus error halts the port)."""
        if not self.cmd & r.CMD_FRE:
            return True
        try:
            view(self.memory, self.fb + offset, len(data))[:] = data
        except BusError:
            self.halted = True
            self.raise_is(r.IS_HBFS)
            return False
        return True

    def raise_is(self, bits: int) -> None:
        """Set PxIS bits; the HBA interrupts for those newly set and enabled."""
        new = bits & ~self.is_
        self.is_ |= bits
        if new & self.ie:
            self.hba.port_interrupt(self, new & self.ie)

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        if self.drive is not None:
            out.update(self.drive.counters())
        return out


__all__ = ["Port", "PortHost"]
