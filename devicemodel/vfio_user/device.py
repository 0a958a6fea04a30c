"""One of our PCI functions as a vfio-user device: the only module that knows the PCI API.

The device is built exactly as ``-s`` builds it (the same registry factory, the same
PciBus allocation and INTx routing, so its config space is byte for byte what
``acrn-pydm lspci`` shows for that ``-s`` line); then the client takes the bus's place:

* regions: config space is region 7, BAR i is region i (I/O BARs included, sizes and
  types as declared); no ROM, no VGA. Region reads and writes go to ``cfg_read`` /
  ``cfg_write`` and to the BAR handlers, split into naturally aligned accesses. BAR
  placement is the client's business (QEMU virtualizes the BAR registers; what it
  forwards only updates our copy), so the device is detached from our own buses.
* memory: ``ctx.memory`` is the client's DMA regions (dma.py).
* interrupts: the device's MSI / MSI-X / INTx signalling ends in :class:`ClientLines`,
  which turns it into the client's eventfds (irqs.py). QEMU emulates the MSI and MSI-X
  capabilities and the MSI-X *table* itself and asks for vectors through SET_IRQS, so
  our own MSI-X table is taken over: entry ``k`` is programmed once with a message
  whose data is ``k`` and left unmasked, and a message with data ``k`` means vector
  ``k``; table accesses that reach us through REGION_READ/WRITE are ignored (reads 0).
  For MSI the vector is the data's low bits under Multiple Message Enable, as the
  guest's own address/data reach us through forwarded config writes. Function mask
  and the PBA stay ours (QEMU forwards PBA reads to the server). The ACRN path keeps
  using the same Msix/Msi objects with real guest addresses.
* passthrough (``passthru,sim:N[,vmsix_on_msi]``): the synthetic device's message ``k``
  is routed through an irqfd-style eventfd (passthru/remap.py's IrqfdRemapper), which
  :class:`ClientLines` watches and forwards to the client's vector.

When the coming DeviceContext and interrupt layer land (redesign.md: a standalone
context whose memory is these DMA regions and whose MSI-X delivery is "per-vector
eventfd, table owned by someone else"), this module is what changes.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

from .. import devices
from ..bus import MmioBus, PortBus
from ..config import VmConfig
from ..context import VmContext
from ..errors import ConfigError
from ..hsm import abi
from ..hsm.base import HypervisorError
from ..pci import caps as pcaps
from ..pci import config as pc
from ..pci.bus import PciBus
from ..pci.device import BarKind, PciDevice
from ..pci.registry import factory_for
from ..slot import SlotConfig
from . import protocol as p
from .dma import DmaMemory, DmaRegion
from .irqs import ClientIrqs
from .protocol import Refused

log = logging.getLogger(__name__)

#: emulations that make no sense outside a VM's own platform
NOT_SERVED = {
    "hostbridge": "the host bridge belongs to the VM's own PCI root",
    "lpc": "the LPC bridge carries the VM's own ISA platform (UART, RTC)",
}
#: where the function sits in its -s form (the slot changes nothing QEMU shows)
DEFAULT_SLOT = 3
#: the message address of our taken-over MSI-X entries (the client never sees it)
OWNED_MSI_ADDR = 0xFEE0_0000
_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class _ClientSide:
    """What a served device may ask of "the hypervisor": nothing it can do itself."""

    name = "vfio-user"
    emulates_passthrough_config = False
    supports_eventfds = False


class ClientLines:
    """The device's interrupt sink (the ``Interrupts`` duck type devices are given):
    messages and INTx levels become the client's eventfds."""

    def __init__(self, resolve: Callable[[int, int], tuple[int, int] | None],
                 eventfd_routes: bool) -> None:
        self._resolve = resolve
        self.irqs: ClientIrqs | None = None
        self.level = False
        self.msi_count = 0
        self.dropped = 0
        #: passthrough uses irqfd-style routes (message k -> eventfd k); virtio does not
        self.supports_eventfds = eventfd_routes
        self._routes: dict[int, tuple[int, int]] = {}
        self._watchers: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    # --- MSI / MSI-X ----------------------------------------------------------------------
    def inject_msi(self, address: int, data: int) -> None:
        target = self._resolve(address, data)
        if target is None or self.irqs is None or not self.irqs.signal(*target):
            self.dropped += 1
            return
        self.msi_count += 1

    # --- INTx (active low, as the ACRN path drives it) ---------------------------------
    def set_irqline(self, gsi: int, op: int) -> None:
        if op == abi.GSI_SET_LOW:
            self._set_level(True)
        elif op == abi.GSI_SET_HIGH:
            self._set_level(False)
        elif op == abi.GSI_RAISING_PULSE:
            self._set_level(True)
            self._set_level(False)

    def assert_line(self, gsi: int) -> None:
        self._set_level(True)

    def deassert_line(self, gsi: int) -> None:
        self._set_level(False)

    def _set_level(self, level: bool) -> None:
        changed = level != self.level
        self.level = level
        if changed and self.irqs is not None:
            self.irqs.intx_changed(level)

    # --- irqfd-style routes (passthrough's IrqfdRemapper) ----------------------------------
    def ioeventfd(self, fd: int, address: int, length: int, *, pio: bool,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        raise HypervisorError("no ioeventfds over vfio-user: the client traps BAR accesses")

    def irqfd(self, fd: int, address: int, data: int, *, deassign: bool = False) -> None:
        if deassign:
            self._routes.pop(fd, None)
            scope = self._watchers.pop(fd, None)
            if scope is not None:
                scope.cancel()
                trio.lowlevel.notify_closing(fd)
            return
        self._routes[fd] = (address, data)
        if fd not in self._watchers and self._nursery is not None:
            scope = trio.CancelScope()
            self._watchers[fd] = scope
            self._nursery.start_soon(self._watch, fd, scope)

    async def _watch(self, fd: int, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                except (OSError, trio.ClosedResourceError):
                    return
                route = self._routes.get(fd)
                if route is not None:
                    self.inject_msi(*route)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the routed eventfds (routes made before this started are picked up)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for fd in list(self._routes):
                scope = trio.CancelScope()
                self._watchers[fd] = scope
                nursery.start_soon(self._watch, fd, scope)
            task_status.started()
            await trio.sleep_forever()


class ServedDevice:
    """A PciDevice built from a ``-s`` spec without the slot, and its vfio-user view."""

    def __init__(self, spec: str, *, slot: int = DEFAULT_SLOT) -> None:
        emul, _, options = spec.partition(",")
        if not emul:
            raise ConfigError("give a device spec, e.g. virtio-blk,/path/disk.img")
        if emul in NOT_SERVED:
            raise ConfigError(f"vfio-user: {emul} cannot be served: {NOT_SERVED[emul]}")
        if emul == "passthru" and not options.startswith("sim:"):
            raise ConfigError("vfio-user: only the synthetic passthrough device can be "
                              "served (passthru,sim:<vectors>[,vmsix_on_msi]); a host "
                              "device belongs to the VM that owns it")
        devices.load_all()
        factory = factory_for(emul)
        self.spec = spec
        self.memory = DmaMemory()
        self.lines = ClientLines(self._vector_of, eventfd_routes=emul == "passthru")
        self.ctx = VmContext(config=VmConfig(name="vfio-user"), memory=self.memory,
                             ports=PortBus(), mmio=MmioBus(), irq=self.lines,  # type: ignore[arg-type]
                             hv_name=_ClientSide.name, hv=_ClientSide())  # type: ignore[arg-type]
        self.slot = SlotConfig(0, slot, 0, emul, options)
        dev = factory(self.ctx, self.slot)
        try:
            if not isinstance(dev, PciDevice):
                raise ConfigError(f"vfio-user: {emul} is not a PCI function")
            self.bus = PciBus(self.ctx)
            self.bus.add(self.slot, dev)
            self.bus.finish()  # acrn-dm's BAR placement and INTx routing, as lspci shows
        except BaseException:
            dev.close()
            raise
        dev.mapper = None  # from now on the client places the BARs
        self.pci: PciDevice = dev
        self.name = getattr(dev, "name", emul)
        self._pm_off = self._cap_offset(pcaps.CAP_ID_PM)
        self._msi_off = self._cap_offset(pcaps.CAP_ID_MSI)
        self._msix_off = self._cap_offset(pcaps.CAP_ID_MSIX)
        self._msix_table: tuple[int, int, int] | None = None  # (bar, start, end)
        self.irq_counts = self._irq_counts()
        self._take_over_msix_table()
        self._orphans: list[tuple[DmaRegion, list[tuple[int, int]]]] = []

    # --- capabilities ----------------------------------------------------------------------
    def _cap_offset(self, cap_id: int) -> int | None:
        cap = pcaps.find(self.pci.cfg.data, cap_id)
        return cap.offset if cap is not None else None

    def _irq_counts(self) -> dict[int, int]:
        cfg = self.pci.cfg
        counts = {p.INTX_IRQ: 1 if cfg.get8(pc.INT_PIN) else 0, p.ERR_IRQ: 1, p.REQ_IRQ: 1}
        if self._msi_off is not None:
            ctrl = cfg.get16(self._msi_off + 2)
            counts[p.MSI_IRQ] = 1 << ((ctrl >> pcaps.MSI_CTRL_MMC_SHIFT) & 7)
        if self._msix_off is not None:
            counts[p.MSIX_IRQ] = (cfg.get16(self._msix_off + 2) & pcaps.MSIX_CTRL_SIZE_MASK) + 1
        return counts

    def _vector_of(self, address: int, data: int) -> tuple[int, int] | None:
        """Which client vector a message of the device is (None: neither MSI nor MSI-X on).
        MSI wins when a guest turns both on, as in pci/msix.py."""
        cfg = self.pci.cfg
        if self._msi_off is not None:
            ctrl = cfg.get16(self._msi_off + 2)
            if ctrl & pcaps.MSI_CTRL_ENABLE:
                mme = (ctrl & pcaps.MSI_CTRL_MME_MASK) >> pcaps.MSI_CTRL_MME_SHIFT
                n = min(1 << mme, self.irq_counts[p.MSI_IRQ])
                return p.MSI_IRQ, data & (n - 1)
        if self._msix_off is not None and cfg.get16(self._msix_off + 2) & pcaps.MSIX_CTRL_ENABLE:
            return p.MSIX_IRQ, data
        return None

    def _take_over_msix_table(self) -> None:
        """Program entry k with data k, unmasked: the client owns the real table."""
        if self._msix_off is None:
            return
        cfg = self.pci.cfg
        table = cfg.get32(self._msix_off + 4)
        bir, start = table & pcaps.MSIX_BIR_MASK, table & ~pcaps.MSIX_BIR_MASK
        n = self.irq_counts[p.MSIX_IRQ]
        bar = self.pci.bar(bir)
        if bar is None:
            return
        self._msix_table = (bir, start, start + 16 * n)
        for k in range(n):
            base = start + 16 * k
            bar.write(base, 4, OWNED_MSI_ADDR)
            bar.write(base + 4, 4, 0)
            bar.write(base + 8, 4, k)
            bar.write(base + 12, 4, 0)

    # --- regions ------------------------------------------------------------------------------
    @property
    def config_size(self) -> int:
        """4 KiB for a function with extended config space, else the 256 bytes a
        conventional PCI guest can reach (ours answer 0 / all-ones beyond)."""
        cfg = self.pci.cfg
        return len(cfg.data) if cfg.extended else pc.STD_SIZE

    def region_info(self, index: int) -> tuple[int, int]:
        """(flags, size) of region ``index``; size 0 for regions the function lacks."""
        if 0 <= index <= 5:
            bar = self.pci.bar(index)
            if bar is None:
                return 0, 0
            return p.REGION_READ | p.REGION_WRITE, bar.size
        if index == p.CONFIG_REGION:
            return p.REGION_READ | p.REGION_WRITE, self.config_size
        return 0, 0

    def _bounds(self, index: int, offset: int, count: int) -> int:
        _, size = self.region_info(index) if 0 <= index < p.NUM_REGIONS else (0, 0)
        if size == 0:
            raise Refused(errno.EINVAL, f"region {index} does not exist")
        if count == 0 or offset >= size or count > size - offset:
            raise Refused(errno.EINVAL, f"access {offset:#x}+{count} past region {index} "
                          f"({size:#x} bytes)")
        return size

    def read(self, index: int, offset: int, count: int) -> bytes:
        self._bounds(index, offset, count)
        out = bytearray()
        for off, size in _pieces(offset, count):
            out += self._read1(index, off, size).to_bytes(size, "little")
        return bytes(out)

    def write(self, index: int, offset: int, data: bytes) -> None:
        self._bounds(index, offset, len(data))
        pos = 0
        for off, size in _pieces(offset, len(data)):
            self._write1(index, off, size, int.from_bytes(data[pos : pos + size], "little"))
            pos += size

    def _read1(self, index: int, off: int, size: int) -> int:
        if index == p.CONFIG_REGION:
            if size == 8:
                return self._read1(index, off, 4) | self._read1(index, off + 4, 4) << 32
            return self.bus.cfg_read(0, self.slot.dev, 0, off, size)
        if self._in_table(index, off, size):
            return 0
        bar = self.pci.bar(index)
        assert bar is not None
        return bar.read(off, size) & _MASKS[size]

    def _write1(self, index: int, off: int, size: int, value: int) -> None:
        if index == p.CONFIG_REGION:
            if size == 8:
                self._write1(index, off, 4, value & 0xFFFF_FFFF)
                self._write1(index, off + 4, 4, value >> 32)
                return
            self.bus.cfg_write(0, self.slot.dev, 0, off, size, value)
            self._remember_power_state(off, size, value)
            return
        if self._in_table(index, off, size):
            return
        bar = self.pci.bar(index)
        assert bar is not None
        bar.write(off, size, value)

    def _remember_power_state(self, off: int, size: int, value: int) -> None:
        """QEMU (10.0 and later) follows the guest's PMCSR PowerState writes to switch a
        function's BARs off in D3hot, and reads PowerState back from us to decide whether
        a later D0 write is needed. So the state a guest writes must read back, as on
        hardware, even where our capability keeps it read-only (passthrough shows a
        read-only copy of the physical one): D0 and D3hot, the states PMC always allows,
        are remembered here; D1/D2 only if PMC advertises them."""
        if self._pm_off is None:
            return
        pmcsr = self._pm_off + 4
        if not (off <= pmcsr < off + size):
            return
        cfg = self.pci.cfg
        state = (value >> (8 * (pmcsr - off))) & 0x3
        pmc = cfg.get16(self._pm_off + 2)
        if state in (1, 2) and not pmc & (1 << (8 + state)):
            return
        cur = cfg.get16(pmcsr)
        if cur & 0x3 != state:
            cfg.set16(pmcsr, (cur & ~0x3) | state)

    def _in_table(self, index: int, off: int, size: int) -> bool:
        t = self._msix_table
        return t is not None and t[0] == index and off < t[2] and off + size > t[1]

    # --- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> None:
        """DEVICE_RESET: back to the power-on state, our MSI-X table taken over again."""
        self.pci.reset()
        self._take_over_msix_table()
        self.lines._set_level(False)

    # --- DMA mappings ---------------------------------------------------------------------
    # QEMU re-describes guest RAM whenever the guest's memory map changes: SeaBIOS' PAM
    # shadowing of 0xc0000-0xfffff makes it unmap all of low RAM and map it again in
    # pieces, from the same memfd at the same offsets, while SeaBIOS' own virtio driver
    # has live rings there. So a region that goes away under a started virtqueue's rings
    # is not fatal at once: it is "orphaned", and the rings stay as they are if the same
    # pages are mapped at the same guest addresses again before the client's next
    # non-DMA command. Otherwise the function is reset as if its driver wrote status 0
    # and flagged DEVICE_NEEDS_RESET, so nothing touches unmapped memory afterwards.

    def dma_map(self, req: p.DmaMap, fd: int | None) -> None:
        self.memory.map(req, fd)
        self._orphans = [(old, rings) for old, rings in self._orphans
                         if not all(self.memory.covers_same(old, a, n) for a, n in rings)]

    def dma_unmap(self, regions: list[DmaRegion]) -> None:
        for region in regions:
            rings = self._rings_in(region)
            self.memory.unmap(region)
            if rings:
                self._orphans.append((region, rings))

    def settle(self) -> None:
        """Before any non-DMA command: rings whose memory did not come back end here."""
        if not self._orphans:
            return
        old = self._orphans[0][0]
        self._orphans = []
        if self._stop_queues():
            log.warning("%s: DMA region %#x+%#x with the rings in it was unmapped and not "
                        "mapped again: device reset", self.name, old.address, old.size)
            self.pci.needs_reset()  # type: ignore[attr-defined]

    def _stop_queues(self) -> bool:
        """Reset a virtio function with live queues as its driver would (status 0), so
        its rings' views into client memory are dropped. True if it had live queues."""
        from ..virtio.pci import VirtioPci

        dev = self.pci
        if not isinstance(dev, VirtioPci) or not any(q.started for q in dev.queues):
            return False
        self._write_status_zero(dev)
        return True

    def _rings_in(self, region: DmaRegion) -> list[tuple[int, int]]:
        """The started virtqueue rings that lie (partly) in ``region``."""
        from ..virtio.pci import VirtioPci

        dev = self.pci
        if not region.accessible or not isinstance(dev, VirtioPci) or not dev.active:
            return []
        start, end = region.address, region.end
        out = []
        for q in dev.queues:
            if not q.started:
                continue
            for a, n in ((q.desc_addr, 16 * q.size), (q.avail_addr, 6 + 2 * q.size),
                         (q.used_addr, 6 + 8 * q.size)):
                if a < end and start < a + n:
                    out.append((a, n))
        return out

    @staticmethod
    def _write_status_zero(dev: PciDevice) -> None:
        from ..virtio import pci as vp

        modern = dev.bar(vp.MODERN_BAR)
        if modern is not None and modern.kind is BarKind.MEM64:
            modern.write(vp.COMMON_OFF + vp.C_STATUS, 1, 0)
            return
        legacy = dev.bar(vp.LEGACY_BAR)
        if legacy is not None:
            legacy.write(vp.L_STATUS, 1, 0)

    def client_gone(self) -> None:
        """The client left: its memory and eventfds go; the device state stays, except
        that a virtio function with live queues is reset first (as if its driver wrote
        status 0): its rings were in the memory that goes, and nothing may keep it."""
        if self.lines.irqs is not None:
            self.lines.irqs.close()
        self._orphans = []
        self._stop_queues()
        self.memory.clear()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The device's own tasks (queue workers, backends) and the eventfd watchers."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.lines.run)
            nursery.start_soon(self.pci.run)
            task_status.started()

    def close(self) -> None:
        try:
            self.pci.close()
        finally:
            if self.lines.irqs is not None:
                self.lines.irqs.close()
            self.memory.close()


def _pieces(offset: int, count: int) -> list[tuple[int, int]]:
    """[offset, offset+count) as naturally aligned accesses: the access itself when it is
    1, 2, 4 or 8 aligned bytes, else the largest aligned pieces of at most 4 bytes."""
    if count in (1, 2, 4, 8) and offset % count == 0:
        return [(offset, count)]
    out = []
    end = offset + count
    while offset < end:
        size = 4
        while size > 1 and (offset % size or offset + size > end):
            size //= 2
        out.append((offset, size))
        offset += size
    return out


__all__ = ["ClientLines", "ServedDevice"]
