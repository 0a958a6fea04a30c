"""One of our PCI functions as a vfio-user device: the only module that knows the PCI API.

The device is built exactly as ``-s`` builds it (the registry's factory, on a
standalone ``DeviceContext``, placed by a ``PciBus`` of its own with acrn-dm's BAR
allocation and INTx routing, so its config space is byte for byte what ``acrn-pydm
lspci`` shows for that ``-s`` line); then the client takes the bus's place:

* regions: config space is region 7, BAR i is region i (I/O BARs included, sizes and
  types as declared); no ROM, no VGA. Region reads and writes go to config space and
  to the BAR handlers, split into naturally aligned accesses. BAR placement is the
  client's business (QEMU virtualizes the BAR registers; what it forwards only updates
  our copy), so the device is detached from the bus once built.
* memory: the context's memory is the client's DMA regions (dma.py).
* interrupts (routing.py): QEMU emulates the MSI and MSI-X capabilities and the MSI-X
  *table* itself and asks for one eventfd per vector through SET_IRQS, so the
  function's MSI-X and MSI vectors are handed to ``EventfdVectors`` (vector k raises
  client vector k; our own table and MSI registers only carry what the client
  forwards) and its INTx pin to the client's line. A passthrough device's physical
  message k raises client vector k through the context's remapper; its vMSI-X table,
  which decides which physical vectors may fire, is programmed once (and after each
  reset) with every entry unmasked, since the client's table never reaches it.
  The ACRN path uses the same objects with real guest addresses.
"""

from __future__ import annotations

import errno
import logging

import trio

from ..bus import MmioBus, PortBus
from ..context import standalone
from ..errors import ConfigError
from ..hsm.base import InterruptRemapper, MessageSource
from ..irq.delivery import EventfdVectors
from ..irq.msix import ENTRY_SIZE
from ..irq.services import Line, NoInterrupts
from ..passthru.device import Passthru
from ..pci import caps as pcaps
from ..pci import config as pc
from ..pci.bus import PciBus
from ..pci.device import PciDevice
from ..pci.msix import VectorSignal
from ..ratelimit import RateLimitedLog
from ..registry import create_pci, vfio_user_kind
from ..slot import SlotConfig
from ..virtio.pci import VirtioPci
from . import protocol as p
from .dma import DmaMemory, DmaRegion
from .protocol import Refused
from .routing import CLIENT_MSI_ADDR, ClientLines, ClientPassthrough, ClientRemapper

log = logging.getLogger(__name__)

#: where the function sits in its -s form (the slot changes nothing QEMU shows)
DEFAULT_SLOT = 3
#: how long the client's next command waits for a status-0 reset to complete
RESET_WAIT_S = 2.0
_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class ServedDevice:
    """A PciDevice built from a ``-s`` spec without the slot, and its vfio-user view."""

    def __init__(self, spec: str, *, slot: int = DEFAULT_SLOT) -> None:
        emul, options = vfio_user_kind(spec)
        if emul == "passthru" and not options.startswith("sim:"):
            raise ConfigError("vfio-user: only the synthetic passthrough device can be "
                              "served (passthru,sim:<vectors>[,vmsix_on_msi]); a host "
                              "device belongs to the VM that owns it")
        self.spec = spec
        self.memory = DmaMemory()
        self.lines = ClientLines()
        #: the client's MSI-X and MSI vectors (by IRQ index), as SET_IRQS set them
        self.vectors: dict[int, EventfdVectors] = {}
        #: the remappers a passthrough device asked for (each counts what it dropped)
        self.remappers: list[ClientRemapper] = []
        ctx = standalone(self.memory, msi=self.lines, lines=self.lines,
                         passthrough=ClientPassthrough(), remapper=self._remapper,
                         backend="vfio-user")
        self.slot = SlotConfig(0, slot, 0, emul, options)
        dev = create_pci(ctx, self.slot)
        try:
            self.bus = PciBus(PortBus(), MmioBus(), NoInterrupts(), ovmf=ctx.choices.ovmf)
            self.bus.add(self.slot, dev)
            self.bus.finish()  # acrn-dm's BAR placement and INTx routing, as lspci shows
        except BaseException:
            dev.close()
            raise
        dev.mapper = None  # from now on the client places the BARs
        self.pci: PciDevice = dev
        self.name = dev.name
        self._msi_off = self._cap_offset(pcaps.CAP_ID_MSI)
        self.irq_counts = self._irq_counts()
        for index in (p.MSIX_IRQ, p.MSI_IRQ):
            if self.irq_counts.get(index):
                self.vectors[index] = EventfdVectors(self.irq_counts[index])
        dev.hand_interrupts_to(msix=self.vectors.get(p.MSIX_IRQ),
                               msi=self.vectors.get(p.MSI_IRQ), intx=Line(self.lines, 0))
        self._unmask_foreign_msix_table()
        self._orphans: list[tuple[DmaRegion, list[tuple[int, int]]]] = []
        self._rl = RateLimitedLog(log)

    # --- capabilities and interrupts -------------------------------------------------------
    def _cap_offset(self, cap_id: int) -> int | None:
        cap = pcaps.find(self.pci.cfg.data, cap_id)
        return cap.offset if cap is not None else None

    def _irq_counts(self) -> dict[int, int]:
        cfg = self.pci.cfg
        counts = {p.INTX_IRQ: 1 if cfg.get8(pc.INT_PIN) else 0, p.ERR_IRQ: 1, p.REQ_IRQ: 1}
        msi = self._cap_offset(pcaps.CAP_ID_MSI)
        if msi is not None:
            counts[p.MSI_IRQ] = 1 << ((cfg.get16(msi + 2) >> pcaps.MSI_CTRL_MMC_SHIFT) & 7)
        msix = self._cap_offset(pcaps.CAP_ID_MSIX)
        if msix is not None:
            counts[p.MSIX_IRQ] = (cfg.get16(msix + 2) & pcaps.MSIX_CTRL_SIZE_MASK) + 1
        return counts

    def _remapper(self, source: MessageSource, count: int) -> InterruptRemapper:
        """The context's remapper factory (a passthrough device asks on first use)."""
        remapper = ClientRemapper(source, count, self._passthrough_vectors)
        self.remappers.append(remapper)
        return remapper

    def _passthrough_vectors(self) -> VectorSignal | None:
        """The index a passthrough function's messages go to: MSI while the guest has
        its (virtualized) MSI on, else MSI-X (vMSI-X on MSI replaces the MSI capability)."""
        msi = self._msi_off
        if msi is not None and self.pci.cfg.get16(msi + 2) & pcaps.MSI_CTRL_ENABLE:
            return self.vectors.get(p.MSI_IRQ)
        return self.vectors.get(p.MSIX_IRQ)

    def _unmask_foreign_msix_table(self) -> None:
        """Passthrough's vMSI-X on MSI: its table's entries drive the physical vector
        masks, and the client's table never reaches it, so every entry k gets message
        data k and is unmasked, as a guest would program it through the BAR; each
        physical message the client's own table lets through can then fire."""
        off = self._cap_offset(pcaps.CAP_ID_MSIX)
        if off is None or not isinstance(self.pci, Passthru) or self.pci.vmsix is None:
            return
        table = self.pci.cfg.get32(off + 4)
        bar = self.pci.bar(table & pcaps.MSIX_BIR_MASK)
        if bar is None:
            return
        base = table & ~pcaps.MSIX_BIR_MASK
        for k in range(self.irq_counts[p.MSIX_IRQ]):
            entry = base + k * ENTRY_SIZE
            bar.write(entry, 4, CLIENT_MSI_ADDR)
            bar.write(entry + 4, 4, 0)
            bar.write(entry + 8, 4, k)
            bar.write(entry + 12, 4, 0)

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
            return
        bar = self.pci.bar(index)
        assert bar is not None
        bar.write(off, size, value)

    async def writes_done(self) -> None:
        """After a region write or a reset, before the client's next command: a virtio
        function's status-0 reset completes first (a legacy driver reads status once
        right after writing 0 and must see 0)."""
        dev = self.pci
        if isinstance(dev, VirtioPci) and dev.resetting:
            with trio.move_on_after(RESET_WAIT_S):
                await dev.wait_reset_done()
            if dev.resetting:  # a worker stuck in the host: the driver polls, as on ACRN
                self._rl.warning("%s: reset still completing after %.0f s", self.name,
                                 RESET_WAIT_S)

    # --- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> None:
        """DEVICE_RESET: back to the power-on state (a foreign MSI-X table unmasked again)."""
        self.pci.reset()
        self._unmask_foreign_msix_table()

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
            assert isinstance(self.pci, VirtioPci)
            self.pci.needs_reset()

    def _stop_queues(self) -> bool:
        """Reset a virtio function with live queues as its driver would (status 0), so
        its rings' views into client memory are dropped. True if it had live queues."""
        dev = self.pci
        if not isinstance(dev, VirtioPci) or not dev.ring_ranges():
            return False
        dev.reset_device()
        return True

    def _rings_in(self, region: DmaRegion) -> list[tuple[int, int]]:
        """The started virtqueue rings that lie (partly) in ``region``."""
        dev = self.pci
        if not region.accessible or not isinstance(dev, VirtioPci):
            return []
        start, end = region.address, region.end
        return [(a, n) for a, n in dev.ring_ranges() if a < end and start < a + n]

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
        """The device's own tasks (queue workers, backends)."""
        async with trio.open_nursery() as nursery:
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


__all__ = ["ServedDevice"]
