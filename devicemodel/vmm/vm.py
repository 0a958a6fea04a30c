"""Assembles a VM from its description and runs its lifetime in one trio nursery.

Order (acrn-facts §3.2): CREATE_VM with the request page → RAM through SET_MEMSEG →
buses, PCI bus, devices → CREATE_IOREQ_CLIENT → START_VM → serve until power-off.
Shutdown is cancellation: PAUSE, DESTROY_IOREQ_CLIENT (wakes the server), cancel device
tasks, DESTROY_VM, then release every host resource we took.

This is the one place that knows the backend and the VM description and the devices at
once: it fills the devices' context (``context.DeviceContext``), builds them from the
registry, and wires what spans them (the LPC bridge's COM ports and PIRQ registers, the
platform, the power button) with explicit references.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from ..bus import MmioBus, PortBus
from ..config import VmConfig
from ..context import DeviceChoices, DeviceContext
from ..errors import ConfigError
from ..hsm import abi
from ..hsm.base import Hypervisor, RemapperFactory
from ..ioreq import IoreqServer, new_ioreq_page
from ..irq.backend import BackendInterrupts
from ..irq.remap import IrqfdRemapperFactory
from ..memory import GuestMemory
from ..pci.bus import PciBus
from ..platform.lpc import LpcBridge
from ..registry import create_pci
from ..slot import SlotConfig
from .intr_monitor import StormMonitor
from .mmio_devices import MmioDevices
from .platform import Platform

if TYPE_CHECKING:
    from .lifecycle import Lifecycle
    from .reset import GuestPower

log = logging.getLogger(__name__)

#: a task that lives as long as the VM runs (the monitor socket): started with the VM
Service = Callable[..., Awaitable[None]]


def device_choices(cfg: VmConfig) -> DeviceChoices:
    return DeviceChoices(virtio_msi=cfg.virtio_msi, virtio_poll_ns=cfg.virtio_poll,
                         windows=cfg.windows, ovmf=cfg.ovmf is not None, rtvm=cfg.rtvm)


def remapper_of(hv: Hypervisor, irq: BackendInterrupts) -> RemapperFactory | None:
    """The backend's own interrupt remapping, else irqfd routes where it has eventfds."""
    own = hv.interrupt_remapper()
    if own is not None:
        return own
    if not hv.supports_eventfds:
        return None
    return IrqfdRemapperFactory(irq)


def check_one_lpc(slots: Sequence[SlotConfig]) -> None:
    first: SlotConfig | None = None
    for slot in slots:
        if slot.emul != "lpc":
            continue
        if first is not None:
            raise ConfigError(f"-s {slot.slot_text},lpc: only one LPC bridge is allowed "
                              f"(one is at {first.slot_text})")
        first = slot


def build_functions(cfg: VmConfig, ctx: DeviceContext, pci: PciBus,
                    cleanups: list[Callable[[], None]],
                    console_quit: Callable[[], None] | None = None
                    ) -> tuple[dict[tuple[int, int, int], Any], LpcBridge | None]:
    """Every ``-s`` function from the registry on ``pci``, the LPC bridge wired (COM ports
    before INTx routing, so PCI links keep off their IRQs), the bus finished (BARs
    allocated, INTx routed, fast paths wired, in acrn-dm's order). Each function's close
    goes on ``cleanups`` as soon as it exists. Returns the functions and the LPC bridge."""
    check_one_lpc(cfg.slots)
    functions: dict[tuple[int, int, int], Any] = {}
    lpc: LpcBridge | None = None
    for slot in cfg.slots:
        dev = create_pci(ctx, slot)
        cleanups.append(dev.close)
        functions[(slot.bus, slot.dev, slot.func)] = dev
        pci.add(slot, dev)
        if isinstance(dev, LpcBridge):
            lpc = dev
    for slot, companion in [c for dev in list(functions.values())
                            for c in getattr(dev, "companions", ())]:
        # a function a device brings along (a passed-through Intel GPU's igd-lpc at 31:0)
        cleanups.append(companion.close)
        key = (slot.bus, slot.dev, slot.func)
        if key in functions:
            log.warning("-s %s,%s is not added: slot %s is taken (acrn-dm: failed to create "
                        "it)", slot.short_text, slot.emul, slot.slot_text)
            continue
        functions[key] = companion
        pci.add(slot, companion)
    if lpc is not None:
        lpc.attach(pci.intx, cfg.lpc, console_quit)
    pci.finish()
    return functions, lpc


class Vm:
    """One user VM: its memory, buses, devices and request server. ``services`` run in
    the VM's nursery for its life (``await nursery.start(service, vm)``)."""

    def __init__(self, config: VmConfig, hv: Hypervisor, *,
                 services: Sequence[Service] = ()) -> None:
        self.config = config
        self.hv = hv
        self.services = list(services)
        self.memory: GuestMemory | None = None
        self.page: mmap.mmap | None = None
        self.ports = PortBus()
        self.mmio = MmioBus()
        self.irq = BackendInterrupts(hv)
        self.pci: PciBus | None = None
        self.devices: dict[tuple[int, int, int], Any] = {}
        self.server: IoreqServer | None = None
        self.vcpu_num = 0
        self.state = "new"  # new, built, running, stopping, stopped
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._cleanups: list[Callable[[], None]] = []
        self.ctx: DeviceContext | None = None
        self.platform: Platform | None = None
        self.mmio_devices: MmioDevices | None = None
        self.storm_monitor: StormMonitor | None = None
        #: host-side stopping (signals, monitor); set by whoever runs it
        self.lifecycle: Lifecycle | None = None
        #: the guest's power button (the PM device's), once the platform is built
        self.power_button: Callable[[], Any] | None = None
        #: whether the guest can hear it now (it enabled ACPI)
        self.power_button_heard: Callable[[], bool] | None = None

    @property
    def guest_power(self) -> GuestPower | None:
        """The guest's power-off and reset path (the platform's)."""
        return self.platform.power if self.platform is not None else None

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
        check_one_lpc(cfg.slots)  # before the VM exists
        self.page = new_ioreq_page()
        info = self.hv.create_vm(cfg.name, self.page, vm_flag=cfg.vm_flag,
                                 cpu_affinity=cfg.cpu_affinity_mask)
        self._cleanups.append(self.hv.destroy_vm)
        self.vcpu_num = info.vcpu_num
        self.memory = GuestMemory(cfg.memsize, name=f"{cfg.name}-ram")
        self._cleanups.append(self.memory.close)
        for region in self.memory.regions:
            self.hv.set_memseg(region.gpa, region.mm, abi.MEM_ACCESS_RWX | abi.MEM_TYPE_WB)
        eventfds = self.irq if self.hv.supports_eventfds else None
        choices = device_choices(cfg)
        self.ctx = DeviceContext(
            memory=self.memory, msi=self.irq, lines=self.irq, eventfds=eventfds,
            choices=choices, backend=self.hv.name,
            remapper=remapper_of(self.hv, self.irq), passthrough=self.hv, ports=self.ports,
            hypervisor=self.hv)
        self.pci = PciBus(self.ports, self.mmio, self.irq, msi=self.irq, eventfds=eventfds,
                          ovmf=choices.ovmf)
        self.devices, lpc = build_functions(cfg, self.ctx, self.pci, self._cleanups,
                                            self._console_quit)
        self.mmio_devices = MmioDevices(cfg, self.hv)  # --mmiodev_pt, --acpidev_pt
        self._cleanups.append(self.mmio_devices.close)
        # RTC, PM/reset, debugexit, ACPI tables, then the guest image
        self.platform = Platform(config=cfg, hv=self.hv, memory=self.memory,
                                 ports=self.ports, lines=self.irq, vcpus=self.vcpu_num,
                                 pci=self.pci, lpc=lpc, stop=self.poweroff, vmid=info.vmid,
                                 tpm=self.mmio_devices.tpm)
        self._cleanups.append(self.platform.close)
        self.platform.install_acpi()
        self.power_button = self.platform.pm.press_power_button
        pm = self.platform.pm
        self.power_button_heard = lambda: pm.guest_listens
        regs = self.platform.load_guest()
        if regs is not None:
            self.hv.set_vcpu_regs(0, regs)
        self.server = IoreqServer(self.hv, self.page, self.vcpu_num, self.ports, self.mmio,
                                  self.pci)
        self.platform.power.server = self.server
        self.hv.create_ioreq_client()
        self._cleanups.append(self.hv.destroy_ioreq_client)
        if cfg.intr_monitor is not None:
            self.storm_monitor = StormMonitor(self.hv, cfg.intr_monitor)
            self._cleanups.append(self.storm_monitor.close)

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
                for service in self.services:
                    await nursery.start(service, self)
                self.hv.start_vm()
                if self.storm_monitor is not None:
                    nursery.start_soon(self._run_device, self.storm_monitor)
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

    def _console_quit(self) -> None:
        """Ctrl-A x on a console: the immediate power-off, when something runs the
        lifecycle (the launch and the monitor do)."""
        if self.lifecycle is not None:
            self.lifecycle.poweroff()

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


__all__ = ["Service", "Vm", "build_functions", "device_choices", "remapper_of"]
