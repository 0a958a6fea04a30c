"""PciDevice: the base every emulated PCI function (and passthrough) subclasses.

How to write a device
---------------------
::

    class MyDev(PciDevice):
        name = "mydev"

        def __init__(self, ctx, slot):
            super().__init__(ctx, slot)
            self.cfg.set_ids(0x1AF4, 0x1041, 0x020000, subsys_vendor=0x1AF4, subsys_id=1)
            self.add_bar(0, BarKind.IO, 0x40, read=self.io_read, write=self.io_write)
            self.add_bar(4, BarKind.MEM64, 0x4000, read=self.mmio_read, write=self.mmio_write)
            self.add_msix(8, bar=1)          # declares BAR1 (table + PBA) itself
            self.add_msi(4)                  # or MSI: 64-bit, per-vector masking
            self.add_capability(caps.virtio_cap(caps.VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x38))
            self.request_intx()              # INTx pin/GSI are assigned by the bus

        def io_read(self, offset: int, size: int) -> int: ...
        def io_write(self, offset: int, size: int, value: int) -> None: ...

* **BARs** are declared with ``add_bar(idx, kind, size, read=, write=)``; the bus
  allocates them with acrn-dm's pools and rules when the VM is built (declaration order
  is allocation order, as in acrn-dm), and (re)registers them on the port/MMIO buses as
  the guest writes BARs and the command register. Handlers get the offset inside the
  BAR. 8-byte MMIO accesses are split into two 4-byte calls (low half first) as acrn-dm
  does, unless ``wide=True``: then the handler gets the 8-byte access whole.
  ``on_bar_map(bar, base)`` / ``on_bar_unmap(bar, base)`` tell a device where a BAR
  lives now (re-register ioeventfds there). ``trap=False`` declares a BAR the device
  model must not register (the hypervisor maps it, passthrough).
* **Capabilities**: ``add_capability(caps.xxx_cap(...))`` appends to the chain from 0x40;
  ``add_msi``, ``add_msix``, ``add_pcie``, ``add_pm`` wrap the common ones.
  ``watch_config(offset, length, on_write=, on_read=)`` gets a callback after a guest
  write into (or before a guest read from) a config range, e.g. the virtio PCI_CFG window.
  Override ``cfg_read`` / ``cfg_write`` (and call super) to take over config space.
* **Interrupts**: ``send_interrupt(vector)`` picks MSI-X, else MSI, else INTx (assert);
  or use ``self.msix.send(i)`` / ``self.msi.send(i)`` / ``self.intx.assert_()`` and
  ``deassert()`` directly. Masked MSI-X/MSI vectors are held pending and delivered on
  unmask. Delivery is the interrupt layer's (``devicemodel.irq``): safe from any thread.
  ``add_msix(n, bar, irqfd=True)`` asks for irqfd-backed vectors where the backend has
  eventfds (the bus wires them).
* **Doorbells**: ``declare_ioevent(IoEvent(bar, offset, length, fd, datamatch))`` for
  each ioeventfd the device wants; ``arm_ioevents(True)`` once the driver started it,
  ``False`` at reset. The bus registers them at the BARs' current addresses.
* ``reset()`` restores the power-on config space and BAR placement (call super);
  ``run()`` is the device's task; ``close()`` releases host resources (call super).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..irq.delivery import InjectDelivery
from ..irq.intx import Intx
from ..irq.services import Line, MsiSink
from . import caps
from . import config as pc
from .config import ConfigSpace
from .msi import Msi
from .msix import Msix, VectorSignal, bar_size_for

if TYPE_CHECKING:
    from ..context import DeviceContext
    from ..slot import SlotConfig

log = logging.getLogger(__name__)

_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
Reader = Callable[[int, int], int]
Writer = Callable[[int, int, int], None]


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


BAR_IO_SPACE = 0x1
BAR_MEM_64 = 0x4
BAR_MEM_PREFETCH = 0x8


@dataclass(eq=False)
class Bar:
    """One BAR: its declaration, its current guest address and where it is registered.

    It is also the handler registered on the port/MMIO bus (``read``/``write`` take the
    offset inside the BAR).
    """

    idx: int
    kind: BarKind
    size: int
    reader: Reader | None = None
    writer: Writer | None = None
    wide: bool = False
    trap: bool = True
    #: guest address the bus must use instead of allocating (identity-mapped PIO)
    fixed: int | None = None
    #: None: acrn-dm's rule (prefetchable iff placed in the 64-bit window)
    prefetchable: bool | None = None
    addr: int = 0
    #: sizing state of the low and high BAR dwords (acrn-facts §3.4)
    sizing: list[bool] = field(default_factory=lambda: [False, False])
    #: base the handler is registered at now, None when unregistered
    mapped_at: int | None = None
    owner: Any = None
    #: which accesses may be answered on a request thread behind the loop gate
    #: (``bus.py``): ``(offset, size, write) -> bool``; None: none, all go to the loop
    vcpu_safe_access: Callable[[int, int, bool], bool] | None = None

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    def low_bits(self) -> int:
        if self.kind is BarKind.IO:
            return BAR_IO_SPACE
        bits = BAR_MEM_64 if self.kind is BarKind.MEM64 else 0
        return bits | (BAR_MEM_PREFETCH if self.prefetchable else 0)

    def read(self, offset: int, size: int) -> int:
        r = self.reader
        if r is None:
            return _ONES.get(size, 0xFFFF_FFFF)
        if size == 8 and not self.wide:
            lo = r(offset, 4) & 0xFFFF_FFFF
            hi = r(offset + 4, 4) & 0xFFFF_FFFF
            return lo | (hi << 32)
        return r(offset, size) & _ONES.get(size, 0xFFFF_FFFF_FFFF_FFFF)

    def write(self, offset: int, size: int, value: int) -> None:
        w = self.writer
        if w is None:
            return
        if size == 8 and not self.wide:
            w(offset, 4, value & 0xFFFF_FFFF)
            w(offset + 4, 4, (value >> 32) & 0xFFFF_FFFF)
            return
        w(offset, size, value & _ONES.get(size, 0xFFFF_FFFF_FFFF_FFFF))


@dataclass(frozen=True)
class IoEvent:
    """A doorbell: a guest write of ``length`` bytes at ``offset`` in BAR ``bar`` (with
    value ``datamatch``, or any value when None) signals ``fd``."""

    bar: int
    offset: int
    length: int
    fd: int
    datamatch: int | None = None


class BarMapping(Protocol):
    """What the bus offers a device: (un)register a BAR at its current address, and
    follow the device's armed doorbells with ioeventfds."""

    def set_mapping(self, dev: PciDevice, bar: Bar, want: bool) -> None: ...

    def ioevents_changed(self, dev: PciDevice) -> None: ...


@dataclass
class _Watch:
    start: int
    end: int
    on_write: Callable[[int, int], None] | None
    on_read: Callable[[int, int], None] | None
    vcpu_safe: bool = False


class PciDevice:
    """A PCI function backed by a ConfigSpace. See the module docstring."""

    name = "pci-device"
    #: allocate this function's BARs before everybody else's (passthrough, acrn-dm order)
    allocate_first = False
    #: config accesses may be answered on a request thread behind the loop gate
    #: (``loopgate.py``): the base class's config space, BAR (re)registration, MSI,
    #: MSI-X and INTx never call trio nor block. A subclass that overrides ``cfg_read``
    #: or ``cfg_write`` with anything else sets it False; ``watch_config`` callbacks are
    #: served on the loop unless registered ``vcpu_safe``.
    config_vcpu_safe = True

    def __init__(self, ctx: DeviceContext | None = None, slot: SlotConfig | None = None, *,
                 extended_config: bool = False) -> None:
        self.ctx = ctx
        self.slot = slot
        self.bdf: tuple[int, int, int] | None = (
            (slot.bus, slot.dev, slot.func) if slot is not None else None
        )
        self.cfg = ConfigSpace(extended=extended_config)
        self.bars: list[Bar] = []
        self._bar_dword: list[tuple[Bar, int] | None] = [None] * 6
        self._watches: list[_Watch] = []
        self.msi: Msi | None = None
        self.msix: Msix | None = None
        self.intx: Intx | None = None
        self.mapper: BarMapping | None = None
        self.ioevents: list[IoEvent] = []
        self.ioevents_armed = False
        self._power_on: tuple[bytes, list[int]] | None = None
        # acrn-dm's defaults for a new function: no legacy interrupt, decoding on
        self.cfg.set8(pc.INT_LINE, 0xFF)
        self.cfg.set8(pc.INT_PIN, 0)
        self.cfg.set16(pc.COMMAND, pc.CMD_IO | pc.CMD_MEM | pc.CMD_MASTER)

    # --- declarations -----------------------------------------------------------------
    def add_bar(self, idx: int, kind: BarKind, size: int, *, read: Reader | None = None,
                write: Writer | None = None, wide: bool = False, trap: bool = True,
                fixed: int | None = None, prefetchable: bool | None = None,
                vcpu_safe_access: Callable[[int, int, bool], bool] | None = None) -> Bar:
        """Declare BAR ``idx``; ``size`` is rounded up to a power of two (min 4 for I/O,
        16 for memory). A MEM64 BAR also takes dword ``idx + 1``."""
        if not 0 <= idx <= 5 or (kind is BarKind.MEM64 and idx == 5):
            raise ValueError(f"{self.name}: BAR index {idx} invalid for {kind.value}")
        used = [idx, idx + 1] if kind is BarKind.MEM64 else [idx]
        if any(self._bar_dword[i] is not None for i in used):
            raise ValueError(f"{self.name}: BAR {idx} declared twice")
        size = max(size, 4 if kind is BarKind.IO else 16)
        size = 1 << (size - 1).bit_length()
        bar = Bar(idx, kind, size, read, write, wide=wide, trap=trap, fixed=fixed,
                  prefetchable=prefetchable, owner=self, vcpu_safe_access=vcpu_safe_access)
        self.bars.append(bar)
        self._bar_dword[idx] = (bar, 0)
        if kind is BarKind.MEM64:
            self._bar_dword[idx + 1] = (bar, 1)
        return bar

    def bar(self, idx: int) -> Bar | None:
        slot = self._bar_dword[idx] if 0 <= idx <= 5 else None
        return slot[0] if slot is not None and slot[1] == 0 else None

    def place_bar(self, bar: Bar, addr: int, prefetchable: bool) -> None:
        """Set a BAR's address and register value (the bus does this when allocating)."""
        bar.addr = addr
        if bar.prefetchable is None:
            bar.prefetchable = prefetchable
        reg = pc.BAR0 + 4 * bar.idx
        if bar.kind is BarKind.IO:
            self.cfg.set32(reg, (addr & 0xFFFF_FFFC) | BAR_IO_SPACE)
        else:
            self.cfg.set32(reg, (addr & 0xFFFF_FFF0) | bar.low_bits())
            if bar.kind is BarKind.MEM64:
                self.cfg.set32(reg + 4, addr >> 32)

    def add_capability(self, cap: caps.CapBytes) -> int:
        return caps.add_capability(self.cfg, cap)

    def add_msi(self, vectors: int, *, bit64: bool = True, maskable: bool = True) -> Msi:
        off = self.add_capability(caps.msi_cap(vectors, bit64=bit64, maskable=maskable))
        self.msi = Msi(self.cfg, off, self._irq_sink(), on_change=self._irq_mode_changed)
        self.watch_config(off, self.msi.length, on_write=self.msi.config_written,
                          vcpu_safe=True)
        return self.msi

    def add_msix(self, vectors: int, bar: int, *, irqfd: bool = False) -> Msix:
        """MSI-X with acrn-dm's layout: table at 0 and PBA after it, in MEM32 BAR ``bar``.
        ``irqfd``: back the vectors with irqfds where the backend has eventfds."""
        off = self.add_capability(caps.msix_cap(vectors, bar))
        msix = Msix(self.cfg, off, InjectDelivery(self._irq_sink()),
                    msi_enabled=lambda: self.msi is not None and self.msi.enabled,
                    on_change=self._irq_mode_changed, irqfd=irqfd)
        self.msix = msix
        self.watch_config(off, 12, on_write=msix.config_written, vcpu_safe=True)
        self.add_bar(bar, BarKind.MEM32, bar_size_for(vectors), read=msix.read,
                     write=msix.write)
        return msix

    def add_pcie(self, port_type: int = caps.PCIE_TYPE_ENDPOINT) -> int:
        return self.add_capability(caps.pcie_cap(port_type))

    def add_pm(self) -> int:
        return self.add_capability(caps.pm_cap())

    def request_intx(self) -> Intx:
        """Ask for an INTx pin; the bus assigns pin, GSI and INTLINE when it is built."""
        if self.intx is None:
            self.intx = Intx(self._intx_permitted, self._intx_status)
        return self.intx

    def declare_ioevent(self, event: IoEvent) -> None:
        """A doorbell the bus should back with an ioeventfd while armed."""
        self.ioevents.append(event)

    def arm_ioevents(self, armed: bool) -> None:
        """The driver started the device (True) or reset it (False)."""
        if armed == self.ioevents_armed:
            return
        self.ioevents_armed = armed
        if self.mapper is not None and self.ioevents:
            self.mapper.ioevents_changed(self)

    def watch_config(self, offset: int, length: int, *,
                     on_write: Callable[[int, int], None] | None = None,
                     on_read: Callable[[int, int], None] | None = None,
                     vcpu_safe: bool = False) -> None:
        """Call back after a guest write into (before a read from) the range;
        ``vcpu_safe``: the callbacks never call trio nor block (see ``config_vcpu_safe``)."""
        self._watches.append(_Watch(offset, offset + length, on_write, on_read, vcpu_safe))

    def config_access_vcpu_safe(self, reg: int, size: int, write: bool) -> bool:
        """Whether this config access may be served behind the loop gate."""
        if not self.config_vcpu_safe:
            return False
        for w in self._watches:
            if not w.vcpu_safe and reg < w.end and reg + size > w.start \
                    and (w.on_write if write else w.on_read) is not None:
                return False
        return True

    # --- interrupts -------------------------------------------------------------------
    def _irq_sink(self) -> MsiSink:
        if self.ctx is None:
            raise RuntimeError(f"{self.name}: MSI needs a device context")
        return self.ctx.msi

    def _intx_permitted(self) -> bool:
        if self.cfg.command & pc.CMD_INTX_DISABLE:
            return False
        if self.msi is not None and self.msi.enabled:
            return False
        return not (self.msix is not None and self.cfg.get16(self.msix.offset + 2)
                    & caps.MSIX_CTRL_ENABLE)

    def _intx_status(self, on: bool) -> None:
        self.cfg.set_status_bits(pc.STATUS_INTX, on)

    def _intx_update(self) -> None:
        if self.intx is not None:
            self.intx.update()

    def _irq_mode_changed(self) -> None:
        """MSI or MSI-X enable changed: INTx and MSI-X (MSI wins over it) follow."""
        self._intx_update()
        if self.msix is not None:
            self.msix.refresh()

    def hand_interrupts_to(self, *, msix: VectorSignal | None = None,
                           msi: VectorSignal | None = None, intx: Line | None = None) -> None:
        """Serve this function to a peer that emulates its MSI-X and MSI capabilities
        itself (a vfio-user client): raised vectors go to the peer's per-vector
        eventfds (``irq.delivery.EventfdVectors``), INTx to the peer's line."""
        if msix is not None and self.msix is not None:
            self.msix.signal_through(msix)
        if msi is not None and self.msi is not None:
            self.msi.signal_through(msi)
        if intx is not None and self.intx is not None:
            self.intx.use_line(intx)

    def send_interrupt(self, vector: int = 0) -> bool:
        """Raise ``vector`` with whatever the guest enabled: MSI-X, MSI, else INTx."""
        if self.msix is not None and self.msix.enabled:
            return self.msix.send(vector)
        if self.msi is not None and self.msi.enabled:
            return self.msi.send(vector)
        if self.intx is not None:
            self.intx.assert_()
            return True
        return False

    # --- config space (what the bus calls) --------------------------------------------
    def cfg_read(self, reg: int, size: int) -> int:
        """A guest config read; size and alignment were checked by the bus."""
        for w in self._watches:
            if w.on_read is not None and reg < w.end and reg + size > w.start:
                w.on_read(reg, size)
        return self.cfg.read(reg, size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        """A guest config write; size and alignment were checked by the bus."""
        if pc.BAR0 <= reg < pc.CARDBUS_CIS:
            self._bar_write(reg, size, value)
            return
        if reg < pc.REVISION and reg + size > pc.COMMAND:
            old = self.cfg.command
            self.cfg.write(reg, size, value)
            self._command_written(old)
            return
        self.cfg.write(reg, size, value)
        for w in self._watches:
            if w.on_write is not None and reg < w.end and reg + size > w.start:
                w.on_write(reg, size)

    def decoding(self, bar: Bar) -> bool:
        return bool(self.cfg.command & (pc.CMD_IO if bar.is_io else pc.CMD_MEM))

    def _bar_write(self, reg: int, size: int, value: int) -> None:
        """acrn-dm's BAR rules: aligned 4-byte writes only; the address is
        ``value & ~(size-1)``; type bits stay. While decoding is on, the all-ones sizing
        write and the write after it do not move the registration; we then re-sync the
        registration with the address (acrn-dm leaves it stale if that write changed it)."""
        if size != 4 or reg & 3:
            return
        slot = self._bar_dword[(reg - pc.BAR0) // 4]
        if slot is None:
            return
        bar, half = slot
        decode = self.decoding(bar)
        if decode:
            if not bar.sizing[half] and value == 0xFFFF_FFFF:
                bar.sizing[half] = True
            elif bar.sizing[half] and value != 0xFFFF_FFFF:
                bar.sizing[half] = False
        mask = ~(bar.size - 1)
        if bar.kind is BarKind.IO:
            addr = value & mask & 0xFFFF
            bar.addr = addr
            self.cfg.set32(reg, addr | BAR_IO_SPACE)
        elif half == 0:
            low = value & mask & 0xFFFF_FFF0
            bar.addr = (bar.addr & ~0xFFFF_FFFF) | low if bar.kind is BarKind.MEM64 else low
            self.cfg.set32(reg, low | bar.low_bits())
        else:
            high = ((value << 32) & mask) & 0xFFFF_FFFF_0000_0000
            bar.addr = (bar.addr & 0xFFFF_FFFF) | high
            self.cfg.set32(reg, high >> 32)
        if decode and not any(bar.sizing) and self.mapper is not None and bar.trap:
            self.mapper.set_mapping(self, bar, True)

    def _command_written(self, old: int) -> None:
        changed = old ^ self.cfg.command
        if changed & (pc.CMD_IO | pc.CMD_MEM):
            for bar in self.bars:
                if changed & (pc.CMD_IO if bar.is_io else pc.CMD_MEM):
                    self._sync_bar(bar)
        self._intx_update()

    def _sync_bar(self, bar: Bar) -> None:
        if self.mapper is not None and bar.trap:
            self.mapper.set_mapping(self, bar, self.decoding(bar))

    def sync_bars(self) -> None:
        """Register every BAR whose decoding is on, unregister the others."""
        for bar in self.bars:
            self._sync_bar(bar)

    # --- hooks ------------------------------------------------------------------------
    def on_bar_map(self, bar: Bar, base: int) -> None:
        """The BAR's handler now answers at ``base``."""

    def on_bar_unmap(self, bar: Bar, base: int) -> None:
        """The BAR's handler no longer answers at ``base``."""

    # --- lifecycle --------------------------------------------------------------------
    def power_on_snapshot(self) -> None:
        """Remember the built config space and BAR addresses; ``reset`` returns to it."""
        self._power_on = (bytes(self.cfg.data), [b.addr for b in self.bars])

    async def run(self) -> None:
        """Device tasks (queue workers, backends); returns when the device has none."""

    def reset(self) -> None:
        """Back to the power-on state (VM reset): config space, BARs, interrupts."""
        if self._power_on is None:
            return
        data, addrs = self._power_on
        self.cfg.data[:] = data
        for bar, addr in zip(self.bars, addrs, strict=True):
            bar.addr = addr
            bar.sizing[:] = [False, False]
        if self.msix is not None:
            self.msix.reset()
        if self.msi is not None:
            self.msi.reset()
        if self.intx is not None:
            self.intx.reset()
        self.sync_bars()

    def close(self) -> None:
        """Release host resources (files, taps, sockets); subclasses call super last."""
        self.arm_ioevents(False)
        if self.msix is not None:
            self.msix.close()
