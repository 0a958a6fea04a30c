"""The transport-independent virtio device interface (what virtio-pci and vhost-user drive).

Contract between a transport and a device
=========================================

A *device* (``VirtioDevice`` subclass: blk, net, console, rnd) knows its queues, features
and config space. A *transport* (virtio-pci legacy/modern, vhost-user) owns everything the
driver programs: device status, feature selection, queue registers, MSI-X vectors, ISR,
config generation. Neither knows the hypervisor backend.

Static description (read any time, also before ``run``)::

    dev.device_type            virtio device type id (VIRTIO_ID_*: net 1, blk 2, console 3,
                               entropy 4)
    dev.pci_ids                PciIds: legacy/transitional and modern device id, class
                               code, subsystem vendor/device (acrn-facts §3.6)
    dev.num_queues             how many virtqueues (fixed after construction)
    dev.queue_max_size(i)      the largest size of queue i (a power of two)
    dev.device_features        offered features, 64-bit, including VIRTIO_F_VERSION_1,
                               VIRTIO_F_RING_EVENT_IDX and VIRTIO_F_RING_INDIRECT_DESC.
                               A legacy transport offers only the low 32 bits; a driver
                               that does not ack VERSION_1 gets legacy semantics
                               (the device looks at ``features & VIRTIO_F_VERSION_1``).
    dev.config_size            bytes of device-specific config space
    dev.read_config(off, n)    -> bytes, n bytes from off (beyond config_size: 0xff)
    dev.write_config(off, b)   driver writes; read-only fields are ignored
    dev.check_features(f)      at FEATURES_OK: may the driver use feature set f?

The transport keeps ``config_generation`` and bumps it whenever the device signals a
config change (``notify_config``); config reads are atomic with respect to it because the
whole device model runs on one trio thread.

Lifecycle::

    async dev.run(task_status)  a long-lived task in the VM's nursery (``await
                                nursery.start(dev.run)``); every worker the device ever
                                has runs inside it. Cancelling it stops the device.
    dev.activate(features, queues, interrupt)
                                at DRIVER_OK. ``features`` is the negotiated set,
                                ``queues`` the transport's ``Virtqueue`` objects (one per
                                queue, ``len == num_queues``; those with ``ready`` False
                                are ignored), ``interrupt`` a ``VirtioInterrupt``.
                                Synchronous; starts the workers and returns. A bad ring
                                configuration does not raise: the device calls
                                ``interrupt.needs_reset()``.
    dev.queue_notify(i)         a driver kick for queue i. Synchronous and O(1): it only
                                wakes the worker. Call it from the trio thread: from the
                                MMIO/PIO notify handler, from a task that waits on an
                                ioeventfd (``await trio.lowlevel.wait_readable(efd);
                                os.eventfd_read(efd); dev.queue_notify(i)``), or from the
                                ``--virtio_poll`` timer. Kicks before ``activate`` or for
                                unknown queues are ignored.
    dev.reset()                 at status 0 (or vhost-user RESET_OWNER / GET_VRING_BASE):
                                cancels the workers, forgets features, queues and interrupt,
                                restores device defaults. Safe in the middle of I/O: no
                                used-ring write or interrupt happens after it returns.
                                Blocking I/O already inside a worker thread cannot be
                                interrupted and may still move data into guest buffers
                                until ``dev.quiescent`` is True; a modern transport should
                                keep reading device_status back as non-zero until then
                                (the driver polls for 0), and a vhost-user back end should
                                ``await dev.wait_quiescent()`` before replying.
                                The transport resets its own ``Virtqueue`` objects.
    dev.close()                 release host resources (files, taps, sockets) at VM exit.
    dev.failure                 None, or why the device stopped (a guest protocol error).

Interrupts go back through the ``VirtioInterrupt`` the transport passed to ``activate``:
``notify_queue(i)`` (the device already applied EVENT_IDX / NO_INTERRUPT suppression via
``Virtqueue.needs_notification``: the transport just raises the vector or ISR bit 0 /
irqfd), ``notify_config()`` (transport: generation++, ISR bit 1 / config vector), and
``needs_reset()`` (transport: status |= DEVICE_NEEDS_RESET 0x40, then a config
interrupt). ``needs_reset`` is called at most once per activation, after which the device
processes nothing until ``reset``. The transport may call ``notify_config`` itself too.

Building devices: ``devicemodel.registry.create_virtio(emul, options, slot, func)`` (or
``<module>.create(options, slot, func)``) parses acrn-dm's option string, raising
``ConfigError`` that names the bad option; slot/func feed virtio-net's default MAC.
The ``-s`` names and their modules are in ``devicemodel.registry``.

Transport checklist: create ``Virtqueue(memory, i, dev.queue_max_size(i))`` per queue;
legacy PFN writes go through ``pci/legacy.legacy_ring_layout``; on DRIVER_OK call
``activate``; on status 0 call ``dev.reset()`` then ``q.reset()`` for every queue; on
``needs_reset`` set 0x40 and raise the config interrupt.

Writing a device: subclass, give ``device_type``/``pci_ids``/``name``, call
``super().__init__(num_queues, queue_sizes, features, config_size)``, keep the config
bytes in ``self.config`` (``write_config`` to accept writes), and implement
``start_workers(nursery)``, which starts this activation's tasks (typically one per ready
queue). Hooks: ``on_activate()`` (synchronous, before workers start: e.g. header size
from the features), ``on_reset()`` (restore defaults), ``close()``. Workers use
``await self.wait_kick(q)`` to sleep until the driver adds buffers (it re-enables
notifications and returns at once if buffers arrived meanwhile), ``self.signal(q)`` after
a batch of ``q.add_used``, ``self.config_changed()`` after changing config bytes, and
``await self.blocking(fn, *args)`` for blocking calls on the device's bounded thread pool
(``self.limiter``). A ``VirtqueueError`` (or any other exception) escaping a worker stops
this device only: ``failure`` is set and ``needs_reset`` is raised once.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Protocol, TypeVar

import trio

from ..ratelimit import RateLimitedLog
from .dataplane import Dataplane
from .iothread import IoThread
from .queue import Virtqueue, VirtqueueError

log = logging.getLogger(__name__)

# Device status bits (§2.1)
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Reserved feature bits (§6)
VIRTIO_F_NOTIFY_ON_EMPTY = 1 << 24
VIRTIO_F_ANY_LAYOUT = 1 << 27
VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_F_RING_PACKED = 1 << 34

# Device type ids (§5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_ENTROPY = 4

# PCI identity (acrn-facts §3.6)
VIRTIO_PCI_VENDOR = 0x1AF4
ORACLE_PCI_VENDOR = 0x108E  # subsystem vendor acrn-dm uses for blk/net with --windows
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040  # modern-only device id = 0x1040 + device type


@dataclass(frozen=True)
class PciIds:
    """What a virtio-pci transport puts in config space for this device.

    ``legacy_device_id`` is the transitional id (0x1000..0x103F) used by legacy and
    transitional functions; ``modern_device_id`` (0x1040 + type) by modern-only ones.
    ``class_code`` is the 24-bit class/subclass/prog-if. The subsystem device id is the
    virtio device type; the subsystem vendor is ``VIRTIO_PCI_VENDOR`` (or
    ``ORACLE_PCI_VENDOR`` for blk/net when ``windows_subvendor`` and ``--windows``).
    """

    legacy_device_id: int
    device_type: int
    class_code: int
    windows_subvendor: bool = False
    vendor_id: int = VIRTIO_PCI_VENDOR

    @property
    def modern_device_id(self) -> int:
        return VIRTIO_PCI_MODERN_DEVICE_BASE + self.device_type

    @property
    def subsystem_id(self) -> int:
        return self.device_type

    def subsystem_vendor(self, windows: bool = False) -> int:
        return ORACLE_PCI_VENDOR if windows and self.windows_subvendor else VIRTIO_PCI_VENDOR


class VirtioInterrupt(Protocol):
    """The transport's side of interrupts, handed to ``VirtioDevice.activate``."""

    def notify_queue(self, index: int) -> None: ...

    def notify_config(self) -> None: ...

    def needs_reset(self) -> None: ...


class Kick:
    """A level-triggered wake-up flag: ``set`` is O(1) and never blocks."""

    __slots__ = ("_pending", "_event")

    def __init__(self) -> None:
        self._pending = False
        self._event: trio.Event | None = None

    def set(self) -> None:
        self._pending = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        if not self._pending:
            self._event = trio.Event()
            try:
                await self._event.wait()
            finally:
                self._event = None
        self._pending = False


def _stop_dataplanes(s: _Session) -> None:
    for dp in s.dataplanes.values():
        dp.stop()
    s.dataplanes.clear()


class _Session:
    """One activation: its cancel scope, kicks and the event set when it has drained."""

    def __init__(self, queues: Sequence[Virtqueue], interrupt: VirtioInterrupt) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.queues = list(queues)
        self.interrupt = interrupt
        self.kicks = [Kick() for _ in queues]
        self.failed = False
        self.dataplanes: dict[int, Dataplane] = {}  # queues served on their own thread
        #: loop-served queues woken, interrupts sent again, by ``_look_after``
        self.kicked_again = self.reinterrupted = 0


T = TypeVar("T")


class VirtioDevice(ABC):
    """Base of every virtio device; see the module docstring for the contract."""

    device_type: ClassVar[int]
    pci_ids: ClassVar[PciIds]
    name: ClassVar[str] = "virtio"
    #: how long a queue served on the loop may sit idle before ``_look_after`` looks at it
    look_again_s = 0.25
    _io_thread: IoThread | None = None  # started by the first in_order() call
    _session: _Session | None = None  # the activation (a class default: close() may run
    # on a device whose __init__ failed half-way)

    def __init__(self, num_queues: int, queue_sizes: int | Sequence[int], features: int,
                 config_size: int, *, threads: int = 4) -> None:
        self.num_queues = num_queues
        if isinstance(queue_sizes, int):
            queue_sizes = [queue_sizes] * num_queues
        self._queue_sizes = list(queue_sizes)
        self.device_features = features
        self.config = bytearray(config_size)
        self.features = 0
        self.failure: str | None = None
        self.limiter = trio.CapacityLimiter(threads)
        self.glog = RateLimitedLog(log)
        self._nursery: trio.Nursery | None = None
        self._session: _Session | None = None
        self._draining: set[_Session] = set()

    # -- static description ------------------------------------------------------------

    @property
    def config_size(self) -> int:
        return len(self.config)

    def queue_max_size(self, index: int) -> int:
        return self._queue_sizes[index]

    def read_config(self, offset: int, length: int) -> bytes:
        data = bytes(self.config[offset : offset + length]) if offset >= 0 else b""
        return data + b"\xff" * (length - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver writes to device config; fields are read-only unless a device says not."""

    def check_features(self, features: int) -> bool:
        return features & ~self.device_features == 0

    def has_feature(self, bit: int) -> bool:
        return bool(self.features & bit)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host every worker this device will have; runs until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def activate(self, features: int, queues: Sequence[Virtqueue],
                 interrupt: VirtioInterrupt) -> None:
        if self._nursery is None:
            raise RuntimeError(f"{self.name}: activate() before run() started")
        if len(queues) != self.num_queues:
            raise ValueError(f"{self.name}: {len(queues)} queues given, {self.num_queues} expected")
        if self._session is not None:
            self.reset()
        self.features = features
        self.failure = None
        session = _Session(queues, interrupt)
        self._session = session
        try:
            for q in queues:
                if q.ready:
                    q.start(event_idx=bool(features & VIRTIO_F_RING_EVENT_IDX),
                            indirect=bool(features & VIRTIO_F_RING_INDIRECT_DESC))
        except VirtqueueError as e:
            self._fail(session, str(e))
            session.done.set()
            return
        self.on_activate()
        self._draining.add(session)
        self._nursery.start_soon(self._session_main, session)

    def queue_notify(self, index: int) -> None:
        s = self._session
        if s is not None and 0 <= index < len(s.kicks):
            dp = s.dataplanes.get(index)
            if dp is not None:
                dp.poke()
            else:
                s.kicks[index].set()

    def reset(self) -> None:
        s = self._session
        self._session = None
        if s is not None:
            _stop_dataplanes(s)  # they use the queues: before anything changes under them
            s.scope.cancel()
            for q in s.queues:
                q.stop()
        self.features = 0
        self.failure = None
        self.on_reset()

    @property
    def quiescent(self) -> bool:
        """No worker (nor a worker's thread) of a past activation is still running."""
        return not self._draining

    async def wait_quiescent(self) -> None:
        for s in list(self._draining):
            await s.done.wait()

    def close(self) -> None:
        """Release host resources; the default has none."""

    # -- for subclasses ----------------------------------------------------------------

    @abstractmethod
    def start_workers(self, nursery: trio.Nursery) -> None:
        """Start this activation's worker tasks in ``nursery`` (cancelled on reset)."""

    def on_activate(self) -> None:
        """Synchronous set-up at DRIVER_OK, once ``features`` and the queues are in place."""

    def on_reset(self) -> None:
        """Drop device state that lives only while the driver is active."""

    @property
    def queues(self) -> list[Virtqueue]:
        s = self._session
        return s.queues if s is not None else []

    @property
    def interrupt(self) -> VirtioInterrupt | None:
        s = self._session
        return s.interrupt if s is not None else None

    async def wait_kick(self, q: Virtqueue) -> None:
        """Sleep until the driver may have added buffers to ``q`` (kicks re-enabled first)."""
        s = self._session
        if s is None:
            await trio.sleep_forever()
        assert s is not None
        if q.enable_notification():
            await trio.lowlevel.checkpoint()
            return
        await s.kicks[q.index].wait()
        q.disable_notification()

    def signal(self, q: Virtqueue) -> None:
        """Interrupt the driver for ``q`` unless it suppressed that (EVENT_IDX/NO_INTERRUPT)."""
        s = self._session
        if s is not None and not s.failed and q.needs_notification():
            s.interrupt.notify_queue(q.index)

    def config_changed(self) -> None:
        s = self._session
        if s is not None and not s.failed:
            s.interrupt.notify_config()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call on the device's bounded thread pool.

        A reset cannot stop the thread, but it stops the caller right after: the result is
        dropped and nothing touches the rings for a cancelled activation.
        """
        result = await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        await trio.lowlevel.checkpoint_if_cancelled()
        return result

    async def in_order(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call on the device's own I/O thread, after every call handed to
        it before (cheaper than :meth:`blocking`, and ordered); same reset rule."""
        if self._io_thread is None:
            self._io_thread = IoThread(f"{self.name}-io")
        result = await self._io_thread.run(fn, *args)
        await trio.lowlevel.checkpoint_if_cancelled()
        return result

    def _interrupt_again(self, s: _Session, q: Virtqueue) -> None:
        """An interrupt for ``q`` whatever the ring's suppression says (a data plane's
        ``look_again``): the driver seems to have missed the last one."""
        if self._session is s and not s.failed:
            s.interrupt.notify_queue(q.index)

    def start_dataplane(self, q: Virtqueue, nursery: trio.Nursery,
                        serve: Callable[[Virtqueue], bool],
                        lane: Callable[[Dataplane, Callable[[], None]], bool] | None = None,
                        ) -> bool:
        """Serve ``q`` on its own thread (``dataplane.py``) if the transport hands over the
        queue's kick eventfd; False: serve it from the loop as usual. ``lane``, the
        device's own loop (``Dataplane``'s), gets the queue's interrupt as a call."""
        s = self._session
        take = getattr(s.interrupt, "take_kick_fd", None) if s is not None else None
        kick = take(q.index) if take is not None else None
        if kick is None or s is None:
            return False
        token = trio.lowlevel.current_trio_token()

        def fail(reason: str) -> None:  # on the thread: the failure is handled by the loop
            try:
                token.run_sync_soon(self._fail, s, reason)
            except trio.RunFinishedError:
                pass

        own_loop = None
        if lane is not None:
            signal = self._queue_signal(s, q)

            def own_loop(dp: Dataplane) -> bool:
                return lane(dp, signal)
        try:
            s.dataplanes[q.index] = Dataplane(f"{self.name}-q{q.index}", q, kick, serve, fail,
                                              partial(self._interrupt_again, s), own_loop)
        except BaseException:  # e.g. out of file descriptors: the activation fails
            os.close(kick)
            raise
        nursery.start_soon(trio.sleep_forever)  # the activation lasts until reset
        return True

    @staticmethod
    def _queue_signal(s: _Session, q: Virtqueue) -> Callable[[], None]:
        """``q``'s interrupt as one call, without the ring's suppression check (a hot path
        that makes that check itself): the transport's fast one where it has one."""
        fast = getattr(s.interrupt, "queue_signal", None)
        send = fast(q.index) if fast is not None else partial(s.interrupt.notify_queue, q.index)

        def signal() -> None:
            if not s.failed:
                send()
        return signal

    def stop_dataplanes(self) -> None:
        """End the current activation's data-plane threads (before closing files)."""
        if self._session is not None:
            _stop_dataplanes(self._session)

    def stop_io_thread(self) -> None:
        """Let the I/O thread finish what it was given, then end it (before closing files)."""
        if self._io_thread is not None:
            self._io_thread.close()
            self._io_thread = None

    def fail(self, reason: str) -> None:
        """Stop the current activation because the driver broke the protocol."""
        s = self._session
        if s is not None:
            self._fail(s, reason)

    # -- internals ---------------------------------------------------------------------

    def _fail(self, s: _Session, reason: str) -> None:
        if s.failed or s is not self._session:
            return
        s.failed = True
        self.failure = reason
        self.glog.warning("%s: %s; device needs reset", self.name, reason)
        _stop_dataplanes(s)
        s.scope.cancel()
        for q in s.queues:
            q.stop()
        s.interrupt.needs_reset()

    async def _look_after(self, s: _Session) -> None:
        """The loop's ``Dataplane.look_again``: every ``look_again_s``, a queue served on
        the loop whose buffers have waited untaken since the last look gets a kick (a
        driver that read a stale avail_event did not send one; for buffers that wait for
        host data, such as receive buffers, a harmless extra wake), and one whose driver
        has not taken the used buffers of a whole period (``interrupt_unheeded``) gets
        its interrupt again. A guest that lost either then pauses instead of hanging."""
        avail_seen = [-1] * len(s.queues)
        used_seen = [-1] * len(s.queues)
        while True:
            await trio.sleep(self.look_again_s)
            for i, q in enumerate(s.queues):
                if s.failed or i in s.dataplanes or not q.started:
                    continue
                if q.has_available() and q.last_avail_idx == avail_seen[i]:
                    s.kicked_again += 1
                    s.kicks[i].set()
                avail_seen[i] = q.last_avail_idx
                if q.used_idx == used_seen[i] and q.interrupt_unheeded():
                    s.reinterrupted += 1
                    self.glog.warning("%s: queue %d: the driver has not taken used buffers"
                                      " for %.2f s: interrupting again", self.name, i,
                                      self.look_again_s)
                    s.interrupt.notify_queue(i)
                used_seen[i] = q.used_idx

    async def _session_main(self, s: _Session) -> None:
        try:
            with s.scope:
                try:
                    async with trio.open_nursery() as nursery:
                        self.start_workers(nursery)
                        nursery.start_soon(self._look_after, s)
                except* VirtqueueError as eg:
                    self._fail(s, str(eg.exceptions[0]))
                except* Exception as eg:
                    log.error("%s: worker crashed", self.name, exc_info=eg.exceptions[0])
                    self._fail(s, f"internal error: {eg.exceptions[0]!r}")
        finally:
            self._draining.discard(s)
            s.done.set()
