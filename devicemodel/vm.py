"""Assembles a VM from its description and runs its lifetime in one trio nursery.

Order (acrn-facts §3.2): CREATE_VM with the request page → RAM through SET_MEMSEG →
buses, PCI bus, devices → CREATE_IOREQ_CLIENT → START_VM → serve until power-off.
Shutdown is cancellation: PAUSE, DESTROY_IOREQ_CLIENT (wakes the server), cancel device
tasks, DESTROY_VM, then release every host resource we took.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import devices
from .bus import MmioBus, PortBus
from .config import ConfigError, VmConfig, parse_args
from .context import Interrupts, VmContext
from .hsm import abi, open_hypervisor
from .hsm.base import Hypervisor
from .ioreq import IoreqServer, new_ioreq_page
from .memory import GuestMemory
from .pci.bus import PciBus
from .pci.registry import factory_for
from .platform.setup import Platform, install_platform, load_guest

log = logging.getLogger(__name__)


class Vm:
    """One user VM: its memory, buses, devices and request server."""

    def __init__(self, config: VmConfig, hv: Hypervisor) -> None:
        self.config = config
        self.hv = hv
        self.memory: GuestMemory | None = None
        self.page: mmap.mmap | None = None
        self.ports = PortBus()
        self.mmio = MmioBus()
        self.irq = Interrupts(hv)
        self.pci: PciBus | None = None
        self.devices: dict[tuple[int, int, int], Any] = {}
        self.server: IoreqServer | None = None
        self.vcpu_num = 0
        self.state = "new"  # new, built, running, stopping, stopped
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._cleanups: list[Callable[[], None]] = []
        self.ctx: VmContext | None = None
        self.platform: Platform | None = None

    # --- building -----------------------------------------------------------------------
    def build(self) -> None:
        """Create the VM and its devices. On any error, undo what was done and re-raise."""
        try:
            self._build()
        except BaseException:
            self._release()
            raise
        self.state = "built"

    def _build(self) -> None:
        cfg = self.config
        devices.load_all()
        self.page = new_ioreq_page()
        info = self.hv.create_vm(cfg.name, self.page, cpu_affinity=cfg.cpu_affinity_mask)
        self._cleanups.append(self.hv.destroy_vm)
        self.vcpu_num = info.vcpu_num
        self.memory = GuestMemory(cfg.memsize, name=f"{cfg.name}-ram")
        self._cleanups.append(self.memory.close)
        for region in self.memory.regions:
            self.hv.set_memseg(region.gpa, region.mm, abi.MEM_ACCESS_RWX | abi.MEM_TYPE_WB)
        self.ctx = VmContext(
            config=cfg,
            memory=self.memory,
            ports=self.ports,
            mmio=self.mmio,
            irq=self.irq,
            hv_name=self.hv.name,
            hv=self.hv,
        )
        self.pci = PciBus(self.ctx)
        self.ctx.extras["pci"] = self.pci
        for slot in cfg.slots:
            factory = factory_for(slot.emul)
            dev = factory(self.ctx, slot)
            self._cleanups.append(dev.close)
            self.devices[(slot.bus, slot.dev, slot.func)] = dev
            self.pci.add(slot, dev)
        self.pci.finish()  # BAR allocation and INTx routing, in acrn-dm's order
        # RTC, PM/reset, debugexit, ACPI tables, then the guest image
        self.platform = install_platform(self)
        self._cleanups.append(self.platform.close)
        regs = load_guest(self)
        if regs is not None:
            self.hv.set_vcpu_regs(0, regs)
        self.server = IoreqServer(self.hv, self.page, self.vcpu_num, self.ports, self.mmio,
                                  self.pci)
        self.hv.create_ioreq_client()
        self._cleanups.append(self.hv.destroy_ioreq_client)

    def _release(self) -> None:
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception:
                log.exception("cleanup step %s failed", getattr(fn, "__qualname__", fn))
        if self.page is not None:
            try:
                self.page.close()
            except BufferError:
                pass
        self.hv.close()

    # --- running ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the VM until power-off; reports started once the VM runs."""
        if self.state == "new":
            self.build()
        assert self.server is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.hv.serve_backend)
                nursery.start_soon(self._serve_requests)
                for dev in self.devices.values():
                    nursery.start_soon(self._run_device, dev)
                if self.platform is not None:  # guest power-off and reset requests
                    nursery.start_soon(self._run_device, self.platform)
                if self.config.cmd_monitor:
                    from .monitor import serve_monitor

                    await nursery.start(serve_monitor, self)
                self.hv.start_vm()
                self.state = "running"
                log.info("VM %s running with %d vCPU(s)", self.config.name, self.vcpu_num)
                task_status.started()
                await self._stop.wait()
                self.state = "stopping"
                try:
                    self.hv.pause_vm()
                except Exception:
                    log.exception("PAUSE_VM failed")
                nursery.cancel_scope.cancel()
        finally:
            self._release()
            self.state = "stopped"
            self._stopped.set()
            log.info("VM %s stopped", self.config.name)

    async def _serve_requests(self) -> None:
        assert self.server is not None
        await self.server.serve()
        # the client is gone: the VM cannot run on
        self.poweroff()

    async def _run_device(self, dev: Any) -> None:
        try:
            await dev.run()
        except Exception:
            log.exception("device %s failed; the VM goes on without it",
                          getattr(dev, "name", dev))

    def poweroff(self) -> None:
        """Ask the VM to stop; ``run`` returns once everything is released."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- queries ------------------------------------------------------------------------
    def device(self, slot: str | int) -> Any:
        """The device at a slot given as ``"b:d:f"``, ``"d:f"``, ``"d"`` or an int."""
        key = _slot_key(slot)
        try:
            return self.devices[key]
        except KeyError:
            raise KeyError(f"no device at slot {slot}") from None

    def passthrough(self, slot: str | int) -> Any:
        dev = self.device(slot)
        if not hasattr(dev, "host"):
            raise KeyError(f"slot {slot} is not a passthrough device")
        return dev


def _slot_key(slot: str | int) -> tuple[int, int, int]:
    if isinstance(slot, int):
        return (0, slot, 0)
    nums = [int(x, 10) for x in str(slot).split(":")]
    if len(nums) == 1:
        return (0, nums[0], 0)
    if len(nums) == 2:
        return (0, nums[0], nums[1])
    return (nums[0], nums[1], nums[2])


def config_from(args: list[str] | VmConfig) -> VmConfig:
    return args if isinstance(args, VmConfig) else parse_args(list(args))


@asynccontextmanager
async def running(
    args: list[str] | VmConfig, hypervisor: Hypervisor | None = None
) -> AsyncIterator[Vm]:
    """Build and run a VM inside the caller's trio context; power it off when the block ends."""
    cfg = config_from(args)
    hv = hypervisor or open_hypervisor(cfg.hv, cfg.vcpus)
    vm = Vm(cfg, hv)
    vm.build()
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        try:
            yield vm
        finally:
            vm.poweroff()


__all__ = ["Vm", "running", "ConfigError"]
