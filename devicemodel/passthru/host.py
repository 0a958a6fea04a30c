"""The physical side of a passthrough device: what the device model may do to it.

``HostPciDevice`` is the narrow interface the passthrough emulation needs: config space
reads and writes, the BAR resources, a function reset, MSI programming done the way a
device driver does it (through the MSI capability registers: ``HostMsi``), and a way for
the device's interrupt messages to leave it (``connect_interrupts``: every message the
device sends is a memory write of (address, data) that the platform's interrupt
remapping turns into a guest interrupt, or a per-message eventfd for VFIO).

Two implementations: ``vfio.SysfsHostDevice`` for real hardware, and ``SimHostDevice``
here, a synthetic MSI-only device that keeps the PCI rules for multi-message MSI with
per-vector masking (pending bits latch while masked, the message goes out on unmask, the
message number is OR-ed into the low data bits), so the vMSI-X emulation can be tested
and tried without the hardware.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from ..pci import caps as pcaps
from ..pci import config as pc

#: a message the device sends: a memory write of ``data`` to ``address``
MessageSink = Callable[[int, int], None]

BarKind = Literal["io", "mem32", "mem64"]

_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class PassthroughError(ConfigError):
    """A passthrough device that cannot be used; the message names the device and the fix."""


@dataclass(frozen=True)
class HostBar:
    """One implemented BAR of the physical device (a 64-bit BAR covers index and index+1)."""

    index: int
    kind: BarKind
    base: int
    size: int
    prefetchable: bool = False

    @property
    def slots(self) -> tuple[int, ...]:
        return (self.index, self.index + 1) if self.kind == "mem64" else (self.index,)


@dataclass(frozen=True)
class MsiState:
    """Everything a driver may have programmed in an MSI capability (to restore it)."""

    control: int
    address: int
    data: int
    mask: int


class HostPciDevice(ABC):
    """A physical PCI function as the device model sees it."""

    #: "0000:bb:dd.f" for real devices
    name: str = "?"
    #: bus << 8 | dev << 3 | func, as ASSIGN_PCIDEV wants it
    phys_bdf: int = 0

    @abstractmethod
    def config_read(self, off: int, size: int) -> int: ...

    @abstractmethod
    def config_write(self, off: int, size: int, value: int) -> None: ...

    @property
    def config_size(self) -> int:
        return pc.STD_SIZE

    @property
    def drives_hardware(self) -> bool:
        """True when writes reach a real device (not a simulation, not a preview)."""
        return False

    @abstractmethod
    def bars(self) -> list[HostBar]: ...

    def bar_read(self, index: int, offset: int, size: int) -> int:
        """A read of the device's registers behind BAR ``index`` (all-ones if unreachable)."""
        return _ONES.get(size, 0xFFFF_FFFF)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        """A write to the device's registers behind BAR ``index`` (dropped if unreachable)."""

    @abstractmethod
    def reset(self) -> bool:
        """Function-level reset; False when the device offers none."""

    @property
    def can_reset(self) -> bool:
        return True

    def legacy_irq(self) -> int:
        """The host IRQ of the device's INTx pin (SET_PTDEV_INTR's phys_pin): the INTLINE
        register, as acrn-dm reads it (``irq=<n>`` overrides it)."""
        return self.config_read(pc.INT_LINE, 1)

    def connect_interrupts(self, sink: MessageSink | None) -> None:
        """Where the device's MSI writes go (the platform's interrupt remapping)."""

    def message_eventfds(self, fds: list[int] | None) -> None:
        """Signal eventfd k when message k is raised (VFIO's way); None stops it."""
        raise PassthroughError(f"passthru {self.name}: no per-message eventfds on this device")

    def close(self) -> None:
        """Release host resources (file descriptors, VFIO group)."""

    # --- driver-like helpers over config space --------------------------------------------
    def snapshot(self) -> bytes:
        """The config space as dword reads return it."""
        return b"".join(
            self.config_read(off, 4).to_bytes(4, "little")
            for off in range(0, self.config_size, 4)
        )

    def capabilities(self) -> list[pcaps.Capability]:
        """The standard capability chain, parsed (hardware is input: malformed → error)."""
        try:
            return pcaps.walk(self.snapshot()[: pc.STD_SIZE])
        except pcaps.CapabilityError as e:
            raise PassthroughError(f"passthru {self.name}: capability list: {e}") from None

    def find_capability(self, cap_id: int) -> pcaps.Capability | None:
        for cap in self.capabilities():
            if cap.cap_id == cap_id:
                return cap
        return None

    @property
    def msi(self) -> HostMsi | None:
        cap = self.find_capability(pcaps.CAP_ID_MSI)
        return None if cap is None else HostMsi(self, cap.offset)

    def set_intx_disable(self, disabled: bool) -> None:
        cmd = self.config_read(pc.COMMAND, 2)
        new = (cmd | pc.CMD_INTX_DISABLE) if disabled else (cmd & ~pc.CMD_INTX_DISABLE)
        if new != cmd:
            self.config_write(pc.COMMAND, 2, new)

    def d3hot_reset(self) -> bool:
        """Reset through the power-management capability: D3hot, then back to D0."""
        cap = self.find_capability(pcaps.CAP_ID_PM)
        if cap is None:
            return False
        pmcsr = self.config_read(cap.offset + 4, 2)
        self.config_write(cap.offset + 4, 2, (pmcsr & ~0x3) | 0x3)
        self.config_write(cap.offset + 4, 2, pmcsr & ~0x3)
        return True


class HostMsi:
    """A physical MSI capability, programmed as a device driver programs it."""

    #: False: we write the capability (sim backend); True: the host kernel does (VFIO)
    kernel_owned = False

    def __init__(self, host: HostPciDevice, offset: int) -> None:
        self.host = host
        self.offset = offset
        ctrl = host.config_read(offset + 2, 2)
        self.is64 = bool(ctrl & pcaps.MSI_CTRL_64BIT)
        self.maskable = bool(ctrl & pcaps.MSI_CTRL_PVM)
        #: log2 of the messages the device can send (Multiple Message Capable)
        self.mmc = min((ctrl >> pcaps.MSI_CTRL_MMC_SHIFT) & 0x7, 5)
        self.regs = pcaps.msi_offsets(ctrl)

    @property
    def count(self) -> int:
        return 1 << self.mmc

    def bind(self, routes: object) -> None:
        """The emulation's interrupt routes (used when the kernel owns the MSI)."""

    @property
    def control(self) -> int:
        return self.host.config_read(self.offset + 2, 2)

    def write_control(self, value: int) -> None:
        self.host.config_write(self.offset + 2, 2, value)

    def enable(self, mme: int) -> None:
        """Enable with 2**mme messages (MME), as pci_enable_msi does after programming."""
        ctrl = self.control & ~(pcaps.MSI_CTRL_MME_MASK | pcaps.MSI_CTRL_ENABLE)
        self.write_control(ctrl | ((mme & 7) << pcaps.MSI_CTRL_MME_SHIFT))
        self.write_control(ctrl | ((mme & 7) << pcaps.MSI_CTRL_MME_SHIFT)
                           | pcaps.MSI_CTRL_ENABLE)

    def disable(self) -> None:
        self.write_control(self.control & ~(pcaps.MSI_CTRL_MME_MASK | pcaps.MSI_CTRL_ENABLE))

    @property
    def enabled(self) -> bool:
        return bool(self.control & pcaps.MSI_CTRL_ENABLE)

    def program(self, address: int, data: int) -> None:
        self.host.config_write(self.offset + 4, 4, address & 0xFFFF_FFFF)
        if self.regs.addr_hi is not None:
            self.host.config_write(self.offset + self.regs.addr_hi, 4, address >> 32)
        self.host.config_write(self.offset + self.regs.data, 2, data & 0xFFFF)

    def message(self) -> tuple[int, int]:
        address = self.host.config_read(self.offset + 4, 4)
        if self.regs.addr_hi is not None:
            address |= self.host.config_read(self.offset + self.regs.addr_hi, 4) << 32
        return address, self.host.config_read(self.offset + self.regs.data, 2)

    @property
    def mask(self) -> int:
        if self.regs.mask is None:
            return 0
        return self.host.config_read(self.offset + self.regs.mask, 4)

    def set_mask(self, value: int) -> None:
        if self.regs.mask is not None:
            self.host.config_write(self.offset + self.regs.mask, 4, value & 0xFFFF_FFFF)

    @property
    def pending(self) -> int:
        if self.regs.pending is None:
            return 0
        return self.host.config_read(self.offset + self.regs.pending, 4)

    def save(self) -> MsiState:
        address, data = self.message()
        return MsiState(self.control, address, data, self.mask)

    def restore(self, state: MsiState) -> None:
        """Back to a saved state: disabled first, then the registers, then the control."""
        self.disable()
        self.program(state.address, state.data)
        self.set_mask(state.mask)
        self.write_control(state.control)


# --- the synthetic device ----------------------------------------------------------------
SIM_VENDOR = 0x1B36  # Red Hat / QEMU: used by emulated test devices
SIM_DEVICE = 0x0005  # "QEMU PCI test device"
SIM_CLASS = 0xFF0000  # unassigned class
SIM_BAR0_BASE = 0xFEB0_0000
SIM_BAR0_SIZE = 0x1000
#: BAR0 register: writing k makes the device raise message k (a doorbell a test guest can use)
SIM_REG_FIRE = 0x0
SIM_PM_OFF = 0x40
SIM_MSI_OFF = 0x50
SIM_VENDOR_CAP_OFF = 0x68
SIM_MSIX_OFF = 0x70
SIM_PCIE_OFF = 0x80
#: Device Capabilities bit 28: Function Level Reset Capability
PCIE_DEVCAP_FLR = 1 << 28
#: Device Control bit 15: Initiate Function Level Reset (reads 0)
PCIE_DEVCTL_FLR = 1 << 15
#: offsets inside the PCI Express capability
PCIE_DEVCAP = 4
PCIE_DEVCTL = 8

SIM_FEATURES = ("nomask", "32bit", "msix", "nomsi", "allbars", "flr", "igd")
#: ``igd``: an Intel integrated GPU (TGL GT2, gen 12) at host 00:02.0, with 64 MiB of
#: stolen memory (BDSM) and an OpRegion (ASLS), and the host LPC bridge it pairs with
SIM_IGD_DEVICE, SIM_IGD_GGC, SIM_IGD_BDSM, SIM_IGD_ASLS = 0x9A49, 0x0200, 0x7B00_0001, \
    0x7AFF_0000
SIM_IGD_LPC = bytes.fromhex("868082a0") + bytes(4) + bytes([0x20, 0, 1, 6]) + bytes(0x20) + \
    bytes.fromhex("86807072")


class SimHostDevice(HostPciDevice):
    """A synthetic MSI-only function that behaves like PCI hardware.

    Layout: BAR0 = 4 KiB MEM32 of registers (offset 0: write k → raise message k), PM
    capability at 0x40, MSI (64-bit, per-vector mask, MMC = log2(vectors)) at 0x50, a
    vendor capability at 0x68 (so the MSI capability has a next pointer to keep).
    ``features`` make the ineligible variants: ``nomask`` (no per-vector masking),
    ``32bit``, ``msix`` (an MSI-X capability too), ``nomsi``, ``allbars`` (all six BARs
    implemented); ``flr`` adds a PCI Express capability (at 0x80) whose Device
    Capabilities offer Function Level Reset.
    """

    def __init__(self, vectors: int = 4, *, bdf: int = 0xFE00,
                 features: tuple[str, ...] = ()) -> None:
        unknown = [f for f in features if f not in SIM_FEATURES]
        if unknown:
            raise PassthroughError(
                f"passthru sim: unknown feature {unknown[0]!r}; known: {', '.join(SIM_FEATURES)}"
            )
        if vectors < 1 or vectors > 32 or vectors & (vectors - 1):
            raise PassthroughError(
                f"passthru sim:{vectors}: the vector count must be a power of two in 1..32"
            )
        if "flr" in features and "igd" in features:
            # a GPU's BDSM (0xC0) and ASLS (0xFC) leave no room for a PCI Express capability
            raise PassthroughError("passthru sim: 'flr' and 'igd' cannot be combined; "
                                   "drop one of them")
        self.vectors = vectors
        self.features = tuple(features)
        self.phys_bdf = 0x0010 if "igd" in features else bdf & 0xFFFF
        bdf = self.phys_bdf
        #: the host LPC bridge's config space an Intel GPU's igd-lpc copies (igd only)
        self.lpc_config: bytes | None = SIM_IGD_LPC if "igd" in features else None
        self.name = f"0000:{bdf >> 8:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7}"
        self._sink: MessageSink | None = None
        self._eventfds: list[int] | None = None
        #: the host kernel's copy of the MSI mask word while VFIO owns the MSI
        self.kernel_mask = 0
        #: what happened, for tests: messages sent, INTx assertions, resets, lost messages
        self.sent: list[tuple[int, int]] = []
        self.intx_asserts = 0
        self.resets = 0
        self.lost = 0
        self.bar0 = bytearray(SIM_BAR0_SIZE)
        self._build()

    # --- power-on state -------------------------------------------------------------------
    def _build(self) -> None:
        cs = pc.ConfigSpace(extended=False)
        cs.set_ids(SIM_VENDOR, SIM_DEVICE, SIM_CLASS, revision=1,
                   subsys_vendor=SIM_VENDOR, subsys_id=0x1100)
        cs.set_wmask(pc.COMMAND, 2, pc.CMD_IO | pc.CMD_MEM | pc.CMD_MASTER
                     | pc.CMD_INTX_DISABLE)
        if "igd" in self.features:
            cs.set_ids(0x8086, SIM_IGD_DEVICE, 0x030000, revision=1, subsys_vendor=0x8086,
                       subsys_id=0x2212)
            cs.set16(0x50, SIM_IGD_GGC)
            cs.set32(0xC0, SIM_IGD_BDSM)
            cs.set32(0xFC, SIM_IGD_ASLS)
        cs.set8(pc.INT_PIN, 1)
        cs.set8(pc.INT_LINE, 11)  # the host IRQ of its INTx pin
        self._bar_list = [HostBar(0, "mem32", SIM_BAR0_BASE, SIM_BAR0_SIZE)]
        if "allbars" in self.features:
            self._bar_list += [HostBar(i, "mem32", SIM_BAR0_BASE + i * SIM_BAR0_SIZE,
                                       SIM_BAR0_SIZE) for i in range(1, 6)]
        for bar in self._bar_list:
            cs.set32(pc.BAR0 + 4 * bar.index, bar.base)
        chain: list[tuple[int, bytes, bytes]] = []
        shift = 0x40 if "igd" in self.features else 0  # a GPU's GGC register is at 0x50
        pm = pcaps.pm_cap()
        chain.append((SIM_PM_OFF + shift, pm.data, pm.wmask))
        if "nomsi" not in self.features:
            msi = pcaps.msi_cap(self.vectors, bit64="32bit" not in self.features,
                                maskable="nomask" not in self.features)
            chain.append((SIM_MSI_OFF + shift, msi.data, msi.wmask))
        chain.append((SIM_VENDOR_CAP_OFF + shift, bytes([pcaps.CAP_ID_VENDOR, 0, 8, 0x53, 0x49,
                                                         0x4D, 0, 0]), bytes(8)))
        if "msix" in self.features:
            msix = pcaps.msix_cap(self.vectors, bir=0, table_offset=0x800)
            chain.append((SIM_MSIX_OFF + shift, msix.data, msix.wmask))
        if "flr" in self.features:
            pcie = pcaps.pcie_cap(dev_caps=PCIE_DEVCAP_FLR)
            chain.append((SIM_PCIE_OFF, pcie.data, pcie.wmask))
        cs.set8(pc.CAP_PTR, chain[0][0])
        cs.set_status_bits(pc.STATUS_CAP_LIST, True)
        for i, (off, data, wmask) in enumerate(chain):
            cs.set_bytes(off, data)
            cs.wmask[off : off + len(wmask)] = wmask
            cs.set8(off + 1, chain[i + 1][0] if i + 1 < len(chain) else 0)
            cs.wmask[off] = cs.wmask[off + 1] = 0
        self.cs = cs
        self._held = 0
        self._msi = SIM_MSI_OFF + shift if "nomsi" not in self.features else None

    # --- HostPciDevice ----------------------------------------------------------------------
    def config_read(self, off: int, size: int) -> int:
        if size not in (1, 2, 4) or off < 0 or off + size > pc.STD_SIZE:
            return _ONES.get(size, 0xFFFF_FFFF)
        return self.cs.get(off, size)

    def config_write(self, off: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or off < 0 or off + size > pc.STD_SIZE:
            return
        self.cs.write(off, size, value)
        # an unmask, an enable or bus mastering turned on lets held messages go out
        if self._msi is not None and self._enabled():
            for k in range(self._allocated()):
                self._flush(k)

    def bars(self) -> list[HostBar]:
        return list(self._bar_list)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index != 0 or size not in (1, 2, 4, 8) or not 0 <= offset <= SIM_BAR0_SIZE - size:
            return _ONES.get(size, 0xFFFF_FFFF)
        return int.from_bytes(self.bar0[offset : offset + size], "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != 0 or size not in (1, 2, 4, 8) or not 0 <= offset <= SIM_BAR0_SIZE - size:
            return
        if offset == SIM_REG_FIRE:
            if value < self.vectors:  # the doorbell ignores sources the device lacks
                self.fire(value)
            return
        self.bar0[offset : offset + size] = (value & _ONES[size]).to_bytes(size, "little")

    def reset(self) -> bool:
        """A function reset: back to power-on (pending messages are forgotten); the
        per-message eventfds VFIO gave it stay (the kernel restores MSI after a reset)."""
        self.resets += 1
        self.bar0 = bytearray(SIM_BAR0_SIZE)
        self._build()
        if self._eventfds is not None and self._msi is not None:
            self._kernel_msi(True)  # the kernel restores its MSI state after a reset
        return True

    def connect_interrupts(self, sink: MessageSink | None) -> None:
        self._sink = sink

    def message_eventfds(self, fds: list[int] | None) -> None:
        """What VFIO_DEVICE_SET_IRQS does to a real device: the host kernel enables MSI
        for ``len(fds)`` messages, programs its own message, unmasks them (request_irq)
        and disables INTx; ``None`` masks, disables MSI and gives INTx back. The kernel's
        copy of the mask word is ``kernel_mask`` (Linux writes it back whole)."""
        self._eventfds = list(fds) if fds is not None else None
        if self._msi is not None:
            self._kernel_msi(fds is not None)

    def _kernel_msi(self, on: bool) -> None:
        assert self._msi is not None
        off = self._msi
        ctrl = self.cs.get16(off + 2) & ~(pcaps.MSI_CTRL_MME_MASK | pcaps.MSI_CTRL_ENABLE)
        regs = self._regs()
        n = len(self._eventfds or ())
        mme = max(0, (n - 1).bit_length()) if on else 0
        self.kernel_mask = 0 if on else (1 << self.vectors) - 1
        if regs.mask is not None:
            self.cs.set32(off + regs.mask, self.kernel_mask)
        if on:
            self.cs.set32(off + 4, 0xFEE0_0000)  # the host's own vector, not the guest's
            self.cs.set16(off + regs.data, 0)
            self.cs.set16(off + 2, ctrl | mme << pcaps.MSI_CTRL_MME_SHIFT
                          | pcaps.MSI_CTRL_ENABLE)
        else:
            self.cs.set16(off + 2, ctrl)
        cmd = self.cs.command
        self.cs.set16(pc.COMMAND, (cmd | pc.CMD_INTX_DISABLE) if on
                      else (cmd & ~pc.CMD_INTX_DISABLE))

    # --- the device's interrupt logic ---------------------------------------------------------
    def fire(self, k: int) -> None:
        """The device raises message ``k`` (its k-th interrupt source)."""
        if not 0 <= k < self.vectors:
            raise ValueError(f"message {k} outside 0..{self.vectors - 1}")
        if self._msi is None or not self._enabled():
            if not self.cs.command & pc.CMD_INTX_DISABLE:
                self.cs.set_status_bits(pc.STATUS_INTX, True)
                self.intx_asserts += 1
            else:
                self.lost += 1
            return
        # with fewer messages allocated than sources, sources share the low messages
        k &= self._allocated() - 1
        self._set_pending(k, True)
        self._flush(k)

    def _enabled(self) -> bool:
        assert self._msi is not None
        return bool(self.cs.get16(self._msi + 2) & pcaps.MSI_CTRL_ENABLE)

    def _allocated(self) -> int:
        assert self._msi is not None
        ctrl = self.cs.get16(self._msi + 2)
        mme = min((ctrl & pcaps.MSI_CTRL_MME_MASK) >> pcaps.MSI_CTRL_MME_SHIFT,
                  (ctrl >> pcaps.MSI_CTRL_MMC_SHIFT) & 7)
        return 1 << mme

    def _regs(self) -> pcaps.MsiOffsets:
        assert self._msi is not None
        return pcaps.msi_offsets(self.cs.get16(self._msi + 2))

    def _reg_mask(self) -> int:
        if self._msi is None:
            return 0
        regs = self._regs()
        return 0 if regs.mask is None else self.cs.get32(self._msi + regs.mask)

    def _set_pending(self, k: int, on: bool) -> None:
        assert self._msi is not None
        regs = self._regs()
        if regs.pending is None:  # no pending register: the latch is internal
            self._held = (self._held | 1 << k) if on else (self._held & ~(1 << k))
            return
        cur = self.cs.get32(self._msi + regs.pending)
        self.cs.set32(self._msi + regs.pending, (cur | 1 << k) if on else (cur & ~(1 << k)))

    def _is_pending(self, k: int) -> bool:
        assert self._msi is not None
        regs = self._regs()
        if regs.pending is None:
            return bool(self._held >> k & 1)
        return bool(self.cs.get32(self._msi + regs.pending) >> k & 1)

    def _flush(self, k: int) -> None:
        """Send message k if it is pending and may go out (enabled, unmasked, bus master)."""
        if (
            self._msi is None
            or not self._is_pending(k)
            or not self._enabled()
            or k >= self._allocated()
            or self._reg_mask() >> k & 1
        ):
            return
        if not self.cs.command & pc.CMD_MASTER:
            return  # a function that may not master the bus holds its message
        self._set_pending(k, False)
        regs = self._regs()
        address = self.cs.get32(self._msi + 4)
        if regs.addr_hi is not None:
            address |= self.cs.get32(self._msi + regs.addr_hi) << 32
        data = self.cs.get16(self._msi + regs.data)
        data = (data & ~(self._allocated() - 1)) | k
        self.sent.append((address, data))
        if self._eventfds is not None:
            if k < len(self._eventfds):
                os.eventfd_write(self._eventfds[k], 1)
            return
        if self._sink is None:
            self.lost += 1
            return
        self._sink(address, data)


def parse_sim_spec(spec: str, bdf: int) -> SimHostDevice:
    """``sim:<vectors>[:<feature>...]`` → a SimHostDevice."""
    parts = spec.split(":")
    if len(parts) < 2 or not (parts[1].isascii() and parts[1].isdigit()):
        raise PassthroughError(
            f"passthru {spec}: write sim:<vectors>, e.g. sim:4 (vectors a power of two 1..32)"
        )
    return SimHostDevice(int(parts[1]), bdf=bdf, features=tuple(parts[2:]))


__all__ = [
    "PCIE_DEVCAP", "PCIE_DEVCAP_FLR", "PCIE_DEVCTL", "PCIE_DEVCTL_FLR", "HostBar", "HostMsi",
    "HostPciDevice", "MessageSink", "MsiState", "PassthroughError", "SimHostDevice",
    "parse_sim_spec",
]
