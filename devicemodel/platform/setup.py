"""The VM's fixed platform: RTC, ACPI PM and reset, debug exit, ACPI tables, the loader.

vm.py calls ``install_platform`` once the PCI bus is built (the tables describe its INTx
routes and the LPC bridge's COM ports) and ``load_guest`` for the BSP registers; the
returned Platform runs the guest power task and resets/reloads on a guest reset.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from ..hostinfo import host_lapic_ids
from ..hsm.base import VcpuRegs
from ..reset import GuestPower
from . import acpi
from .debugexit import DEBUGEXIT_PORT, DEBUGEXIT_SPAN, DebugExit
from .loader_bzimage import load_bzimage
from .loader_elf import load_elf
from .loader_ovmf import OvmfFirmware
from .lpc import LpcBridge
from .pm import PowerManagement
from .rtc import RTC_INDEX_PORT, Rtc

if TYPE_CHECKING:
    from ..vm import Vm

log = logging.getLogger(__name__)

def guest_lapic_ids(vm: Vm) -> list[int]:
    """APIC IDs for the MADT: under ACRN the vCPUs keep their pCPUs' LAPIC IDs; a KVM or
    sim vCPU's APIC ID is its index."""
    n = vm.vcpu_num
    if vm.hv.name == "acrn" and vm.config.cpu_affinity:
        host = host_lapic_ids()
        pcpus = sorted(vm.config.cpu_affinity)[:n]
        if host and all(p < len(host) for p in pcpus):
            return [host[p] for p in pcpus]
    return list(range(n))


class Platform:
    """The platform devices of one VM, and its guest power transitions."""

    def __init__(self, vm: Vm) -> None:
        assert vm.ctx is not None and vm.memory is not None
        self.vm = vm
        ctx = vm.ctx
        self._ports: list[int] = []
        self.firmware: OvmfFirmware | None = None
        self.tables: dict[int, bytes] = {}
        self.power = GuestPower(vm, self.reload, self.reset, self.flush_consoles)
        try:
            self.rtc = Rtc(vm.memory.lowmem, vm.memory.highmem,
                           set_irqline=ctx.irq.set_irqline)
            ctx.ports.register(RTC_INDEX_PORT, 2, self.rtc, "rtc")
            self._ports.append(RTC_INDEX_PORT)
            self.pm = PowerManagement(ctx.irq.set_irqline, self._s5, self.power.request_reset)
            self._ports += self.pm.register(ctx.ports)
            self.debugexit: DebugExit | None = None
            if vm.config.debugexit:
                self.debugexit = DebugExit(self.power.poweroff)
                ctx.ports.register(DEBUGEXIT_PORT, DEBUGEXIT_SPAN, self.debugexit, "debugexit")
                self._ports.append(DEBUGEXIT_PORT)
        except BaseException:
            self.close()
            raise
        ctx.extras["platform"] = self
        ctx.extras["guest_power"] = self.power
        ctx.extras["power_button"] = self.pm.press_power_button
        if vm.config.lpc and self.lpc is None:
            log.warning("-l %s is ignored: COM ports need an LPC bridge (-s <slot>,lpc), "
                        "as in acrn-dm", vm.config.lpc[0].device)

    def _s5(self) -> None:
        self.power.poweroff()

    @property
    def lpc(self) -> LpcBridge | None:
        for dev in self.vm.devices.values():
            if isinstance(dev, LpcBridge):
                return dev
        return None

    @property
    def exit_code(self) -> int | None:
        """What the guest wrote to the debug-exit port, if it ended that way."""
        return self.power.exit_code

    # --- ACPI ---------------------------------------------------------------------------
    def acpi_config(self) -> acpi.AcpiConfig:
        vm = self.vm
        cfg = acpi.AcpiConfig(lapic_ids=guest_lapic_ids(vm))
        router: Any = getattr(vm.pci, "intx", None)
        if router is not None and hasattr(router, "routes"):
            cfg.prt = [acpi.PrtEntry(r.slot, r.pin, r.gsi, r.pirq_pin) for r in router.routes()
                       if r.bus == 0]
        lpc = self.lpc
        if lpc is not None and lpc.slot is not None:
            cfg.lpc_slot = (lpc.slot.dev, lpc.slot.func)
            cfg.com_ports = [acpi.ComDevice(p.name, p.base, p.irq) for p in lpc.ports]
        return cfg

    def install_acpi(self) -> None:
        assert self.vm.memory is not None
        self.tables = acpi.install_tables(self.vm.memory, self.acpi_config())

    # --- the guest image ----------------------------------------------------------------
    def load_guest(self) -> VcpuRegs | None:
        """Load OVMF, else a bzImage, else an ELF (acrn-dm's order); None if no image."""
        vm = self.vm
        cfg = vm.config
        memory = vm.memory
        assert memory is not None
        if cfg.ovmf is not None:
            if self.firmware is None:
                self.firmware = OvmfFirmware(memory, vm.hv, cfg.ovmf)
            return self.firmware.load()
        if cfg.kernel:
            return load_bzimage(memory, cfg.kernel, cfg.bootargs, cfg.ramdisk)
        if cfg.elf:
            return load_elf(memory, cfg.elf, cfg.bootargs)
        if vm.hv.name != "sim":
            log.warning("no guest image (-k, -E or --ovmf): the vCPUs have nothing to run")
        return None

    def reload(self) -> VcpuRegs | None:
        """After RESET_VM: fresh tables (routes may differ) and a fresh image."""
        if self.firmware is not None:
            self.firmware.writeback()
        self.install_acpi()
        return self.load_guest()

    # --- lifetime -----------------------------------------------------------------------
    def reset(self) -> None:
        self.rtc.reset()
        self.pm.reset()
        if self.debugexit is not None:
            self.debugexit.reset()

    def flush_consoles(self) -> None:
        lpc = self.lpc
        if lpc is not None:
            lpc.flush()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.rtc.run)
            nursery.start_soon(self.power.serve)

    def close(self) -> None:
        ctx = self.vm.ctx
        if ctx is not None:
            for base in self._ports:
                try:
                    ctx.ports.unregister(base)
                except Exception:
                    log.debug("unregister %#x failed", base, exc_info=True)
        self._ports.clear()
        if self.firmware is not None:
            self.firmware.close()


def install_platform(vm: Vm) -> Platform:
    """Create the platform devices and write the ACPI tables."""
    platform = Platform(vm)
    try:
        platform.install_acpi()
    except BaseException:
        platform.close()
        raise
    return platform


def load_guest(vm: Vm) -> VcpuRegs | None:
    """Load the guest image; returns the BSP registers for SET_VCPU_REGS (None: none)."""
    platform = vm.ctx.extras.get("platform") if vm.ctx is not None else None
    if not isinstance(platform, Platform):
        raise RuntimeError("load_guest needs install_platform first")
    return platform.load_guest()
