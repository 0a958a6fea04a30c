"""The AHCI host bus adapter: a PCI function (8086:2821, class 01:06:01, acrn-dm's
Intel ICH8 identity) whose ABAR in BAR5 holds the global registers and one register
block per port, with MSI (one message per port where the guest allocates enough, as
acrn-dm does) and INTx.

Interrupts follow AHCI 1.3.1 §10.6: a port's newly set, enabled PxIS bits set its IS.IPS
bit; with GHC.IE on that sends its MSI message (a shared message only when the port's
IPS bit was clear), or asserts INTx while any IPS bit is set. A port still pending when
the guest clears its IPS bit sets it again and interrupts again, so an event that lands
while the guest's handler runs is never lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..memory import MemoryMap
from ..pci.device import BarKind, PciDevice
from ..ratelimit import RateLimitedLog
from ..virtio.blk.io import DiskImage
from . import regs as r
from .atapi import AtapiCd
from .drive import Drive, log
from .port import Port

if TYPE_CHECKING:
    from ..context import DeviceContext
    from ..slot import SlotConfig

T = TypeVar("T")
VENDOR_INTEL, DEVICE_ICH8_AHCI = 0x8086, 0x2821
CLASS_SATA_AHCI = 0x010601
#: blocking image calls in flight at once (NCQ keeps up to 32 per port busy)
THREADS = 16


def msi_messages(ports: int) -> int:
    """acrn-dm's MSI capability: a power of two covering the ports, at most 16."""
    n = min(ports, 16)
    return 1 << (n - 1).bit_length()


class ThreadPool:
    """Where the drives' blocking image calls run: worker threads, ``THREADS`` at once;
    a call cannot be cancelled once started (it owns guest buffers), like virtio-blk's
    pool."""

    def __init__(self, threads: int = THREADS) -> None:
        self.limiter = trio.CapacityLimiter(threads)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)


class Ahci(PciDevice):
    """The controller with one drive (or None) per port; ``pool`` runs the drives'
    blocking calls."""

    name = "ahci"

    def __init__(self, ctx: DeviceContext | None, slot: SlotConfig | None,
                 drives: list[Drive | None], pool: ThreadPool | None = None) -> None:
        super().__init__(ctx, slot)
        if not 1 <= len(drives) <= r.MAX_PORTS:
            raise ValueError(f"ahci: {len(drives)} ports (1..{r.MAX_PORTS})")
        self.memory = ctx.memory if ctx is not None else MemoryMap()
        self.pool = pool or ThreadPool()
        self.nursery: trio.Nursery | None = None
        nports = max(r.MIN_PORTS, len(drives))
        padded: list[Drive | None] = [*drives, *[None] * (nports - len(drives))]
        self.ports = [Port(self, i, d) for i, d in enumerate(padded)]
        self.cap = (r.CAP_S64A | r.CAP_SNCQ | r.CAP_SSS | r.CAP_SCLO | r.CAP_SAM
                    | r.CAP_ISS_GEN3 | r.CAP_PMD | r.CAP_SSC | r.CAP_PSC
                    | (r.SLOTS - 1) << r.CAP_NCS_SHIFT | (nports - 1))
        self.pi = sum(1 << i for i, d in enumerate(padded) if d is not None)
        self.ghc = r.GHC_AE
        self.is_ = 0
        self._resetting = False
        self._intx_level = False
        self._glog = RateLimitedLog(log)
        self.cfg.set_ids(VENDOR_INTEL, DEVICE_ICH8_AHCI, CLASS_SATA_AHCI)
        self.add_msi(msi_messages(nports))
        self.add_bar(5, BarKind.MEM32, r.PORT_BASE + nports * r.PORT_STRIDE,
                     read=self.abar_read, write=self.abar_write)
        self.request_intx()

    # --- the ABAR -----------------------------------------------------------------------------
    def abar_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset & (size - 1):
            return 0
        value = self._read32(offset & ~3)
        return value >> (8 * (offset & 3)) & ((1 << (8 * size)) - 1)

    def _read32(self, offset: int) -> int:
        if offset >= r.PORT_BASE:
            index, reg = divmod(offset - r.PORT_BASE, r.PORT_STRIDE)
            return self.ports[index].read(reg) if index < len(self.ports) else 0
        if offset == r.IS:
            return self.is_
        if offset == r.GHC:
            return self.ghc | (r.GHC_HR if self._resetting else 0)
        if offset == r.CAP:
            return self.cap
        if offset == r.PI:
            return self.pi
        return r.VERSION_1_3 if offset == r.VS else 0

    def abar_write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 3:
            self._glog.warning("ahci: ignored %d-byte ABAR write at %#x (dwords only)",
                               size, offset)
            return
        if offset >= r.PORT_BASE:
            index, reg = divmod(offset - r.PORT_BASE, r.PORT_STRIDE)
            if index < len(self.ports):
                self.ports[index].write(reg, value)
                self._update_intx()
        elif offset == r.GHC:
            self._write_ghc(value)
        elif offset == r.IS:
            self.is_ &= ~value
            self._rearm()

    def _write_ghc(self, value: int) -> None:
        if value & r.GHC_HR:
            self.hba_reset()
            return
        old = self.ghc
        self.ghc = r.GHC_AE | (value & r.GHC_IE)
        if self.ghc & ~old & r.GHC_IE:
            self._rearm(all_pending=True)
        self._update_intx()

    def hba_reset(self) -> None:
        """GHC.HR: every port back to its power-on state; HR reads 1 until commands
        still in threads have ended."""
        self.ghc = r.GHC_AE
        self.is_ = 0
        for port in self.ports:
            port.power_on()
        self._resetting = any(p.inflight for p in self.ports)
        self._update_intx()

    def port_idle(self) -> None:
        """A port's last abandoned command ended."""
        if self._resetting and not any(p.inflight for p in self.ports):
            self._resetting = False

    # --- interrupts -----------------------------------------------------------------------
    def _vector(self, index: int) -> tuple[int, bool]:
        """Port ``index``'s MSI message and whether it shares it with other ports."""
        n = self.msi.vectors if self.msi is not None else 1
        if len(self.ports) <= n or index < n - 1:
            return index, False
        return n - 1, True

    def _msi_on(self) -> bool:
        return self.msi is not None and self.msi.enabled

    def port_interrupt(self, port: Port, bits: int) -> None:
        """``port`` newly set enabled PxIS ``bits``."""
        bit = 1 << port.index
        if self._msi_on():
            vector, shared = self._vector(port.index)
            if shared and self.is_ & bit:
                return  # the guest has not serviced the shared message yet
            self.is_ |= bit
            if self.ghc & r.GHC_IE:
                assert self.msi is not None
                self.msi.send(vector)
            return
        self.is_ |= bit
        self._update_intx()

    def _rearm(self, all_pending: bool = False) -> None:
        """After the guest cleared IS bits (or enabled interrupts): ports still pending
        set theirs again and interrupt again."""
        for port in self.ports:
            bit = 1 << port.index
            if port.is_ & port.ie and (all_pending or not self.is_ & bit):
                self.is_ &= ~bit
                self.port_interrupt(port, port.is_ & port.ie)
        self._update_intx()

    def _update_intx(self) -> None:
        """INTx is asserted while any IS bit is set, interrupts are on and MSI is off
        (the pin only moves when that changes: this runs after every port write)."""
        level = bool(self.is_ and self.ghc & r.GHC_IE) and not self._msi_on()
        if self.intx is None or level == self._intx_level:
            return
        self._intx_level = level
        if level:
            self.intx.assert_()
        else:
            self.intx.deassert()

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                for port in self.ports:
                    port.dispatch()
                await trio.sleep_forever()
            finally:
                self.nursery = None

    def reset(self) -> None:
        super().reset()  # the pin is idle again
        self._intx_level = False
        self.hba_reset()

    # --- the monitor's media change ------------------------------------------------------
    def change_medium(self, path: str | None, *, port: int | None = None,
                      force: bool = False) -> int:
        """Put the disc ``path`` into a CD-ROM drive, or take its disc out (None): the
        drive's port (the only CD-ROM drive unless ``port`` says which). ValueError for
        a port that has no CD-ROM drive, ConfigError for an image that cannot serve,
        RuntimeError while the guest holds the tray locked and ``force`` is not set."""
        cds = [p.index for p in self.ports if isinstance(p.drive, AtapiCd)]
        if port is None:
            if len(cds) != 1:
                raise ValueError(f"this controller has {len(cds)} CD-ROM drives "
                                 f"(ports {cds}); say which port")
            port = cds[0]
        if port not in cds:
            raise ValueError(f"port {port} has no CD-ROM drive (CD-ROM ports: {cds})")
        drive = self.ports[port].drive
        assert isinstance(drive, AtapiCd)
        image = None if path is None else DiskImage.open(path, ro=True,
                                                         who=f"{self.name} port {port}")
        drive.change_medium(image, force=force)
        log.info("%s port %d: %s", self.name, port,
                 f"disc {path} inserted" if path else "disc removed")
        return port

    def counters(self) -> dict[str, Any]:
        return {f"port{p.index}": p.counters() for p in self.ports if p.drive is not None}

    def close(self) -> None:
        try:
            for port in self.ports:
                if port.drive is not None:
                    port.drive.close()
        finally:
            super().close()


__all__ = ["Ahci", "ThreadPool", "msi_messages"]
