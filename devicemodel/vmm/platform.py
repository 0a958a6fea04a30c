"""The VM's fixed platform: RTC, ACPI PM and reset, debug exit, ACPI tables, the loader.

Assembly (``vm.py``) builds the ``Platform`` once the PCI bus is built (the tables
describe its INTx routes and the LPC bridge's COM ports) and asks it for the guest image
and the BSP registers; the Platform runs the guest power task and resets/reloads on a
guest reset. It gets exactly what it uses, never the Vm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..hostinfo import host_lapic_ids
from ..hsm.base import VcpuRegs
from ..irq.services import IrqLines, Line
from ..platform import acpi
from ..platform.acpi_pm import processor_objects, query_states
from ..platform.debugexit import DEBUGEXIT_PORT, DEBUGEXIT_SPAN, DebugExit
from ..platform.loader_bzimage import load_bzimage
from ..platform.loader_elf import load_elf
from ..platform.loader_ovmf import OvmfFirmware
from ..platform.lpc import LpcBridge
from ..platform.pm import PowerManagement
from ..platform.rtc import RTC_INDEX_PORT, RTC_IRQ, Rtc
from .reset import GuestPower

if TYPE_CHECKING:
    from ..bus import PortBus
    from ..config import VmConfig
    from ..hsm.base import Hypervisor
    from ..memory import GuestMemory
    from ..pci.bus import PciBus
    from .mmio_devices import TpmWindow

log = logging.getLogger(__name__)


def guest_lapic_ids(hv_name: str, cpu_affinity: list[int] | None, vcpus: int) -> list[int]:
    """APIC IDs for the MADT: under ACRN the vCPUs keep their pCPUs' LAPIC IDs; a KVM or
    sim vCPU's APIC ID is its index."""
    if hv_name == "acrn" and cpu_affinity:
        host = host_lapic_ids()
        pcpus = sorted(cpu_affinity)[:vcpus]
        if host and all(p < len(host) for p in pcpus):
            return [host[p] for p in pcpus]
    return list(range(vcpus))


class Platform:
    """The platform devices of one VM, and its guest power transitions.

    ``stop`` ends the VM (guest power-off); ``pci`` is the built PCI bus; ``lpc`` the
    LPC bridge, if the VM has one."""

    def __init__(self, *, config: VmConfig, hv: Hypervisor, memory: GuestMemory,
                 ports: PortBus, lines: IrqLines, vcpus: int, pci: PciBus,
                 lpc: LpcBridge | None, stop: Callable[[], None], vmid: int = 0,
                 tpm: TpmWindow | None = None) -> None:
        self.config = config
        self.vmid = vmid
        self.tpm = tpm
        self.hv = hv
        self.memory = memory
        self.ports = ports
        self.vcpus = vcpus
        self.pci = pci
        self.lpc = lpc
        self._ports: list[int] = []
        self.firmware: OvmfFirmware | None = None
        self.tables: dict[int, bytes] = {}
        self.power = GuestPower(config.name, hv, stop, pci.reset, self.reload, self.reset,
                                self.flush_consoles)
        try:
            self.rtc = Rtc(memory.lowmem, memory.highmem, irq=Line(lines, RTC_IRQ))
            ports.register(RTC_INDEX_PORT, 2, self.rtc, "rtc")
            self._ports.append(RTC_INDEX_PORT)
            self.pm = PowerManagement(Line(lines, acpi.SCI_INT), self._s5,
                                      self.power.request_reset)
            self._ports += self.pm.register(ports)
            self.debugexit: DebugExit | None = None
            if config.debugexit:
                self.debugexit = DebugExit(self.power.poweroff)
                ports.register(DEBUGEXIT_PORT, DEBUGEXIT_SPAN, self.debugexit, "debugexit")
                self._ports.append(DEBUGEXIT_PORT)
        except BaseException:
            self.close()
            raise
        if config.lpc and self.lpc is None:
            log.warning("-l %s is ignored: COM ports need an LPC bridge (-s <slot>,lpc), "
                        "as in acrn-dm", config.lpc[0].device)

    def _s5(self) -> None:
        self.power.poweroff()

    @property
    def exit_code(self) -> int | None:
        """What the guest wrote to the debug-exit port, if it ended that way."""
        return self.power.exit_code

    # --- ACPI ---------------------------------------------------------------------------
    def acpi_config(self) -> acpi.AcpiConfig:
        cfg = acpi.AcpiConfig(lapic_ids=guest_lapic_ids(self.hv.name, self.config.cpu_affinity,
                                                        self.vcpus))
        cfg.prt = [acpi.PrtEntry(r.slot, r.pin, r.gsi, r.pirq_pin)
                   for r in self.pci.intx.routes() if r.bus == 0]
        cfg.rtvm = self.config.rtvm
        cfg.processors = processor_objects(
            [query_states(self.hv.pm_get_cpu_state, self.vmid, v) for v in range(self.vcpus)])
        if self.tpm is not None:
            t = self.tpm
            cfg.tpm = (t.base, t.size, t.log_length, t.log_address)
        lpc = self.lpc
        if lpc is not None and lpc.slot is not None:
            cfg.lpc_slot = (lpc.slot.dev, lpc.slot.func)
            cfg.com_ports = [acpi.ComDevice(p.name, p.base, p.irq) for p in lpc.ports]
        return cfg

    def install_acpi(self) -> None:
        self.tables = acpi.install_tables(self.memory, self.acpi_config())

    # --- the guest image ----------------------------------------------------------------
    def load_guest(self) -> VcpuRegs | None:
        """Load OVMF, else a bzImage, else an ELF (acrn-dm's order); None if no image."""
        cfg = self.config
        memory = self.memory
        if cfg.ovmf is not None:
            if self.firmware is None:
                self.firmware = OvmfFirmware(memory, self.hv, cfg.ovmf)
            return self.firmware.load()
        if cfg.kernel:
            return load_bzimage(memory, cfg.kernel, cfg.bootargs, cfg.ramdisk)
        if cfg.elf:
            return load_elf(memory, cfg.elf, cfg.bootargs)
        if self.hv.name != "sim":
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
        for base in self._ports:
            try:
                self.ports.unregister(base)
            except Exception:
                log.debug("unregister %#x failed", base, exc_info=True)
        self._ports.clear()
        if self.firmware is not None:
            self.firmware.close()


__all__ = ["Platform", "guest_lapic_ids"]
