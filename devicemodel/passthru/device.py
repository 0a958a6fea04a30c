"""``-s <slot>,passthru,<bus>/<dev>/<func>[,keep_gsi][,no_reset][,d3hot_reset]
[,vmsix_on_msi[,<bar>]]``: a physical PCI function given to the guest.

acrn-dm's steps (acrn-facts §3.7): find the device, copy its IDs and class, walk its
capabilities, reset it (sysfs ``reset``, unless ``no_reset``; ``d3hot_reset`` adds a
D3hot→D0 cycle), give its BARs guest addresses (memory BARs rounded up to 4 KiB, I/O BARs
identity-mapped), then the optional vmsix_on_msi BAR, INTx only without MSI/MSI-X or with
``keep_gsi``, and last ASSIGN_PCIDEV.

Who owns config space depends on the backend:

* ACRN (``emulates_passthrough_config``): the hypervisor traps config space and BARs
  and does MSI/MSI-X remapping, vMSI-X on MSI included; we send ASSIGN_PCIDEV (with the
  guest BAR values, the vmsix BAR's address in ``bar[i]``) and SET_PTDEV_INTR exactly as
  acrn-dm, and DEASSIGN on close.
* sim and KVM: the device model owns the guest's view. IDs, class and capabilities are
  copied from the device (read-only), BARs are virtual and their accesses forwarded,
  command-register decode/bus-master bits go to the device, MSI is virtualized through
  interrupt remapping (passthru/msi.py) or replaced by vMSI-X (vmsix_on_msi.py). The
  power management capability's PowerState reads back as the guest wrote it (D0, D3hot,
  and D1/D2 where the capability offers them), as on hardware: QEMU's vfio client (10.0
  and later) writes D3hot and reads it back before it writes D0. The physical device
  stays in D0: its MSI programming is what remapping relies on, and a D3hot→D0 cycle
  would reset it behind our back.

The BDF is hex, as acrn-dm parses it; ``sim:<vectors>[:<feature>...]`` instead of a BDF
uses the synthetic SimHostDevice (tests, and trying vMSI-X without the hardware).

Resets reach the hardware. A VM reset does what acrn-dm's deinit/init pair does: the
guest's view goes back to power-on, the function is reset (sysfs ``reset``, unless
``no_reset``; ``d3hot_reset`` as at start), and on ACRN the device is deassigned and
assigned again, so nothing the old guest left pending (a message latched while masked)
reaches the rebooted one. Where we own config space, a guest's Function Level Reset
(PCI Express Device Control bit 15, on a device whose Device Capabilities offer FLR) does
the same for the one function: MSI-X comes back disabled with every entry masked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..hsm.base import PciDevAssignment, PtdevIntx
from ..pci import caps as pcaps
from ..pci import config as pc
from ..pci.device import BarKind, PciDevice
from .host import (
    PCIE_DEVCAP,
    PCIE_DEVCAP_FLR,
    PCIE_DEVCTL,
    PCIE_DEVCTL_FLR,
    HostBar,
    HostPciDevice,
    PassthroughError,
    parse_sim_spec,
)
from .igd import RTVM_REFUSAL, IgdPlan, host_lpc_config, is_intel_graphics
from .igd import plan as igd_plan
from .kernel_msi import KernelOwnedMsi
from .msi import PtMsi
from .remap import kernel_owns_msi, remapper_for, remapping_missing
from .vmsix_on_msi import BAR_SIZE, VmsixOnMsi, check_eligible, unused_bars

if TYPE_CHECKING:
    from ..context import DeviceContext, PassthroughService
    from ..slot import SlotConfig

log = logging.getLogger(__name__)

FLAGS = ("keep_gsi", "no_reset", "d3hot_reset", "vmsix_on_msi")
#: acrn-dm options that end in a warning there and here (what acrn-dm does, and why not)
LENIENT = {
    "enable_ptm": "PTM (a virtual root port for the device) is not implemented; the device "
                  "is passed through without it, as acrn-dm does when PTM cannot be enabled",
    "gpu": "not an option (acrn-dm ignores it too; an Intel GPU at 00:02.0 is recognised "
           "by itself)",
    "dsdt": "acrn-pydm builds its ACPI tables without iasl and cannot include ASL source; "
            "the file is ignored",
    "romfile": "a ROM image is used for a GPU only (as in acrn-dm); ignored",
}
PAGE = 4096
#: command bits that reach the physical device (decode and bus mastering)
CMD_FORWARDED = pc.CMD_IO | pc.CMD_MEM | pc.CMD_MASTER
#: the power management capability: PMC and PMCSR offsets, the bits we use
PMC = 2
PMCSR = 4
PMC_D1_SUPPORT = 1 << 9  # D2: bit 10
PMCSR_POWER_STATE = 0x3


class PassthruOptions:
    """The parsed option string."""

    def __init__(self, text: str, where: str) -> None:
        tokens = [t.strip() for t in text.split(",")] if text else []
        if not tokens or not tokens[0]:
            raise ConfigError(
                f"-s {where},passthru: give the device as <bus>/<dev>/<func> in hex "
                "(e.g. 0/1f/6), or sim:<vectors>"
            )
        self.device = tokens[0]
        self.flags: set[str] = set()
        self.vmsix_bar: int | None = None
        #: irq=<n>: the host IRQ of the INTx pin, instead of the device's INTLINE
        self.irq: int | None = None
        #: what acrn-dm would warn about (options it takes and we take no further)
        self.warnings: list[str] = []
        #: romfile=<path>: a ROM BAR image (acrn-dm: GPUs only)
        self.romfile: str | None = None
        i = 1
        while i < len(tokens):
            tok = tokens[i]
            name = tok.split("=", 1)[0]
            if tok in FLAGS:
                self.flags.add(tok)
                nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
                if tok == "vmsix_on_msi" and nxt.isascii() and nxt.isdigit():
                    self.vmsix_bar = int(tokens[i + 1], 10)
                    i += 1
            elif name == "irq":
                value = tok.partition("=")[2]
                if not (value.isascii() and value.isdigit()) or int(value) > 255:
                    raise ConfigError(f"-s {where},passthru: irq={value!r} is not an IRQ "
                                      "number 0..255")
                self.irq = int(value)
            elif name == "romfile" and "=" in tok:
                self.romfile = tok.partition("=")[2]
                if not self.romfile or len(self.romfile.encode()) > 255:
                    raise ConfigError(f"-s {where},passthru: romfile=<path>: give a path of "
                                      "at most 255 bytes")
            elif name in LENIENT:
                self.warnings.append(f"-s {where},passthru: {tok}: {LENIENT[name]}")
            else:
                raise ConfigError(
                    f"-s {where},passthru: unknown option {tok!r}; known: "
                    f"{', '.join(FLAGS)}, irq=<n>, {', '.join(LENIENT)}"
                )
            i += 1
        if self.vmsix_bar is not None and not 0 <= self.vmsix_bar <= 5:
            raise ConfigError(f"-s {where},passthru: vmsix_on_msi BAR {self.vmsix_bar} "
                              "is not 0..5")
        self.phys_bdf: int | None = None
        if not self.device.startswith("sim:"):
            self.phys_bdf = parse_bdf(self.device, where)

    @property
    def sysfs_name(self) -> str:
        assert self.phys_bdf is not None
        b = self.phys_bdf
        return f"0000:{b >> 8:02x}:{(b >> 3) & 0x1F:02x}.{b & 7}"


def parse_bdf(text: str, where: str) -> int:
    """acrn-dm's ``%x/%x/%x`` → bus << 8 | dev << 3 | func."""
    parts = text.split("/")
    try:
        if len(parts) != 3:
            raise ValueError
        bus, dev, func = (int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(
            f"-s {where},passthru: {text!r} is not <bus>/<dev>/<func> in hex (e.g. 0/1f/6)"
        ) from None
    if not (0 <= bus <= 0xFF and 0 <= dev <= 0x1F and 0 <= func <= 7):
        raise ConfigError(f"-s {where},passthru: {text!r}: bus 0..ff, dev 0..1f, func 0..7")
    return bus << 8 | dev << 3 | func


def passthrough_service(ctx: DeviceContext, where: str) -> PassthroughService:
    if ctx.passthrough is None:
        raise ConfigError(f"-s {where},passthru: passthrough needs a VM on a hypervisor "
                          "backend")
    return ctx.passthrough


def open_host(opts: PassthruOptions, slot: SlotConfig, ctx: DeviceContext) -> HostPciDevice:
    if opts.phys_bdf is None:
        # a synthetic device gets a BDF of its own on a bus no real machine uses here
        return parse_sim_spec(opts.device, 0xFE00 | slot.dev << 3 | slot.func)
    from .vfio import open_sysfs_host

    service = passthrough_service(ctx, slot.slot_text)
    if service.emulates_passthrough_config:  # ACRN: the hypervisor takes it from pci-stub
        return open_sysfs_host(opts.sysfs_name, drivers=("pci-stub", "vfio-pci"))
    if not service.reaches_host_devices:
        # a simulated guest cannot take a real device's interrupts or DMA: show its guest
        # view (acrn-pydm lspci) without ever writing to it
        return open_sysfs_host(opts.sysfs_name, drivers=None)
    return open_sysfs_host(opts.sysfs_name, drivers=("vfio-pci",))


class Passthru(PciDevice):
    """One passthrough function; ``host`` is the physical side (vm.passthrough(slot))."""

    name = "passthru"
    allocate_first = True
    config_vcpu_safe = False  # its config space is the host device's: served on the loop

    def __init__(self, ctx: DeviceContext, slot: SlotConfig, host: HostPciDevice,
                 opts: PassthruOptions) -> None:
        super().__init__(ctx, slot, extended_config=True)
        self.host = host
        self.opts = opts
        self.service = passthrough_service(ctx, slot.slot_text)
        self.hv_owned = self.service.emulates_passthrough_config
        self.vmsix: VmsixOnMsi | None = None
        self.ptmsi: PtMsi | None = None
        self.assignment: PciDevAssignment | None = None
        self.intx_assignment: PtdevIntx | None = None
        self._assigned = False
        self._found_command = host.config_read(pc.COMMAND, 2)
        if "no_reset" not in opts.flags and not host.can_reset:
            log.info("passthru %s: the device has no function reset", host.name)
        self._reset_host()
        self._copy_config()
        #: the guest's Device Control register, if a guest FLR is ours to carry out
        self._flr_devctl = self._flr_register()
        self._declare_bars()
        self._setup_interrupts(ctx)
        #: the PM capability's offset (guest-writable PowerState), its state as written
        self._pm: int | None = None
        self._power_state = 0
        if not self.hv_owned:
            self._setup_power_state()
        for msg in opts.warnings:
            log.warning("%s", msg)
        #: functions this one brings along: (slot, device), added by assembly
        self.companions: list[tuple[SlotConfig, PciDevice]] = []
        self.igd: IgdPlan | None = None
        self.quirk = False
        gpu = self.cfg.get8(pc.CLASS_CODE + 2) == 0x03
        if opts.romfile is not None and not gpu:
            log.warning("passthru %s: romfile=: a ROM image is used for a GPU only; ignored "
                        "(as in acrn-dm)", host.name)
        elif opts.romfile is not None:
            raise PassthroughError(f"passthru {host.name}: romfile=: a GPU's ROM BAR is not "
                                   "implemented; remove romfile=")
        if is_intel_graphics(host):
            self._setup_igd(ctx, slot)
        map_dma = getattr(host, "map_dma", None)
        if not self.hv_owned and map_dma is not None:
            # the device's DMA lands in guest RAM (ACRN's hypervisor does this itself)
            for region in ctx.memory.regions:
                map_dma(region.gpa, region.mm)

    # --- building the guest's view ------------------------------------------------------
    def _copy_config(self) -> None:
        snap = self.host.snapshot()
        cfg = self.cfg
        cfg.set_bytes(0, snap[: min(len(snap), pc.CONFIG_SIZE)])
        if len(snap) <= pc.STD_SIZE:
            cfg.set32(pc.STD_SIZE, 0)  # no extended capabilities
        for i in range(6):
            cfg.set32(pc.BAR0 + 4 * i, 0)
        cfg.set32(pc.ROM_BAR, 0)  # no ROM BAR (acrn-dm: GPU only)
        cfg.set8(pc.INT_PIN, 0)
        cfg.set8(pc.INT_LINE, 0xFF)
        cfg.set16(pc.COMMAND, 0)
        # informational status bits stay; error (W1C) and interrupt status start clear
        cfg.set16(pc.STATUS, self.host.config_read(pc.STATUS, 2)
                  & ~(pc.STATUS_W1C | pc.STATUS_INTX))
        cfg.multifunction = False
        # capabilities are read-only copies; MSI is handled below
        self.capabilities = self.host.capabilities()

    def _declare_bars(self) -> None:
        trap = not self.hv_owned
        for hb in self.host.bars():
            kind = {"io": BarKind.IO, "mem32": BarKind.MEM32, "mem64": BarKind.MEM64}[hb.kind]
            size = hb.size if hb.kind == "io" else max(hb.size, PAGE)
            if hb.kind != "io" and hb.base & (PAGE - 1):
                raise PassthroughError(
                    f"passthru {self.host.name}: BAR{hb.index} at {hb.base:#x} is not page "
                    "aligned, so it cannot be mapped into the guest"
                )
            self.add_bar(hb.index, kind, size, read=self._bar_reader(hb),
                         write=self._bar_writer(hb), trap=trap,
                         fixed=hb.base if hb.kind == "io" else None,
                         prefetchable=hb.prefetchable if hb.kind != "io" else None)

    def _bar_reader(self, hb: HostBar) -> Callable[[int, int], int]:
        host, index = self.host, hb.index
        return lambda off, size: host.bar_read(index, off, size)

    def _bar_writer(self, hb: HostBar) -> Callable[[int, int, int], None]:
        host, index = self.host, hb.index
        return lambda off, size, value: host.bar_write(index, off, size, value)

    def _setup_interrupts(self, ctx: DeviceContext) -> None:
        ids = {c.cap_id for c in self.capabilities}
        has_msi = bool(ids & {pcaps.CAP_ID_MSI, pcaps.CAP_ID_MSIX})
        missing = None if self.hv_owned else remapping_missing(ctx)
        if pcaps.CAP_ID_MSIX in ids and not self.hv_owned and self.host.drives_hardware:
            # its table would take guest addresses straight into the hardware
            raise PassthroughError(
                f"passthru {self.host.name}: MSI-X devices are passed through on the ACRN "
                f"backend only (its hypervisor virtualizes the table); the {ctx.backend} "
                "backend passes through MSI devices"
            )
        if "vmsix_on_msi" in self.opts.flags:
            if missing:
                raise PassthroughError(f"passthru {self.host.name}: vmsix_on_msi: {missing}")
            msi, bar = check_eligible(self.host, self.opts.vmsix_bar)
            if kernel_owns_msi(ctx):
                msi = KernelOwnedMsi(self.host, msi.offset)
            if self.hv_owned:
                self._check_hv_bar(bar)
                # acrn-dm's mode: the BAR only; the hypervisor traps and emulates it
                self.add_bar(bar, BarKind.MEM32, BAR_SIZE, trap=False)
            else:
                self.vmsix = VmsixOnMsi(self.host, msi, bar, self.cfg,
                                        lambda n: remapper_for(ctx, self.host, n))
                self.add_bar(bar, BarKind.MEM32, BAR_SIZE, read=self.vmsix.bar_read,
                             write=self.vmsix.bar_write, wide=True)
                self.watch_config(msi.offset, msi.regs.length,
                                  on_write=self.vmsix.config_written)
        elif not self.hv_owned:
            msi = self.host.msi
            if msi is not None and missing:
                log.warning("passthru %s: MSI not forwarded: %s", self.host.name, missing)
            elif msi is not None:
                if kernel_owns_msi(ctx):
                    msi = KernelOwnedMsi(self.host, msi.offset)
                self.ptmsi = PtMsi(self.host, msi, self.cfg,
                                   lambda n: remapper_for(ctx, self.host, n))
                self.watch_config(msi.offset, msi.regs.length,
                                  on_write=self.ptmsi.config_written,
                                  on_read=self.ptmsi.config_read)
        want_intx = (not has_msi or "keep_gsi" in self.opts.flags) and \
            self.host.config_read(pc.INT_PIN, 1) != 0
        if want_intx and self.hv_owned:
            self.request_intx()
        elif want_intx:
            log.info("passthru %s: INTx is not forwarded on the %s backend; the guest "
                     "must use MSI", self.host.name, ctx.backend)

    def _setup_power_state(self) -> None:
        """The guest's PowerState (PMCSR bits 1:0) is writable in its view only."""
        pm = next((c for c in self.capabilities if c.cap_id == pcaps.CAP_ID_PM), None)
        if pm is None:
            return
        self._pm = pm.offset
        self._power_state = self.cfg.get16(pm.offset + PMCSR) & PMCSR_POWER_STATE
        self.cfg.set_wmask(pm.offset + PMCSR, 2, PMCSR_POWER_STATE)
        self.watch_config(pm.offset + PMCSR, 2, on_write=self._power_state_written)

    def _power_state_written(self, reg: int, size: int) -> None:
        """D1 and D2 only where PMC says the function supports them; else no change."""
        assert self._pm is not None
        pmcsr = self.cfg.get16(self._pm + PMCSR)
        state = pmcsr & PMCSR_POWER_STATE
        pmc = self.cfg.get16(self._pm + PMC)
        if state in (1, 2) and not pmc & (PMC_D1_SUPPORT << (state - 1)):
            self.cfg.set16(self._pm + PMCSR, (pmcsr & ~PMCSR_POWER_STATE) | self._power_state)
            return
        self._power_state = state
    def _setup_igd(self, ctx: DeviceContext, slot: SlotConfig) -> None:
        """An Intel GPU (passthru/igd.py): igd-lpc at 31:0, stolen memory and OpRegion
        mapped, BDSM/ASLS pointing at them, QUIRK assignment."""
        from ..pci.igd_lpc import IgdLpc
        from ..slot import SlotConfig as Slot

        if ctx.choices.rtvm:
            raise PassthroughError(f"passthru {self.host.name}: {RTVM_REFUSAL}")
        lpc_slot = Slot(0, 31, 0, "igd-lpc")
        self.companions.append((lpc_slot, IgdLpc(ctx, lpc_slot, host_lpc_config(self.host))))
        self.quirk = True
        self.igd = igd_plan(self.host)
        if self.igd is None:
            return
        for reg, value in self.igd.regs.items():
            self.cfg.set32(reg, value)
        if ctx.hypervisor is not None:
            for gpa, hpa, length in self.igd.mappings:
                ctx.hypervisor.unset_mmio(gpa, length)
                ctx.hypervisor.map_mmio(gpa, hpa, length)

    def _virtual(self, reg: int, size: int) -> bool:
        """Config bytes the device model answers for a QUIRK device on ACRN (the GPU's
        BDSM and ASLS, as acrn-dm's has_virt_pcicfg_regs)."""
        regs = self.igd.regs if self.igd is not None else {}
        return any(r < reg + size and reg < r + 4 for r in regs)

    def _check_hv_bar(self, bar: int) -> None:
        first = unused_bars(self.host.bars())[0]
        if bar != first:
            raise PassthroughError(
                f"passthru {self.host.name}: vmsix_on_msi,{bar}: the ACRN hypervisor puts the "
                f"table in the first unused BAR, {first}; write vmsix_on_msi,{first}"
            )

    # --- ACRN: hand the device to the hypervisor once BARs have guest addresses ----------
    def power_on_snapshot(self) -> None:
        super().power_on_snapshot()
        if self.hv_owned and not self._assigned:
            self._assign()

    def _assign(self) -> None:
        """acrn-dm's order: ASSIGN_PCIDEV at device init, when BARs have their guest
        values but INTx is not routed yet (INTLINE still 255); SET_PTDEV_INTR later, once
        the pin has its vIOAPIC GSI (acrn-dm's vdev_phys_access after pci_lintr_route)."""
        assert self.bdf is not None
        b, d, f = self.bdf
        virt_bdf = b << 8 | d << 3 | f
        bars = tuple(self.cfg.get32(pc.BAR0 + 4 * i) for i in range(6))
        self.assignment = PciDevAssignment(
            virt_bdf=virt_bdf, phys_bdf=self.host.phys_bdf, intr_line=0xFF,
            intr_pin=self.cfg.get8(pc.INT_PIN), bars=bars, quirk=self.quirk)
        self.service.assign_pcidev(self.assignment)
        self._assigned = True
        if self.intx is not None and self.intx.gsi is not None:
            phys_pin = self.opts.irq if self.opts.irq is not None else self.host.legacy_irq()
            self.intx_assignment = PtdevIntx(
                virt_bdf=virt_bdf, phys_bdf=self.host.phys_bdf, virt_pin=self.intx.gsi,
                phys_pin=phys_pin, is_pic_pin=False)
            self.service.set_ptdev_intr(self.intx_assignment)

    # --- config space (sim/KVM: ours; ACRN: a QUIRK device's, through to the device) ------
    def cfg_read(self, reg: int, size: int) -> int:
        if self.hv_owned and self.quirk and not self._virtual(reg, size):
            return self.host.config_read(reg, size)
        return super().cfg_read(reg, size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        if self.hv_owned and self.quirk:
            if not self._virtual(reg, size):
                self.host.config_write(reg, size, value)
            return
        touches_command = reg < pc.REVISION and reg + size > pc.COMMAND
        super().cfg_write(reg, size, value)
        if touches_command and not self.hv_owned:
            self._forward_command()
        devctl = self._flr_devctl
        if devctl is not None and reg <= devctl + 1 < reg + size \
                and (value >> 8 * (devctl + 1 - reg)) & (PCIE_DEVCTL_FLR >> 8):
            self.function_level_reset()

    def _flr_register(self) -> int | None:
        """Where the guest's Device Control is, when its FLR bit is ours to act on (we own
        config space and the device says it can do FLR)."""
        if self.hv_owned:
            return None  # ACRN's hypervisor owns config space
        cap = next((c for c in self.capabilities if c.cap_id == pcaps.CAP_ID_PCIE), None)
        if cap is None or not self.cfg.get32(cap.offset + PCIE_DEVCAP) & PCIE_DEVCAP_FLR:
            return None
        return cap.offset + PCIE_DEVCTL

    def function_level_reset(self) -> None:
        """The guest set Initiate Function Level Reset: this function back to power-on, the
        physical function reset, MSI-X disabled with every entry masked."""
        log.info("passthru %s: function level reset by the guest", self.host.name)
        self.reset()

    def _forward_command(self) -> None:
        cmd = self.cfg.command
        phys = self.host.config_read(pc.COMMAND, 2)
        new = (phys & ~CMD_FORWARDED) | (cmd & CMD_FORWARDED)
        if new != phys:
            self.host.config_write(pc.COMMAND, 2, new)
        intx_off = bool(cmd & pc.CMD_INTX_DISABLE)
        if self.vmsix is not None:
            self.vmsix.guest_intx_disable(intx_off)
        elif self.ptmsi is not None:
            self.ptmsi.guest_intx_disable(intx_off)
        else:
            self.host.set_intx_disable(intx_off)

    # --- lifecycle ------------------------------------------------------------------------
    def reset(self) -> None:
        """VM reset (and a guest FLR): acrn-dm's deinit + init of the function."""
        super().reset()
        if self._pm is not None:
            self._power_state = self.cfg.get16(self._pm + PMCSR) & PMCSR_POWER_STATE
        self._interrupts_off()
        reassign = self.hv_owned and self._assigned
        if reassign:
            self._unassign()
        self._reset_host()
        self._interrupts_off()  # again: a function reset leaves the MSI mask bits clear
        if reassign:
            self._assign()
        if not self.hv_owned:
            self._forward_command()

    def _interrupts_off(self) -> None:
        """Our MSI emulation back to power-on: every vector masked, MSI off, no routes."""
        if self.vmsix is not None:
            self.vmsix.reset()
        if self.ptmsi is not None:
            self.ptmsi.reset()

    def _reset_host(self) -> None:
        """The physical function to its power-on state, as the options ask (acrn-dm's
        ``reset`` and ``d3hot_reset``)."""
        if "no_reset" not in self.opts.flags and self.host.can_reset:
            self.host.reset()
        if "d3hot_reset" in self.opts.flags:
            self.host.d3hot_reset()

    def _unassign(self) -> None:
        try:
            if self.intx_assignment is not None:
                self.service.reset_ptdev_intr(self.intx_assignment)
            if self.assignment is not None:
                self.service.deassign_pcidev(self.assignment)
        except Exception as e:
            log.warning("passthru %s: DEASSIGN failed: %s", self.host.name, e)
        self._assigned = False

    def close(self) -> None:
        try:
            if self._assigned:
                self._unassign()
            if self.vmsix is not None:
                self.vmsix.close()
            if self.ptmsi is not None:
                self.ptmsi.close()
            if not self.hv_owned:
                phys = self.host.config_read(pc.COMMAND, 2)
                self.host.config_write(pc.COMMAND, 2, (phys & ~CMD_FORWARDED)
                                       | (self._found_command & CMD_FORWARDED))
            if "no_reset" not in self.opts.flags and self.host.can_reset:
                self.host.reset()
        finally:
            self.host.close()


def check_options(slot: SlotConfig, options: str) -> object:
    """The validator's check: the options, and a synthetic device built (it is pure data),
    a real one's BDF parsed but not opened."""
    opts = PassthruOptions(options, slot.slot_text)
    if opts.phys_bdf is None:
        return parse_sim_spec(opts.device, 0xFE00 | slot.dev << 3 | slot.func)
    return opts


def create(ctx: DeviceContext, slot: SlotConfig, options: str) -> Passthru:
    """``-s <slot>,passthru,<bdf>[,options]``."""
    opts = PassthruOptions(options, slot.slot_text)
    host = open_host(opts, slot, ctx)
    try:
        return Passthru(ctx, slot, host, opts)
    except BaseException:
        host.close()
        raise


__all__ = ["Passthru", "PassthruOptions", "parse_bdf"]
