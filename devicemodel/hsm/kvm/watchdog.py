"""The halt watchdog: with the in-kernel LAPIC a HLT never reaches user space, so a guest
that halts with interrupts off (or whose APs never get their SIPI) would sleep forever.
When no vCPU has exited for a while, every vCPU thread is kicked to probe its own state
(``vcpu.probe_halted``); if all of them are halted for good, the VM stops."""

from __future__ import annotations

import trio

from .runner import VcpuRunner

#: how often the watchdog looks for a VM whose every vCPU halted with IF=0
HALT_CHECK_INTERVAL = 1.0
#: how long it waits for the vCPU threads to answer a probe
_PROBE_WAIT_STEPS, _PROBE_WAIT_STEP = 50, 0.01


async def watch_halts(runner: VcpuRunner) -> None:
    """Runs until cancelled, or until it stopped the VM."""
    last = -1
    while True:
        await trio.sleep(HALT_CHECK_INTERVAL)
        exits = sum(vc.exits for vc in runner.vcpus)
        if not runner.running or not runner.can_kick or exits != last:
            last = exits
            continue
        with runner.cond:
            for vc in runner.vcpus:
                vc.probe_dead = None
                vc.probe = True
            runner.kick_all()
        for _ in range(_PROBE_WAIT_STEPS):
            await trio.sleep(_PROBE_WAIT_STEP)
            if all(vc.probe_dead is not None or not vc.alive for vc in runner.vcpus):
                break
        results = [vc.probe_dead for vc in runner.vcpus if vc.alive]
        if results and all(results) and runner.running:
            runner.fatal("every vCPU halted with interrupts disabled")
            return
