"""Stopping a VM politely: ask the guest to power off, then destroy it after a grace time.

SIGTERM (systemd's stop), SIGINT and the monitor's ``poweroff`` all come here. If the
platform offers a power button (``vm.power_button``, the PM device's, wired by
assembly) and the guest can hear it (``vm.power_button_heard``: it enabled ACPI), it is
pressed and the guest gets ``shutdown_timeout`` seconds to power off on its own;
otherwise (a guest that never set SCI_EN could only ignore the button, so waiting for it
would just delay Ctrl-C by the whole grace time), or on a second request, or with
``force``, the VM is stopped at once (PAUSE, DESTROY_IOREQ_CLIENT, DESTROY_VM and every
host resource released by vm.py).

Pause and resume live here too so that status, monitor and shutdown agree on the state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..hsm.base import Hypervisor
    from ..sdnotify import Notifier

log = logging.getLogger(__name__)

REPEAT_GRACE = 1.0  # seconds: a second request sooner than this is the same request


class ControlledVm(Protocol):
    """What the lifecycle needs of a VM (``vm.Vm`` has it)."""

    config: VmConfig
    hv: Hypervisor
    lifecycle: Lifecycle | None

    @property
    def state(self) -> str: ...

    @property
    def power_button(self) -> Callable[[], Any] | None: ...

    def poweroff(self) -> None: ...


class Lifecycle:
    def __init__(self, vm: ControlledVm, notifier: Notifier | None = None) -> None:
        self.vm = vm
        self.notifier = notifier
        self.paused = False
        self.started = time.monotonic()
        self.shutdown_requested: str | None = None
        self._request = trio.Event()
        self._force = False
        self._requested_at = 0.0

    @classmethod
    def of(cls, vm: ControlledVm) -> tuple[Lifecycle, bool]:
        """The VM's lifecycle, and whether it was just made (then the caller runs ``run``)."""
        if vm.lifecycle is not None:
            return vm.lifecycle, False
        lc = cls(vm)
        vm.lifecycle = lc
        return lc, True

    @property
    def state(self) -> str:
        if self.vm.state == "running" and self.paused:
            return "paused"
        if self.vm.state == "running" and self.shutdown_requested:
            return "shutting-down"
        return self.vm.state

    def _status(self, text: str) -> None:
        if self.notifier is not None:
            self.notifier.status(text)

    # --- pause / resume -------------------------------------------------------------------
    def pause(self) -> None:
        if self.vm.state != "running":
            raise RuntimeError(f"the VM is {self.vm.state}, not running")
        if self.paused:
            raise RuntimeError("the VM is already paused")
        self.vm.hv.pause_vm()
        self.paused = True
        log.info("VM %s paused", self.vm.config.name)
        self._status(f"VM {self.vm.config.name} paused")

    def resume(self) -> None:
        if self.vm.state != "running":
            raise RuntimeError(f"the VM is {self.vm.state}, not running")
        if not self.paused:
            raise RuntimeError("the VM is not paused")
        self.vm.hv.start_vm()
        self.paused = False
        log.info("VM %s resumed", self.vm.config.name)
        self._status(f"VM {self.vm.config.name} running")

    # --- power-off ------------------------------------------------------------------------
    def power_button(self) -> Callable[[], Any] | None:
        button = self.vm.power_button
        return button if callable(button) else None

    def guest_deaf(self) -> bool:
        """Whether the guest has a power button but cannot hear it (ACPI never enabled)."""
        heard = getattr(self.vm, "power_button_heard", None)
        return self.power_button() is not None and callable(heard) and not heard()

    def destroys_now(self, force: bool = False) -> bool:
        """Whether a power-off request now would skip the guest's own shutdown."""
        graceful = self.power_button() is not None and self.vm.config.shutdown_timeout > 0 \
            and not self.guest_deaf()
        return force or self.shutdown_requested is not None or not graceful

    def request_poweroff(self, reason: str, *, force: bool = False) -> str:
        """Start an orderly stop; returns what will happen, for the caller to report.

        A repeated request forces the stop, unless it comes within a second of the first:
        Ctrl-C in a launch script reaches both the script (which forwards it) and us.
        """
        first = self.shutdown_requested is None
        now = time.monotonic()
        if not first and not force and now - self._requested_at < REPEAT_GRACE:
            return "already stopping"
        if first:
            self._requested_at = now
        if first and self.notifier is not None:
            self.notifier.stopping(f"stopping VM {self.vm.config.name}: {reason}")
        if self.destroys_now(force):
            self._force = True
            how = "destroying the VM now"
            if not force and first and self.guest_deaf() \
                    and self.vm.config.shutdown_timeout > 0:
                how += " (the guest never enabled ACPI, so it cannot answer the power button)"
        else:
            how = (f"power button pressed; destroying the VM in "
                   f"{self.vm.config.shutdown_timeout:g} s unless it powers off first")
        self.shutdown_requested = reason
        log.info("%s: %s", reason, how)
        self._request.set()
        return how

    def poweroff(self) -> None:
        """Stop now, without asking the guest (console Ctrl-A x, ``poweroff force``)."""
        self.request_poweroff("immediate power-off", force=True)

    async def run(self) -> None:
        """Carry out power-off requests; runs for the VM's life in its nursery."""
        await self._request.wait()
        button = self.power_button()
        if not self._force and button is not None:
            if self.paused:
                try:
                    self.resume()  # a paused guest cannot act on its power button
                except Exception:
                    log.exception("resume before power-off failed")
            try:
                button()
            except Exception:
                log.exception("pressing the power button failed; destroying the VM")
            else:
                timeout = self.vm.config.shutdown_timeout
                if self.notifier is not None:
                    self.notifier.extend_timeout(timeout + 10)
                with trio.move_on_after(timeout):
                    while not self._force:
                        self._request = trio.Event()
                        await self._request.wait()  # a second request forces
                if not self._force:
                    log.warning("guest did not power off within %g s; destroying it", timeout)
        self.vm.poweroff()
