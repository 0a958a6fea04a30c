"""The PCI bus: 256 buses × 32 slots × 8 functions, config access, BARs on the buses.

* Config access arrives as PCICFG requests (the HSM turned CF8/CFC into them) and as MMIO
  in the ECAM window [0xE000_0000, 0xF000_0000) (1 MiB per bus; reg = addr[11:0],
  func = addr[14:12], dev = addr[19:15], bus = addr[27:20]). Both end in ``cfg_read`` /
  ``cfg_write``, where no function, a size other than 1/2/4 or an unaligned offset reads
  all-ones and drops writes (acrn-facts §2.1).
* BARs are allocated in ``finish()`` (after every function was added) in bus/slot/function
  order, passthrough first, from acrn-dm's pools: I/O from 0x2000, MEM32 in
  [2 GiB, 0xE000_0000), MEM64 in [256 GiB, 512 GiB) prefetchable, except that without
  OVMF a 64-bit BAR of at most 32 MiB goes into the 32-bit hole (still 64-bit, not
  prefetchable). Every BAR takes at least 4 KiB of its pool and is aligned to that.
  After each bus the I/O pool moves on 32 bytes and the memory pools 1 MiB, as acrn-dm.
* A BAR is registered on the port / MMIO bus while its decoding is enabled; a guest that
  moves it onto something else gets no registration (logged), retried whenever another
  BAR moves away. The 32- and 64-bit holes have fallback handlers (all-ones, writes
  dropped), as acrn-dm.
* The fast paths functions declare (doorbell ioeventfds, irqfd-backed MSI-X vectors) are
  wired here (``fastpath.py``) and follow the BARs as they move.
* Multi-function slots get header-type bit 7 in every function (fixed up on read, as
  acrn-dm, so it holds for functions that keep their own config bytes too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..bus import BusError, MmioBus, PortBus
from ..errors import ConfigError
from ..irq.intx import IntxRouter
from ..irq.services import Eventfds, IrqLines, MsiSink
from ..memory import ECAM_BASE, LOWMEM_LIMIT, PCI_HOLE_END
from ..ratelimit import RateLimitedLog
from ..slot import SlotConfig
from .config import HEADER_MULTIFUNCTION, HEADER_TYPE, INT_LINE, INT_PIN
from .device import Bar, BarKind, PciDevice
from .fastpath import FastPaths

log = logging.getLogger(__name__)

MAX_BUSES = 256
MAX_SLOTS = 32
MAX_FUNCS = 8
ECAM_SIZE = MAX_BUSES << 20
IO_BASE = 0x2000
IO_LIMIT = 0x10000
MEM32_BASE = LOWMEM_LIMIT
MEM32_LIMIT = PCI_HOLE_END
MEM64_BASE = 0x40_0000_0000
MEM64_LIMIT = 0x80_0000_0000
MEM64_SMALL = 32 << 20
MIN_ALLOC = 4096
BUS_IO_ROUNDUP = 32
BUS_MEM_ROUNDUP = 1 << 20

_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


@dataclass
class BusWindow:
    """The resources one bus decodes (for the ACPI _CRS of its root)."""

    bus: int
    io: tuple[int, int]
    mem32: tuple[int, int]
    mem64: tuple[int, int]


class _Pool:
    def __init__(self, name: str, base: int, limit: int) -> None:
        self.name = name
        self.next = base
        self.limit = limit
        self.reserved: list[tuple[int, int]] = []

    def alloc(self, size: int) -> int:
        size = max(size, MIN_ALLOC)
        base = _roundup(self.next, size)
        moved = True
        while moved:
            moved = False
            for start, end in self.reserved:
                if base < end and start < base + size:
                    base = _roundup(end, size)
                    moved = True
        if base + size > self.limit:
            raise ConfigError(f"PCI {self.name} space exhausted: cannot place a BAR of "
                              f"{size:#x} bytes below {self.limit:#x}")
        self.next = base + size
        return base


class _Fallback:
    """acrn-dm's handler for the PCI holes: reads all-ones, writes ignored."""

    def read(self, offset: int, size: int) -> int:
        return _ONES.get(size, 0xFFFF_FFFF_FFFF_FFFF)

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class _Ecam:
    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4):
            return _ONES.get(size, 0xFFFF_FFFF_FFFF_FFFF)
        return self.bus.cfg_read((offset >> 20) & 0xFF, (offset >> 15) & 0x1F,
                                 (offset >> 12) & 0x7, offset & 0xFFF, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if size in (1, 2, 4):
            self.bus.cfg_write((offset >> 20) & 0xFF, (offset >> 15) & 0x1F,
                               (offset >> 12) & 0x7, offset & 0xFFF, size, value)


class PciBus:
    """All PCI functions of one VM: their config space, BARs on the port and MMIO buses,
    INTx routing (``lines``) and eventfd fast paths (``eventfds`` when the backend has
    them; ``msi`` injects for a vector whose irqfd cannot be made)."""

    def __init__(self, ports: PortBus, mmio: MmioBus, lines: IrqLines, *,
                 msi: MsiSink | None = None, eventfds: Eventfds | None = None,
                 ovmf: bool = False) -> None:
        self.ports = ports
        self.mmio = mmio
        self.lines = lines
        self._functions: dict[tuple[int, int, int], PciDevice] = {}
        self.intx = IntxRouter(lines)
        self.fast_paths = FastPaths(eventfds, msi)
        self.windows: dict[int, BusWindow] = {}
        self._pending: dict[int, tuple[PciDevice, Bar]] = {}
        self._multifunction: set[tuple[int, int]] = set()
        self._finished = False
        self._rl = RateLimitedLog(log)
        #: acrn-dm skips the small-64-bit-BAR-below-4G workaround when booting OVMF
        self.mem64_workaround = not ovmf
        self.io_pool = _Pool("I/O", IO_BASE, IO_LIMIT)
        self.mem32_pool = _Pool("32-bit memory", MEM32_BASE, MEM32_LIMIT)
        self.mem64_pool = _Pool("64-bit memory", MEM64_BASE, MEM64_LIMIT)

    # --- building ---------------------------------------------------------------------
    def add(self, slot: SlotConfig, device: PciDevice) -> None:
        key = (slot.bus, slot.dev, slot.func)
        if not (0 <= slot.bus < MAX_BUSES and 0 <= slot.dev < MAX_SLOTS
                and 0 <= slot.func < MAX_FUNCS):
            raise ConfigError(f"-s {slot.slot_text}: bus 0..255, slot 0..31, function 0..7")
        if key in self._functions:
            raise ConfigError(f"-s {slot.slot_text}: slot already in use")
        if self._finished:
            raise ConfigError(f"-s {slot.slot_text}: the PCI bus is already built")
        self._functions[key] = device
        if isinstance(device, PciDevice):
            device.bdf = key
        funcs = sum(1 for (b, d, _) in self._functions if (b, d) == (slot.bus, slot.dev))
        if funcs > 1:
            self._multifunction.add((slot.bus, slot.dev))

    def finish(self) -> None:
        """Allocate BARs, route INTx, wire fast paths, register BARs, ECAM and the hole
        fallbacks."""
        if self._finished:
            return
        self._finished = True
        buses = sorted({b for (b, _, _) in self._functions})
        for bus in buses:
            self._allocate_bus(bus)
        ours = [(k, d) for k, d in self.functions() if isinstance(d, PciDevice)]
        for key, dev in ours:
            if dev.intx is not None:
                dev.intx.pin = self.intx.request_pin(key[0], key[1])
                dev.cfg.set8(INT_PIN, dev.intx.pin)
        for key, dev in ours:
            if dev.intx is not None:
                route = self.intx.route(key[0], key[1], dev.intx.pin)
                dev.intx.connect(self.lines, route)
                dev.cfg.set8(INT_LINE, route.irq)
        for _, dev in ours:
            self.fast_paths.wire(dev)
            dev.mapper = self
            dev.sync_bars()
            dev.power_on_snapshot()
        mmio = self.mmio
        mmio.add_fallback(MEM32_BASE, MEM32_LIMIT - MEM32_BASE, _Fallback(), "PCI hole (32-bit)")
        mmio.add_fallback(MEM64_BASE, MEM64_LIMIT - MEM64_BASE, _Fallback(), "PCI hole (64-bit)")
        mmio.register(ECAM_BASE, ECAM_SIZE, _Ecam(self), "PCI ECFG")

    def _allocate_bus(self, bus: int) -> None:
        io0, m32, m64 = self.io_pool.next, self.mem32_pool.next, self.mem64_pool.next
        keys = sorted(k for k in self._functions if k[0] == bus)
        devs = [d for k in keys if isinstance(d := self._functions[k], PciDevice)]
        for dev in devs:
            for bar in dev.bars:
                if bar.fixed is not None:
                    pool = self._pool_for(bar)[0]
                    pool.reserved.append((bar.fixed, bar.fixed + max(bar.size, MIN_ALLOC)))
        ordered = [d for d in devs if d.allocate_first] + [d for d in devs
                                                           if not d.allocate_first]
        for dev in ordered:
            for bar in dev.bars:
                pool, prefetch = self._pool_for(bar)
                addr = bar.fixed if bar.fixed is not None else pool.alloc(bar.size)
                dev.place_bar(bar, addr, prefetch)
        for pool, step in ((self.io_pool, BUS_IO_ROUNDUP), (self.mem32_pool, BUS_MEM_ROUNDUP),
                           (self.mem64_pool, BUS_MEM_ROUNDUP)):
            pool.next = _roundup(pool.next + step, step)
        self.windows[bus] = BusWindow(bus, (io0, self.io_pool.next),
                                      (m32, self.mem32_pool.next), (m64, self.mem64_pool.next))

    def _pool_for(self, bar: Bar) -> tuple[_Pool, bool]:
        if bar.kind is BarKind.IO:
            return self.io_pool, False
        if bar.kind is BarKind.MEM32:
            return self.mem32_pool, False
        if self.mem64_workaround and bar.size <= MEM64_SMALL:
            return self.mem32_pool, False
        return self.mem64_pool, True

    # --- BAR registration (BarMapping) ------------------------------------------------
    def set_mapping(self, dev: PciDevice, bar: Bar, want: bool) -> None:
        """Make the registration of ``bar`` follow ``want`` at its current address."""
        if want and bar.mapped_at == bar.addr:
            return
        key = id(bar)
        removed = False
        if bar.mapped_at is not None:
            base = bar.mapped_at
            bus = self.ports if bar.is_io else self.mmio
            bus.unregister(base)
            bar.mapped_at = None
            removed = True
            dev.on_bar_unmap(bar, base)
            self.fast_paths.sync(dev)
        self._pending.pop(key, None)
        if want:
            self._try_map(dev, bar)
        if removed:
            self._retry_pending()

    def ioevents_changed(self, dev: PciDevice) -> None:
        """The device armed or disarmed its doorbells."""
        self.fast_paths.sync(dev)

    def _try_map(self, dev: PciDevice, bar: Bar, *, quiet: bool = False) -> bool:
        bus = self.ports if bar.is_io else self.mmio
        try:
            bus.register(bar.addr, bar.size, bar, f"{dev.name} BAR{bar.idx}")
        except BusError as e:
            self._pending[id(bar)] = (dev, bar)
            if not quiet:
                self._rl.warning("%s BAR%d not decoded at %#x: %s", dev.name, bar.idx,
                                 bar.addr, e)
            return False
        bar.mapped_at = bar.addr
        dev.on_bar_map(bar, bar.addr)
        self.fast_paths.sync(dev)
        return True

    def _retry_pending(self) -> None:
        for key, (dev, bar) in list(self._pending.items()):
            del self._pending[key]
            if dev.decoding(bar) and bar.mapped_at is None:
                self._try_map(dev, bar, quiet=True)

    # --- queries ----------------------------------------------------------------------
    def get(self, bus: int, dev: int, func: int) -> PciDevice | None:
        return self._functions.get((bus, dev, func))

    def functions(self) -> list[tuple[tuple[int, int, int], PciDevice]]:
        return sorted(self._functions.items())

    # --- config access ----------------------------------------------------------------
    def cfg_read(self, bus: int, dev: int, func: int, reg: int, size: int) -> int:
        fn = self._functions.get((bus, dev, func))
        if fn is None or size not in (1, 2, 4) or reg & (size - 1) or not 0 <= reg < 4096:
            return 0xFFFF_FFFF
        value = fn.cfg_read(reg, size)
        if reg <= HEADER_TYPE < reg + size:
            bit = HEADER_MULTIFUNCTION << (8 * (HEADER_TYPE - reg))
            value = (value | bit) if (bus, dev) in self._multifunction else (value & ~bit)
        return value

    def vcpu_safe(self, bus: int, dev: int, func: int, reg: int, size: int,
                  write: bool) -> bool:
        """Whether a config access may be answered on a request thread behind the loop
        gate (``loopgate.py``): no function there (all-ones), or the function says so."""
        fn = self._functions.get((bus, dev, func))
        return fn is None or fn.config_access_vcpu_safe(reg, size, write)

    def cfg_write(self, bus: int, dev: int, func: int, reg: int, size: int, value: int) -> None:
        fn = self._functions.get((bus, dev, func))
        if fn is None or size not in (1, 2, 4) or reg & (size - 1) or not 0 <= reg < 4096:
            return
        fn.cfg_write(reg, size, value & _ONES[size])

    def reset(self) -> None:
        """Every function back to its power-on state (VM reset)."""
        for _, dev in self.functions():
            dev.reset()


def _roundup(n: int, align: int) -> int:
    return (n + align - 1) // align * align
