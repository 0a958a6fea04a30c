"""Power transitions the guest asks for: power-off (S5, debug exit) and system reset.

Reset follows acrn-dm's vm_system_reset (acrn-facts §1.5): the request that asked for
it (a write to 0xCF9) is left uncompleted, since completing it would let that vCPU run
on, then PAUSE_VM, CLEAR_VM_IOREQ (which completes every pending request, that one
included), reset the devices, RESET_VM (every slot FREE again), reload the firmware or
kernel and the ACPI tables, SET_VCPU_REGS for the BSP, START_VM.

(The host-side stop path, SIGTERM and the monitor, is ``lifecycle.py``.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ..hsm.base import Hypervisor, VcpuRegs
    from ..ioreq import IoreqServer

log = logging.getLogger(__name__)


class GuestPower:
    """Carries out the guest's power-off and reset requests for one VM.

    ``stop`` ends the VM; ``reset_devices`` puts every device back to power-on (the PCI
    bus's reset); ``reload`` reloads the tables and image and gives the BSP registers;
    ``reset_platform`` resets the platform devices. ``server`` is set by assembly once the
    request server exists (a reset holds its completions)."""

    def __init__(self, name: str, hv: Hypervisor, stop: Callable[[], None],
                 reset_devices: Callable[[], None], reload: Callable[[], VcpuRegs | None],
                 reset_platform: Callable[[], None],
                 before_poweroff: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.hv = hv
        self.server: IoreqServer | None = None
        self._stop = stop
        self._reset_devices = reset_devices
        self._reload = reload
        self._reset_platform = reset_platform
        self._before_poweroff = before_poweroff
        self.exit_code: int | None = None
        self.resets = 0
        self.resetting = False
        self._send, self._receive = trio.open_memory_channel(8)

    # --- requests (called from port handlers: never block) --------------------------------
    def poweroff(self, code: int | None = None) -> None:
        """End the VM; ``code`` is what a debug-exit write said."""
        if code is not None and self.exit_code is None:
            self.exit_code = code
        try:
            self._before_poweroff()
        except Exception:
            log.exception("flushing before power-off failed")
        self._stop()

    def request_reset(self) -> None:
        """Reset the VM once the current scan of the request slots is done."""
        if self.resetting:
            return
        server = self.server
        if server is not None:
            server.hold_completion = True
        self.resetting = True
        try:
            self._send.send_nowait("reset")
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.warning("reset request dropped")

    # --- the task ---------------------------------------------------------------------------
    async def serve(self) -> None:
        async for _ in self._receive:
            try:
                await self.system_reset()
            except Exception:
                log.exception("VM reset failed; powering off")
                self.poweroff()
                return

    async def system_reset(self) -> None:
        hv = self.hv
        server = self.server
        log.info("VM %s: system reset", self.name)
        await trio.lowlevel.checkpoint()  # let the scan that asked for it finish
        hv.pause_vm()
        try:
            hv.clear_vm_ioreq()
        except BaseException:
            if server is not None:  # nothing was cleared: let the vCPUs go on
                server.hold_completion = False
                server.release_held()
            self.resetting = False
            raise
        # give whoever waits on the completed requests a turn before RESET_VM frees the
        # slots (a sim guest; the HSM also lets its clients drain). Two scheduling rounds:
        # trio may run us before them in the first.
        for _ in range(2):
            await trio.lowlevel.checkpoint()
        if server is not None:
            # CLEAR_VM_IOREQ completed the held requests; finishing them again after
            # RESET_VM would mark FREE slots COMPLETE, so they are dropped
            server.held.clear()
            server.hold_completion = False
        self._reset_devices()
        self._reset_platform()
        hv.reset_vm()
        regs = self._reload()
        if regs is not None:
            hv.set_vcpu_regs(0, regs)
        self.resets += 1
        self.resetting = False
        hv.start_vm()
        log.info("VM %s: running again after reset #%d", self.name, self.resets)
