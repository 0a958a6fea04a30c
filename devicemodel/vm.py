"""Run a VM: build it from its description on a backend, with the services its
description asks for (the monitor socket), inside the caller's trio context.

The VM itself is assembled in ``vmm/``; this is the front door the command line, the
benchmarks and the tests use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .config import ConfigError, VmConfig, parse_args
from .hsm import open_hypervisor
from .hsm.base import Hypervisor
from .monitor import serve_monitor
from .vmm.vm import Service, Vm


def config_from(args: list[str] | VmConfig) -> VmConfig:
    return args if isinstance(args, VmConfig) else parse_args(list(args))


def new_vm(cfg: VmConfig, hv: Hypervisor) -> Vm:
    """A VM with the services its description asks for (``--cmd_monitor``)."""
    services: list[Service] = [serve_monitor] if cfg.cmd_monitor else []
    return Vm(cfg, hv, services=services)


@asynccontextmanager
async def running(
    args: list[str] | VmConfig, hypervisor: Hypervisor | None = None
) -> AsyncIterator[Vm]:
    """Build and run a VM inside the caller's trio context; power it off when the block ends."""
    cfg = config_from(args)
    hv = hypervisor or open_hypervisor(cfg.hv, cfg.vcpus)
    vm = new_vm(cfg, hv)
    vm.build()
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        try:
            yield vm
        finally:
            vm.poweroff()


__all__ = ["ConfigError", "Vm", "config_from", "new_vm", "running"]
