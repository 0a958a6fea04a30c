"""The virtio-pci transport (virtio 1.2 §4.1) with acrn-dm's BAR plan (acrn-facts §3.6).

One ``VirtioPci`` wraps any ``VirtioDevice`` (the contract is in ``device.py``) and owns
what the driver programs: status, feature windows, queue registers, MSI-X vectors, ISR
and config generation.

BARs, at acrn-dm's fixed indices::

    BAR0  I/O    legacy registers; device config at 20, or 24 while MSI-X is on
    BAR1  MEM32  MSI-X table + PBA, nvq + 1 vectors (one per queue, one for config)
    BAR2  I/O    optional modern notify (4 bytes, the queue index is the data)
    BAR4  MEM64  16 KiB: common cfg 0x0000, ISR 0x1000, device cfg 0x2000, notify 0x3000

``legacy`` = BAR0 + BAR1 (acrn-dm's choice for blk/net/console/rnd), ``modern`` = BAR1 +
BAR4 (+ BAR2), ``transitional`` = all of them. MSI-X with ``--virtio_msi`` gives way to
one MSI message; INTx is always there as the last resort.

Fast paths (design.md §2): when the backend offers eventfds, each queue's notify address
is an ioeventfd (registered at DRIVER_OK with acrn-dm's address/len/datamatch, dropped at
reset, moved with the BARs; where acrn-dm picks one notify address per queue we register
every one the function has, so each interface a driver may use is fast) that a task turns
into ``queue_notify``; each MSI-X vector
is an irqfd carrying the entry's current address/data (re-registered when the guest
rewrites the entry), used only while the vector is deliverable: masked vectors go the
direct way, so the PBA keeps working. Both paths can be turned off per device
(``no_ioeventfd``, ``no_irqfd``); the trapped register writes always work too.

Reset is asynchronous at the device (a worker thread may still finish a read into guest
RAM), so after a status write of 0 device_status reads back non-zero until the device
is quiescent: a modern driver polls for 0 before it reuses its buffers.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ConfigError
from ..hsm.base import HypervisorError
from ..pci import caps
from ..pci.device import Bar, BarKind, PciDevice
from ..ratelimit import RateLimitedLog
from .device import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from .queue import Virtqueue, legacy_ring_layout

if TYPE_CHECKING:
    from ..context import VmContext
    from ..slot import SlotConfig

log = logging.getLogger(__name__)

NO_VECTOR = 0xFFFF
_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}

# BAR indices (acrn-dm's fixed plan)
LEGACY_BAR = 0
MSIX_BAR = 1
PIO_NOTIFY_BAR = 2
MODERN_BAR = 4

# modern MMIO BAR layout
MODERN_BAR_SIZE = 0x4000
REGION_SIZE = 0x1000
COMMON_OFF = 0x0000
ISR_OFF = 0x1000
DEVICE_OFF = 0x2000
NOTIFY_OFF = 0x3000
NOTIFY_MULTIPLIER = 4
PIO_NOTIFY_SIZE = 4

# legacy register block (virtio 0.9.5 / §4.1.4.8)
L_HOST_FEATURES = 0
L_GUEST_FEATURES = 4
L_QUEUE_PFN = 8
L_QUEUE_NUM = 12
L_QUEUE_SEL = 14
L_QUEUE_NOTIFY = 16
L_STATUS = 18
L_ISR = 19
L_MSIX_CONFIG = 20
L_MSIX_QUEUE = 22
LEGACY_CONFIG_NOMSIX = 20
LEGACY_CONFIG_MSIX = 24
LEGACY_PFN_SHIFT = 12
LEGACY_VRING_ALIGN = 4096
_LEGACY_SIZES = {L_HOST_FEATURES: 4, L_GUEST_FEATURES: 4, L_QUEUE_PFN: 4, L_QUEUE_NUM: 2,
                 L_QUEUE_SEL: 2, L_QUEUE_NOTIFY: 2, L_STATUS: 1, L_ISR: 1,
                 L_MSIX_CONFIG: 2, L_MSIX_QUEUE: 2}

# common configuration structure (§4.1.4.3)
C_DFSELECT = 0
C_DF = 4
C_GFSELECT = 8
C_GF = 12
C_MSIX = 16
C_NUMQ = 18
C_STATUS = 20
C_CFGGEN = 21
C_Q_SELECT = 22
C_Q_SIZE = 24
C_Q_MSIX = 26
C_Q_ENABLE = 28
C_Q_NOFF = 30
C_Q_DESCLO = 32
C_Q_DESCHI = 36
C_Q_AVAILLO = 40
C_Q_AVAILHI = 44
C_Q_USEDLO = 48
C_Q_USEDHI = 52
COMMON_CFG_SIZE = 56
_COMMON_SIZES = {C_DFSELECT: 4, C_DF: 4, C_GFSELECT: 4, C_GF: 4, C_MSIX: 2, C_NUMQ: 2,
                 C_STATUS: 1, C_CFGGEN: 1, C_Q_SELECT: 2, C_Q_SIZE: 2, C_Q_MSIX: 2,
                 C_Q_ENABLE: 2, C_Q_NOFF: 2, C_Q_DESCLO: 4, C_Q_DESCHI: 4, C_Q_AVAILLO: 4,
                 C_Q_AVAILHI: 4, C_Q_USEDLO: 4, C_Q_USEDHI: 4}
_RING_FIELDS = {C_Q_DESCLO: ("desc_addr", 0), C_Q_DESCHI: ("desc_addr", 32),
                C_Q_AVAILLO: ("avail_addr", 0), C_Q_AVAILHI: ("avail_addr", 32),
                C_Q_USEDLO: ("used_addr", 0), C_Q_USEDHI: ("used_addr", 32)}

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

# virtio_pci_cfg_cap field offsets inside the capability
_PCICFG_BAR = 4
_PCICFG_OFFSET = 8
_PCICFG_LENGTH = 12
_PCICFG_DATA = 16


class Mode(enum.Enum):
    """Which register interfaces the function exposes."""

    LEGACY = "legacy"
    MODERN = "modern"
    TRANSITIONAL = "transitional"

    @property
    def has_legacy(self) -> bool:
        return self is not Mode.MODERN

    @property
    def has_modern(self) -> bool:
        return self is not Mode.LEGACY


@dataclass(frozen=True)
class TransportOptions:
    """Transport choices that ride along in a device's ``-s`` options."""

    mode: Mode = Mode.LEGACY
    pio_notify: bool = False
    ioeventfd: bool = True
    irqfd: bool = True


TRANSPORT_TOKENS = ("legacy", "modern", "transitional", "pio_notify", "no_ioeventfd",
                    "no_irqfd")


def split_transport_options(emul: str, text: str,
                            default: Mode = Mode.LEGACY) -> tuple[TransportOptions, str]:
    """Take the transport's tokens out of ``-s`` options; the rest goes to the device.

    ``legacy`` / ``modern`` / ``transitional`` pick the register interfaces (default:
    acrn-dm's choice for the device), ``pio_notify`` adds the modern PIO notify BAR2,
    ``no_ioeventfd`` / ``no_irqfd`` force the trapped notify / direct-inject paths.
    """
    modes: list[Mode] = []
    flags: set[str] = set()
    rest: list[str] = []
    for tok in text.split(",") if text else []:
        if tok in ("legacy", "modern", "transitional"):
            modes.append(Mode(tok))
        elif tok in TRANSPORT_TOKENS:
            flags.add(tok)
        else:
            rest.append(tok)
    if len(set(modes)) > 1:
        raise ConfigError(f"{emul}: {' and '.join(m.value for m in modes)} exclude each "
                          "other; pick one of legacy, modern, transitional")
    mode = modes[0] if modes else default
    if "pio_notify" in flags and not mode.has_modern:
        raise ConfigError(f"{emul}: pio_notify needs the modern interface "
                          "(add modern or transitional)")
    opts = TransportOptions(mode, "pio_notify" in flags, "no_ioeventfd" not in flags,
                            "no_irqfd" not in flags)
    return opts, ",".join(rest)


@dataclass(frozen=True)
class _IoEventReg:
    fd: int
    address: int
    length: int
    pio: bool
    datamatch: int | None


class VirtioPci(PciDevice):
    """A virtio device on PCI. See the module docstring for the register map."""

    def __init__(self, ctx: VmContext, slot: SlotConfig | None, device: VirtioDevice,
                 opts: TransportOptions | None = None, *, msix: bool | None = None,
                 poll_ns: int | None = None) -> None:
        super().__init__(ctx, slot)
        opts = opts or TransportOptions()
        self.device = device
        self.opts = opts
        self.mode = opts.mode
        self.name = device.name
        cfg = ctx.config
        if msix is None:
            msix = not getattr(cfg, "virtio_msi", False)
        self.poll_ns = poll_ns if poll_ns is not None else getattr(cfg, "virtio_poll", None)
        nq = device.num_queues
        if self.mode.has_modern and not device.device_features & VIRTIO_F_VERSION_1:
            raise ConfigError(f"{device.name}: the modern interface needs VIRTIO_F_VERSION_1")
        if self.mode.has_modern and device.config_size > REGION_SIZE:
            raise ConfigError(f"{device.name}: device config larger than {REGION_SIZE} bytes")
        ids = device.pci_ids
        windows = bool(getattr(cfg, "windows", False))
        modern_only = self.mode is Mode.MODERN
        self.cfg.set_ids(ids.vendor_id,
                         ids.modern_device_id if modern_only else ids.legacy_device_id,
                         ids.class_code, revision=1 if modern_only else 0,
                         subsys_vendor=ids.subsystem_vendor(windows),
                         subsys_id=ids.subsystem_id)
        self.rlog = RateLimitedLog(log)

        # --- transport state ------------------------------------------------------------
        self.queues = [Virtqueue(ctx.memory, i, device.queue_max_size(i)) for i in range(nq)]
        self.queue_vectors = [NO_VECTOR] * nq
        self._pfn = [0] * nq
        self.status = 0
        self.isr = 0
        self.config_generation = 0
        self.config_vector = NO_VECTOR
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.active = False
        self._activate_pending = False
        self._drain_status: int | None = None
        self._device_started = False
        self._legacy_driver = False

        # --- interrupts: MSI-X (BAR1), one MSI message, INTx (acrn-dm's virtio_intr_init)
        if msix:
            self.add_msix(nq + 1, bar=MSIX_BAR)
        self.add_msi(1)
        self.request_intx()

        # --- register BARs and capabilities (acrn-dm's order) --------------------------
        if self.mode.has_legacy:
            self.add_bar(LEGACY_BAR, BarKind.IO, LEGACY_CONFIG_MSIX + device.config_size,
                         read=self._legacy_read, write=self._legacy_write)
        self._pcicfg_cap = 0
        if self.mode.has_modern:
            if opts.pio_notify:
                self.add_capability(caps.virtio_cap(
                    caps.VIRTIO_PCI_CAP_NOTIFY_CFG, PIO_NOTIFY_BAR, 0, PIO_NOTIFY_SIZE,
                    notify_off_multiplier=0))
                self.add_bar(PIO_NOTIFY_BAR, BarKind.IO, PIO_NOTIFY_SIZE,
                             read=self._pio_notify_read, write=self._pio_notify_write)
            for cfg_type, off in ((caps.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF),
                                  (caps.VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF),
                                  (caps.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFF)):
                self.add_capability(caps.virtio_cap(cfg_type, MODERN_BAR, off, REGION_SIZE))
            self.add_capability(caps.virtio_cap(
                caps.VIRTIO_PCI_CAP_NOTIFY_CFG, MODERN_BAR, NOTIFY_OFF, REGION_SIZE,
                notify_off_multiplier=NOTIFY_MULTIPLIER))
            self._pcicfg_cap = self.add_capability(
                caps.virtio_cap(caps.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0))
            self.watch_config(self._pcicfg_cap + _PCICFG_DATA, 4,
                              on_read=self._pcicfg_read, on_write=self._pcicfg_write)
            self.add_bar(MODERN_BAR, BarKind.MEM64, MODERN_BAR_SIZE,
                         read=self._modern_read, write=self._modern_write)

        # --- fast paths -----------------------------------------------------------------
        fast = ctx.irq.supports_eventfds
        self._kick_fds: list[int] = []
        if fast and opts.ioeventfd:
            self._kick_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                              for _ in range(nq)]
        self._ioevents: set[_IoEventReg] = set()
        self._irq_fds: list[int] = []
        self._irq_routes: list[tuple[int, int] | None] = []
        if fast and opts.irqfd and self.msix is not None:
            n = self.msix.entries
            self._irq_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
            self._irq_routes = [None] * n
            bar = self.bar(MSIX_BAR)
            assert bar is not None and bar.writer is not None
            table_write = bar.writer

            def msix_write(offset: int, size: int, value: int) -> None:
                table_write(offset, size, value)
                self._msix_entry_written(offset // 16)

            bar.writer = msix_write
        self.irqfd_sent = 0

    # ================================================================================
    # lifecycle
    # ================================================================================
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.device.run)
            self._device_started = True
            if self._activate_pending:
                self._activate_pending = False
                self._activate()
            for i, fd in enumerate(self._kick_fds):
                nursery.start_soon(self._kick_waiter, i, fd)
            if self.poll_ns:
                nursery.start_soon(self._poll_loop, self.poll_ns / 1e9)

    async def _kick_waiter(self, index: int, fd: int) -> None:
        dev = self.device
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            dev.queue_notify(index)

    async def _poll_loop(self, interval: float) -> None:
        """``--virtio_poll``: kick every queue periodically, the driver need not notify."""
        dev = self.device
        while True:
            await trio.sleep(interval)
            if self.active:
                for i in range(len(self.queues)):
                    dev.queue_notify(i)

    @property
    def rescan(self) -> Callable[..., Any]:
        """The device's image swap (the monitor's ``blkrescan``); absent if it has none."""
        fn = getattr(self.device, "rescan", None)
        if fn is None:
            raise AttributeError(f"{self.name} cannot swap its backend")
        return fn

    def reset(self) -> None:
        """VM reset: power-on config space and BARs, and the virtio device reset."""
        self._reset_device()
        self._drain_status = None
        for v, route in enumerate(self._irq_routes):
            if route is not None:  # the table goes back to all-masked: drop the routes
                self._irqfd_deassign(v)
        super().reset()

    def close(self) -> None:
        self._set_ioevents(set())
        for v, route in enumerate(self._irq_routes):
            if route is not None:
                self._irqfd_deassign(v)
        for fd in self._kick_fds + self._irq_fds:
            try:
                trio.lowlevel.notify_closing(fd)
            except RuntimeError:
                pass  # not inside trio (lspci builds without running)
            os.close(fd)
        self._kick_fds = []
        self._irq_fds = []
        self._irq_routes = []
        self.device.close()

    # ================================================================================
    # status, features, activation, reset
    # ================================================================================
    def _read_status(self) -> int:
        if self._drain_status is not None:
            if not self.device.quiescent:
                return self._drain_status
            self._drain_status = None
        return self.status

    def _write_status(self, value: int, modern: bool) -> None:
        value &= 0xFF
        if value == 0:
            self._reset_device()
            return
        self._drain_status = None
        old = self.status
        new = (value & ~STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET)
        if (modern and new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK
                and not self._features_acceptable()):
            new &= ~STATUS_FEATURES_OK
        self.status = new
        if new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            if modern and not new & STATUS_FEATURES_OK:
                self.rlog.warning("%s: DRIVER_OK without FEATURES_OK; device needs reset",
                                  self.name)
                self.needs_reset()
                return
            self._legacy_driver = not modern
            if self._device_started:
                self._activate()
            else:
                self._activate_pending = True

    def _features_acceptable(self) -> bool:
        f = self.driver_features
        if not f & VIRTIO_F_VERSION_1:
            return False
        try:
            return bool(self.device.check_features(f))
        except Exception:
            log.exception("%s: check_features failed", self.name)
            return False

    def _negotiated(self) -> int:
        if self._legacy_driver:
            return self.driver_features & self.device.device_features & 0xFFFF_FFFF
        return self.driver_features

    def _activate(self) -> None:
        if not self.status & STATUS_DRIVER_OK or self.active:
            return
        self.active = True
        try:
            self.device.activate(self._negotiated(), self.queues, self)
        except Exception:
            log.exception("%s: activation failed", self.name)
            self.needs_reset()
            return
        self._sync_ioevents()

    def _reset_device(self) -> None:
        """Status 0: the device forgets everything the driver programmed."""
        old = self.status
        self.active = False
        self._activate_pending = False
        self.device.reset()
        for q in self.queues:
            q.reset()
        self._set_ioevents(set())
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        self._pfn = [0] * len(self.queues)
        self.config_vector = NO_VECTOR
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0
        self._legacy_driver = False
        if self.isr:
            self.isr = 0
            if self.intx is not None:
                self.intx.deassert()
        self.status = 0
        if not self.device.quiescent:
            prev = self._drain_status
            self._drain_status = old or prev or STATUS_DRIVER_OK
        else:
            self._drain_status = None

    # ================================================================================
    # interrupts (the VirtioInterrupt the device gets at activate)
    # ================================================================================
    def notify_queue(self, index: int) -> None:
        msix = self.msix
        if msix is not None and msix.enabled:
            v = self.queue_vectors[index]
            if v != NO_VECTOR:
                self._send_vector(v)
            return
        self.isr |= ISR_QUEUE
        self._legacy_interrupt()

    def notify_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.isr |= ISR_CONFIG
        msix = self.msix
        if msix is not None and msix.enabled:
            if self.config_vector != NO_VECTOR:
                self._send_vector(self.config_vector)
            return
        self._legacy_interrupt()

    def needs_reset(self) -> None:
        self.status |= STATUS_DEVICE_NEEDS_RESET
        self.notify_config()

    def _legacy_interrupt(self) -> None:
        msi = self.msi
        if msi is not None and msi.enabled:
            msi.send(0)
        elif self.intx is not None:
            self.intx.assert_()

    def _send_vector(self, v: int) -> None:
        msix = self.msix
        assert msix is not None
        if self._irq_fds and v < len(self._irq_fds) and not msix.function_masked \
                and not msix.masked(v):
            route = self._irq_routes[v]
            addr, data, _ = msix.entry(v)
            if route != (addr, data):
                self._irqfd_assign(v, addr, data)
            if self._irq_routes[v] is not None:
                try:
                    os.eventfd_write(self._irq_fds[v], 1)
                    self.irqfd_sent += 1
                    return
                except OSError:
                    pass
        msix.send(v)

    def _irqfd_assign(self, v: int, addr: int, data: int) -> None:
        if self._irq_routes[v] is not None:
            self._irqfd_deassign(v)
        try:
            assert self.ctx is not None
            self.ctx.irq.irqfd(self._irq_fds[v], addr, data)
        except HypervisorError as e:
            self.rlog.warning("%s: irqfd for vector %d failed (%s); injecting directly",
                              self.name, v, e)
            return
        self._irq_routes[v] = (addr, data)

    def _irqfd_deassign(self, v: int) -> None:
        route = self._irq_routes[v]
        self._irq_routes[v] = None
        if route is None:
            return
        try:
            assert self.ctx is not None
            self.ctx.irq.irqfd(self._irq_fds[v], route[0], route[1], deassign=True)
        except HypervisorError as e:
            self.rlog.warning("%s: irqfd deassign for vector %d failed: %s", self.name, v, e)

    def _msix_entry_written(self, v: int) -> None:
        """The guest rewrote MSI-X entry ``v``: move its irqfd to the new message."""
        msix = self.msix
        if msix is None or not 0 <= v < len(self._irq_routes):
            return
        route = self._irq_routes[v]
        if route is None or msix.masked(v):
            return
        addr, data, _ = msix.entry(v)
        if route != (addr, data):
            self._irqfd_assign(v, addr, data)

    def _read_isr(self) -> int:
        value = self.isr
        self.isr = 0
        if value and self.intx is not None:
            self.intx.deassert()
        return value

    # ================================================================================
    # ioeventfds
    # ================================================================================
    def on_bar_map(self, bar: Bar, base: int) -> None:
        self._sync_ioevents()

    def on_bar_unmap(self, bar: Bar, base: int) -> None:
        self._sync_ioevents()

    def _wanted_ioevents(self) -> set[_IoEventReg]:
        want: set[_IoEventReg] = set()
        if not self.active or not self._kick_fds:
            return want
        legacy = self.bar(LEGACY_BAR) if self.mode.has_legacy else None
        pio = self.bar(PIO_NOTIFY_BAR) if self.opts.pio_notify else None
        mmio = self.bar(MODERN_BAR) if self.mode.has_modern else None
        for q, fd in enumerate(self._kick_fds):
            if legacy is not None and legacy.mapped_at is not None:
                want.add(_IoEventReg(fd, legacy.mapped_at + L_QUEUE_NOTIFY, 2, True, q))
            if pio is not None and pio.mapped_at is not None:
                want.add(_IoEventReg(fd, pio.mapped_at, 2, True, q))
            if mmio is not None and mmio.mapped_at is not None:
                addr = mmio.mapped_at + NOTIFY_OFF + NOTIFY_MULTIPLIER * q
                want.add(_IoEventReg(fd, addr, 2, False, None))
        return want

    def _sync_ioevents(self) -> None:
        self._set_ioevents(self._wanted_ioevents())

    def _set_ioevents(self, want: set[_IoEventReg]) -> None:
        if self.ctx is None or want == self._ioevents:
            return
        irq = self.ctx.irq
        for r in self._ioevents - want:
            try:
                irq.ioeventfd(r.fd, r.address, r.length, pio=r.pio, datamatch=r.datamatch,
                              deassign=True)
            except HypervisorError as e:
                self.rlog.warning("%s: ioeventfd deassign at %#x failed: %s", self.name,
                                  r.address, e)
            self._ioevents.discard(r)
        for r in want - self._ioevents:
            try:
                irq.ioeventfd(r.fd, r.address, r.length, pio=r.pio, datamatch=r.datamatch)
            except HypervisorError as e:
                # the trapped notify register still works: only the fast path is lost
                self.rlog.warning("%s: ioeventfd at %#x failed: %s", self.name, r.address, e)
                continue
            self._ioevents.add(r)

    # ================================================================================
    # queue helpers
    # ================================================================================
    def _sel(self) -> Virtqueue | None:
        sel = self.queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def _vector_value(self, value: int) -> int:
        msix = self.msix
        if msix is None or value >= msix.entries:
            return NO_VECTOR
        return value

    def _kick(self, index: int) -> None:
        if 0 <= index < len(self.queues):
            self.device.queue_notify(index)

    # ================================================================================
    # device-specific config
    # ================================================================================
    def _config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.device.config_size:
            return _ONES[size]
        return int.from_bytes(self.device.read_config(offset, size), "little")

    def _config_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.device.config_size:
            return
        self.device.write_config(offset, value.to_bytes(size, "little"))

    # ================================================================================
    # legacy BAR0
    # ================================================================================
    def _legacy_config_start(self) -> int:
        msix = self.msix
        return LEGACY_CONFIG_MSIX if msix is not None and msix.enabled else LEGACY_CONFIG_NOMSIX

    def _legacy_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4):
            return _ONES.get(size, 0xFFFF_FFFF)
        start = self._legacy_config_start()
        if offset >= start:
            return self._config_read(offset - start, size)
        if _LEGACY_SIZES.get(offset) != size:
            return _ONES[size]
        q = self._sel()
        if offset == L_HOST_FEATURES:
            return self.device.device_features & 0xFFFF_FFFF
        if offset == L_GUEST_FEATURES:
            return self.driver_features & 0xFFFF_FFFF
        if offset == L_QUEUE_PFN:
            return self._pfn[self.queue_sel] if q is not None else 0
        if offset == L_QUEUE_NUM:
            return q.max_size if q is not None else 0
        if offset == L_QUEUE_SEL:
            return self.queue_sel
        if offset == L_STATUS:
            return self._read_status()
        if offset == L_ISR:
            return self._read_isr()
        if offset == L_MSIX_CONFIG:
            return self.config_vector
        if offset == L_MSIX_QUEUE:
            return self.queue_vectors[self.queue_sel] if q is not None else NO_VECTOR
        return 0  # queue notify reads

    def _legacy_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            return
        start = self._legacy_config_start()
        if offset >= start:
            self._config_write(offset - start, size, value)
            return
        if _LEGACY_SIZES.get(offset) != size:
            return
        if offset == L_QUEUE_NOTIFY:
            self._kick(value)
        elif offset == L_GUEST_FEATURES:
            if not self.status & STATUS_DRIVER_OK:
                self.driver_features = value & self.device.device_features & 0xFFFF_FFFF
        elif offset == L_QUEUE_PFN:
            self._legacy_set_pfn(value)
        elif offset == L_QUEUE_SEL:
            self.queue_sel = value
        elif offset == L_STATUS:
            self._write_status(value, modern=False)
        elif offset == L_MSIX_CONFIG:
            self.config_vector = self._vector_value(value)
        elif offset == L_MSIX_QUEUE and self.queue_sel < len(self.queues):
            self.queue_vectors[self.queue_sel] = self._vector_value(value)

    def _legacy_set_pfn(self, pfn: int) -> None:
        q = self._sel()
        if q is None or self.active:
            return
        self._pfn[self.queue_sel] = pfn
        if pfn == 0:
            q.ready = False
            q.desc_addr = q.avail_addr = q.used_addr = 0
            return
        q.size = q.max_size
        q.desc_addr, q.avail_addr, q.used_addr = legacy_ring_layout(
            pfn << LEGACY_PFN_SHIFT, q.size, LEGACY_VRING_ALIGN)
        q.ready = True

    # ================================================================================
    # modern BAR4 (and the PIO notify BAR2)
    # ================================================================================
    def _modern_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4):
            return _ONES.get(size, 0xFFFF_FFFF)
        if offset < ISR_OFF:
            return self._common_read(offset, size)
        if offset < DEVICE_OFF:
            return self._read_isr() if offset == ISR_OFF else 0
        if offset < NOTIFY_OFF:
            return self._config_read(offset - DEVICE_OFF, size)
        return 0

    def _modern_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            return
        if offset >= NOTIFY_OFF:
            rel = offset - NOTIFY_OFF
            if rel % NOTIFY_MULTIPLIER == 0:
                self._kick(rel // NOTIFY_MULTIPLIER)
        elif offset >= DEVICE_OFF:
            self._config_write(offset - DEVICE_OFF, size, value)
        elif offset < ISR_OFF:
            self._common_write(offset, size, value)

    def _pio_notify_read(self, offset: int, size: int) -> int:
        return 0

    def _pio_notify_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size in (1, 2, 4):
            self._kick(value)

    def _common_read(self, offset: int, size: int) -> int:
        if _COMMON_SIZES.get(offset) != size:
            return _ONES[size] if offset < COMMON_CFG_SIZE else 0
        q = self._sel()
        if offset == C_DFSELECT:
            return self.device_feature_select
        if offset == C_DF:
            sel = self.device_feature_select
            return (self.device.device_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        if offset == C_GFSELECT:
            return self.driver_feature_select
        if offset == C_GF:
            sel = self.driver_feature_select
            return (self.driver_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        if offset == C_MSIX:
            return self.config_vector
        if offset == C_NUMQ:
            return len(self.queues)
        if offset == C_STATUS:
            return self._read_status()
        if offset == C_CFGGEN:
            return self.config_generation
        if offset == C_Q_SELECT:
            return self.queue_sel
        if q is None:
            return NO_VECTOR if offset == C_Q_MSIX else 0
        if offset == C_Q_SIZE:
            return q.size
        if offset == C_Q_MSIX:
            return self.queue_vectors[q.index]
        if offset == C_Q_ENABLE:
            return 1 if q.ready else 0
        if offset == C_Q_NOFF:
            return q.index
        name, shift = _RING_FIELDS[offset]
        return (getattr(q, name) >> shift) & 0xFFFF_FFFF

    def _common_write(self, offset: int, size: int, value: int) -> None:
        if _COMMON_SIZES.get(offset) != size:
            return
        if offset == C_DFSELECT:
            self.device_feature_select = value
        elif offset == C_GFSELECT:
            self.driver_feature_select = value
        elif offset == C_GF:
            sel = self.driver_feature_select
            if sel < 2 and not self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK):
                shift = 32 * sel
                mask = 0xFFFF_FFFF << shift
                self.driver_features = (self.driver_features & ~mask) | (value << shift)
        elif offset == C_MSIX:
            self.config_vector = self._vector_value(value)
        elif offset == C_STATUS:
            self._write_status(value, modern=True)
        elif offset == C_Q_SELECT:
            self.queue_sel = value
        else:
            self._queue_write(offset, value)

    def _queue_write(self, offset: int, value: int) -> None:
        q = self._sel()
        if q is None:
            return
        if offset == C_Q_MSIX:
            self.queue_vectors[q.index] = self._vector_value(value)
            return
        if q.ready or self.active:
            return  # §4.1.4.3.2: no queue changes once the queue is enabled
        if offset == C_Q_SIZE:
            q.size = value
        elif offset == C_Q_ENABLE:
            if value == 1:
                q.ready = True
        elif offset in _RING_FIELDS:
            name, shift = _RING_FIELDS[offset]
            mask = 0xFFFF_FFFF << shift
            setattr(q, name, (getattr(q, name) & ~mask) | (value << shift))

    # ================================================================================
    # VIRTIO_PCI_CAP_PCI_CFG: BAR access through a config-space window
    # ================================================================================
    def _pcicfg_target(self) -> tuple[Bar, int, int] | None:
        cap = self._pcicfg_cap
        bar = self.bar(self.cfg.get8(cap + _PCICFG_BAR)) if self.cfg.get8(
            cap + _PCICFG_BAR) <= 5 else None
        offset = self.cfg.get32(cap + _PCICFG_OFFSET)
        length = self.cfg.get32(cap + _PCICFG_LENGTH)
        if bar is None or length not in (1, 2, 4) or offset % length \
                or offset + length > bar.size:
            return None
        return bar, offset, length

    def _pcicfg_read(self, reg: int, size: int) -> None:
        target = self._pcicfg_target()
        if target is None:
            return
        bar, offset, length = target
        self.cfg.set32(self._pcicfg_cap + _PCICFG_DATA, bar.read(offset, length))

    def _pcicfg_write(self, reg: int, size: int) -> None:
        target = self._pcicfg_target()
        if target is None:
            return
        bar, offset, length = target
        bar.write(offset, length, self.cfg.get32(self._pcicfg_cap + _PCICFG_DATA)
                  & _ONES[length])


__all__ = ["Mode", "TransportOptions", "VirtioPci", "split_transport_options", "NO_VECTOR"]
