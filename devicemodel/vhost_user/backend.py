"""One vhost-user session: the front end's requests applied to one of our ``VirtioDevice``s.

The front end (QEMU) owns the PCI function, the driver's status and feature registers;
we own the rings. Requests arrive on one socket and are handled strictly in order in one
task, so ring state never races. The device is (re)activated once the front end's burst of
ring setup has gone quiet (a few ms without a message): QEMU starts rings one message at
a time, and activating per message would restart the device's workers again and again.

Ring states (vhost-user.rst "Ring states"): a ring is *started* by SET_VRING_KICK and
stopped by GET_VRING_BASE; *enabled* by SET_VRING_ENABLE (or from the start when protocol
features were not negotiated). The device sees a ring as ``ready`` when it is started and
enabled. Kick eventfds wake ``queue_notify``, unless the device serves the ring on a
data-plane thread (virtio/dataplane.py), which then waits on a duplicate of the kick fd
itself; the device's interrupts write the ring's call eventfd (looked up at each interrupt,
under the ring's fd lock, since QEMU swaps call fds when the guest masks a vector).

Every kick, call and err fd goes through ``peerfd``: refused unless it is an eventfd (or a
pipe or socket), made non-blocking, read and written only in ways that cannot block, so a
front end cannot freeze us with a full or saturated fd (a signal that cannot be written is
dropped: the front end already has one pending).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .. import peerfd
from ..memory import GuestMemoryError
from ..ratelimit import RateLimitedLog
from ..virtio.device import VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VirtioDevice
from ..virtio.queue import MAX_QUEUE_SIZE, Virtqueue
from . import protocol as p
from .connection import Connection, Disconnected, Message
from .memory import VhostMemoryMap
from .protocol import ProtocolError, Req

log = logging.getLogger(__name__)

#: Protocol features we offer (CONFIG only for devices with a config space). No dirty
#: logging, postcopy, in-band notifications, backend channel or memory slots: QEMU falls
#: back to the basic protocol for each of them.
PROTOCOL_FEATURES = (
    1 << p.PROTOCOL_F_MQ
    | 1 << p.PROTOCOL_F_REPLY_ACK
    | 1 << p.PROTOCOL_F_RESET_DEVICE
)
#: How long the message stream must be quiet before ring changes take effect.
SETTLE_S = 0.005
#: Ring polling interval for a front end that passes no kick fd (VRING_NOFD).
POLL_S = 0.001


@dataclass
class Vring:
    """What the front end told us about one ring (addresses are its user addresses)."""

    index: int
    num: int = 0
    addr: p.VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    polling: bool = False
    watcher: trio.CancelScope | None = None
    #: held while the call/err fds change or are written: a data-plane thread signals
    #: them while the loop may be replacing them (a closed fd's number can be reused)
    fd_lock: threading.Lock = field(default_factory=threading.Lock)

    def close_fds(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
        if self.kick_fd is not None:
            trio.lowlevel.notify_closing(self.kick_fd)  # its watcher may be waiting on it
        with self.fd_lock:
            for name in ("kick_fd", "call_fd", "err_fd"):
                fd = getattr(self, name)
                if fd is not None:
                    os.close(fd)
                    setattr(self, name, None)

    def signal(self, name: str) -> peerfd.Sent | None:
        """Write the call or err fd (never blocks); None when the ring has none."""
        with self.fd_lock:
            fd = getattr(self, name)
            if fd is None:
                return None
            return peerfd.signal_fd(fd)


class VhostInterrupt:
    """The ``VirtioInterrupt`` of a vhost-user device: interrupts are call eventfd writes."""

    def __init__(self, backend: VhostUserBackend) -> None:
        self._backend = backend
        self._signals: dict[int, Callable[[], None]] = {}

    def notify_queue(self, index: int) -> None:
        signal = self._signals.get(index)
        if signal is None:
            signal = self._signals[index] = self.queue_signal(index)
        signal()

    def queue_signal(self, index: int) -> Callable[[], None]:
        """Ring ``index``'s interrupt as one call: the call fd written under its lock (a
        data-plane thread's hot path calls it directly)."""
        ring = self._backend.rings[index]
        lock, dropped, signal_fd, sent_ok = (ring.fd_lock, self._backend.signal_dropped,
                                             peerfd.signal_fd, peerfd.Sent.SENT)

        def signal() -> None:
            with lock:
                fd = ring.call_fd
                if fd is None:
                    return
                sent = signal_fd(fd)
            if sent is not sent_ok:
                dropped(index, "call", sent)
        return signal

    def take_kick_fd(self, index: int) -> int | None:
        """Hand the device a duplicate of ring ``index``'s kick eventfd for a data-plane
        thread, and stop watching it here (``None``: the ring is polled, no fd)."""
        ring = self._backend.rings[index]
        if ring.kick_fd is None:
            return None
        if ring.watcher is not None:
            ring.watcher.cancel()
            ring.watcher = None
        return os.dup(ring.kick_fd)

    def notify_config(self) -> None:
        # A config interrupt needs the back-end request channel, which we do not offer;
        # QEMU re-reads config with GET_CONFIG when the guest asks.
        self._backend.glog.warning("%s: config change not signalled (no backend channel)",
                                   self._backend.device.name)

    def needs_reset(self) -> None:
        for ring in self._backend.rings:
            sent = ring.signal("err_fd")
            if sent is not None and sent is not peerfd.Sent.SENT:
                self._backend.signal_dropped(ring.index, "err", sent)


class VhostUserBackend:
    """Serves one ``VirtioDevice`` to one front end at a time (``serve`` per connection).

    The device's ``run`` task must already be running (the server starts it once, so a
    reconnecting front end finds the same device).
    """

    def __init__(self, device: VirtioDevice) -> None:
        self.device = device
        self.glog = RateLimitedLog(log)
        self.rings = [Vring(i) for i in range(device.num_queues)]
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.mem: VhostMemoryMap | None = None
        self.queues: list[Virtqueue] | None = None  # the active activation's queues
        self._active_sig: tuple[object, ...] | None = None
        self._dirty = False
        self._nursery: trio.Nursery | None = None
        self.interrupt = VhostInterrupt(self)
        self.messages = 0
        #: signals not written, by outcome (peerfd.Sent name): the front end's fd was full
        #: ("pending"), blocked by the front end ("blocked") or broken ("failed")
        self.dropped_signals: dict[str, int] = {}
        self._fault_fd = -1  # memguard's wake-up while a front end is served

    def signal_dropped(self, index: int, which: str, sent: peerfd.Sent) -> None:
        """A call/err signal that was not written (any thread; counted, logged rarely)."""
        self.dropped_signals[sent.value] = self.dropped_signals.get(sent.value, 0) + 1
        if sent is not peerfd.Sent.PENDING:  # a full fd is normal: a wake-up is pending
            self.glog.warning("%s: ring %d: %s signal not delivered (%s by the front end)",
                              self.device.name, index, which, sent.value)

    def ring_report(self) -> list[str]:
        """Each ring's state as both sides left it (``Virtqueue.describe``), the fds it
        has and the signals that were not written: what a stall needs to be placed."""
        name = self.device.name
        queues = self.queues
        if queues is None:
            return [f"{name}: no rings running (features {self.features:#x})"]
        lines = []
        for ring, q in zip(self.rings, queues, strict=False):
            fds = " ".join(f"{fd}={'-' if getattr(ring, fd + '_fd') is None else 'yes'}"
                           for fd in ("kick", "call"))
            lines.append(f"{name}: {q.describe()}; enabled {int(ring.enabled)}, {fds}")
        lines.append(f"{name}: signals not written: {self.dropped_signals or 'none'}")
        return lines

    # -- the connection ----------------------------------------------------------------

    async def serve(self, conn: Connection) -> None:
        """Handle requests until the front end disconnects or misbehaves; then reset all."""
        self._fault_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_memory, self._fault_fd, nursery.cancel_scope)
                try:
                    await self._loop(conn)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            await self._reset_all()
            fd, self._fault_fd = self._fault_fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    async def _watch_memory(self, fd: int, scope: trio.CancelScope) -> None:
        """A mapped region of the front end's memory shrank under us (memguard patched the
        page with zeros): the device fails (DEVICE_NEEDS_RESET) and the front end is
        dropped, which unmaps everything it gave us."""
        while True:
            await trio.lowlevel.wait_readable(fd)
            if peerfd.read_kick(fd) != peerfd.KICK:
                continue
            where = self.mem.shrunk() if self.mem is not None else None
            if where is None:
                continue  # a map already replaced
            log.error("%s: the front end truncated its memory under %s; dropping it",
                      self.device.name, where)
            self.device.fail(f"guest memory {where} vanished under the device")
            scope.cancel()
            return

    async def _loop(self, conn: Connection) -> None:
        while True:
            if self._dirty:
                with trio.move_on_after(SETTLE_S) as quiet:
                    await trio.lowlevel.wait_readable(conn.sock)
                if quiet.cancelled_caught:
                    try:
                        await self._reconcile()
                    except ProtocolError as e:  # e.g. a ring outside the memory table
                        self.glog.warning("%s: dropping the front end: %s",
                                          self.device.name, e)
                        return
                    continue
            try:
                msg = await conn.receive()
            except Disconnected:
                return
            except (ProtocolError, OSError) as e:
                self.glog.warning("%s: dropping the front end: %s", self.device.name, e)
                return
            try:
                await self._answer(conn, msg)
            except ProtocolError as e:
                self.glog.warning("%s: dropping the front end: %s", self.device.name, e)
                return
            except OSError as e:  # the front end hung up before reading our reply
                self.glog.warning("%s: front end gone: %s", self.device.name, e)
                return

    async def _answer(self, conn: Connection, msg: Message) -> None:
        self.messages += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %d flags %#x size %d fds %d: %s", msg.header.request,
                      msg.header.flags, msg.header.size, len(msg.fds), msg.payload.hex())
        try:
            reply = await self._handle(msg)
        except ProtocolError:
            if msg.header.need_reply and self._reply_ack:
                await conn.send(p.encode_u64(msg.header.request, 1))
            raise
        finally:
            msg.close()
        if reply is not None:
            await conn.send(reply)
        elif msg.header.need_reply and self._reply_ack:
            await conn.send(p.encode_u64(msg.header.request, 0))

    @property
    def _reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << p.PROTOCOL_F_REPLY_ACK))

    # -- requests ----------------------------------------------------------------------

    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"ring {index} does not exist ({len(self.rings)} rings)")
        return self.rings[index]

    @property
    def offered_protocol_features(self) -> int:
        # Only block and console front ends read config space from us (a console through
        # QEMU's generic vhost-user-test-device-pci, e.g. 11.1): QEMU's virtio-net keeps its
        # own (MAC, status) and its rng has none, and both warn about an unused CONFIG.
        uses_config = self.device.device_type in (VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE)
        config = 1 << p.PROTOCOL_F_CONFIG if uses_config else 0
        return PROTOCOL_FEATURES | config

    @property
    def offered_features(self) -> int:
        return self.device.device_features | p.F_PROTOCOL_FEATURES

    async def _handle(self, msg: Message) -> bytes | None:
        req = msg.header.request
        body = msg.payload
        if req == Req.GET_FEATURES:
            return p.encode_u64(req, self.offered_features)
        if req == Req.SET_FEATURES:
            features = p.parse_u64(body)
            if features & ~self.offered_features:
                raise ProtocolError(f"features {features:#x} were not offered")
            if not self.device.check_features(features & ~p.F_PROTOCOL_FEATURES):
                raise ProtocolError(f"the device refuses features {features:#x}")
            self.features = features
            self._dirty = True
            return None
        if req == Req.GET_PROTOCOL_FEATURES:
            return p.encode_u64(req, self.offered_protocol_features)
        if req == Req.SET_PROTOCOL_FEATURES:
            value = p.parse_u64(body)
            if value & ~self.offered_protocol_features:
                raise ProtocolError(f"protocol features {value:#x} were not offered")
            self.protocol_features = value
            return None
        if req == Req.SET_OWNER:
            self.owner = True
            return None
        if req == Req.RESET_OWNER:
            await self._stop_all_rings()
            return None
        if req == Req.RESET_DEVICE:
            await self._stop_all_rings()
            self.features = 0
            return None
        if req == Req.SET_MEM_TABLE:
            table = p.parse_mem_table(body)
            await self._deactivate()
            # closes the fds; ProtocolError if unusable
            new = VhostMemoryMap(table, msg.take_fds(), self._fault_fd)
            if self.mem is not None:
                self.mem.close()
            self.mem = new
            self._dirty = True
            return None
        if req == Req.GET_QUEUE_NUM:
            return p.encode_u64(req, self.device.num_queues)
        if req == Req.SET_VRING_NUM:
            index, num = p.parse_vring_state(body)
            if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
                raise ProtocolError(f"ring {index}: size {num} is not a power of two")
            self._ring(index).num = num
            self._dirty = True
            return None
        if req == Req.SET_VRING_ADDR:
            addr = p.parse_vring_addr(body)
            self._ring(addr.index).addr = addr
            self._dirty = True
            return None
        if req == Req.SET_VRING_BASE:
            index, num = p.parse_vring_state(body)
            if num > 0xFFFF:
                raise ProtocolError(f"ring {index}: base {num} is not a 16-bit index")
            self._ring(index).base = num
            self._dirty = True
            return None
        if req == Req.GET_VRING_BASE:
            index, _ = p.parse_vring_state(body)
            ring = self._ring(index)
            await self._deactivate()
            ring.started = False
            ring.polling = False
            ring.close_fds()
            self._dirty = True
            return p.encode(req, p.VRING_STATE.pack(index, ring.base))
        if req in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
            return self._set_vring_fd(req, msg)
        if req == Req.SET_VRING_ENABLE:
            index, num = p.parse_vring_state(body)
            if num > 1:
                raise ProtocolError(f"ring {index}: enable value {num} is not 0 or 1")
            self._ring(index).enabled = bool(num)
            self._dirty = True
            return None
        if req == Req.GET_CONFIG:
            access = p.parse_config(body, with_data=False)
            return p.encode_config(access.offset, access.flags,
                                   self._read_config(access.offset, access.size))
        if req == Req.SET_CONFIG:
            access = p.parse_config(body, with_data=True)
            self.device.write_config(access.offset, access.data)
            return None
        try:
            name = Req(req).name
        except ValueError:
            name = str(req)
        raise ProtocolError(f"unsupported request {name}")

    def _set_vring_fd(self, req: int, msg: Message) -> None:
        index, nofd = p.parse_vring_file(msg.payload)
        ring = self._ring(index)
        if len(msg.fds) > (0 if nofd else 1):  # checked before taking one: msg closes all
            raise ProtocolError(f"ring {index}: {Req(req).name} with extra file descriptors")
        fd = None if nofd else msg.take_fd()
        if not nofd and fd is None:
            raise ProtocolError(f"ring {index}: {Req(req).name} without a file descriptor")
        if fd is not None:
            try:
                peerfd.adopt(fd, f"ring {index}: {Req(req).name}")
            except peerfd.PeerFdError as e:
                os.close(fd)
                raise ProtocolError(str(e)) from None
        if req == Req.SET_VRING_KICK:
            if ring.watcher is not None:
                ring.watcher.cancel()
            if ring.kick_fd is not None:
                trio.lowlevel.notify_closing(ring.kick_fd)
                os.close(ring.kick_fd)
            ring.kick_fd = fd
            ring.polling = nofd
            ring.started = True
            self._dirty = True
            self._start_watcher(ring)
        else:
            name = "call_fd" if req == Req.SET_VRING_CALL else "err_fd"
            with ring.fd_lock:
                old = getattr(ring, name)
                setattr(ring, name, fd)
                if old is not None:
                    os.close(old)
        return None

    def _read_config(self, offset: int, size: int) -> bytes:
        data = self.device.read_config(offset, size)
        valid = max(0, min(size, self.device.config_size - offset))
        return data[:valid] + bytes(size - valid)  # beyond our config: zeros, not 0xff

    # -- kicks -------------------------------------------------------------------------

    def _start_watcher(self, ring: Vring) -> None:
        ring.watcher = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_kick, ring.index, ring.kick_fd, ring.watcher)

    async def _watch_kick(self, index: int, fd: int | None, scope: trio.CancelScope) -> None:
        """Turn kicks on ``fd`` (or a poll timer) into ``queue_notify``; ends with ``scope``."""
        notify = self.device.queue_notify
        with scope:
            if fd is None:
                while True:
                    await trio.sleep(POLL_S)
                    notify(index)
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (OSError, trio.ClosedResourceError):
                    return
                got = peerfd.read_kick(fd)
                if got == peerfd.CLOSED:  # the front end's end hung up: no more kicks
                    return
                if got == peerfd.KICK:
                    notify(index)

    # -- activation --------------------------------------------------------------------

    def _ready(self, ring: Vring) -> bool:
        enabled = ring.enabled or not self.features & p.F_PROTOCOL_FEATURES
        return ring.started and enabled and ring.addr is not None and ring.num > 0

    def _signature(self) -> tuple[object, ...]:
        rings = tuple((r.index, r.num, r.addr) for r in self.rings if self._ready(r))
        return (id(self.mem), self.features, rings)

    async def _reconcile(self) -> None:
        """Make the device's activation match the rings' state (after a settled burst)."""
        self._dirty = False
        sig = self._signature()
        if sig == self._active_sig:
            return
        await self._deactivate()
        if self.mem is None or not sig[2]:
            return
        queues = []
        for ring in self.rings:
            q = Virtqueue(self.mem, ring.index, ring.num or 1)
            if self._ready(ring):
                assert ring.addr is not None
                q.size = ring.num
                q.desc_addr = self.mem.uva_to_gpa(ring.addr.desc, 16 * ring.num)
                q.avail_addr = self.mem.uva_to_gpa(ring.addr.avail, 6 + 2 * ring.num)
                q.used_addr = self.mem.uva_to_gpa(ring.addr.used, 6 + 8 * ring.num)
                q.last_avail_idx = ring.base
                try:
                    q.used_idx = self.mem.read_u16(q.used_addr + 2)
                except GuestMemoryError:
                    raise ProtocolError(f"ring {ring.index}: used ring outside memory") from None
                q.ready = True
            queues.append(q)
        self.queues = queues
        self._active_sig = sig
        self.device.activate(self.features & ~p.F_PROTOCOL_FEATURES, queues, self.interrupt)

    async def _deactivate(self) -> None:
        """Stop the device's workers and keep each ring's position for a later restart."""
        queues, self.queues = self.queues, None
        self._active_sig = None
        if queues is None:
            return
        self.device.reset()
        await self.device.wait_quiescent()
        for q, ring in zip(queues, self.rings, strict=True):
            if q.ready:
                ring.base = q.last_avail_idx
            if ring.started and ring.watcher is None and self._nursery is not None:
                self._start_watcher(ring)  # a data-plane thread had its kicks

    async def _stop_all_rings(self) -> None:
        await self._deactivate()
        for ring in self.rings:
            ring.close_fds()
            ring.started = ring.enabled = ring.polling = False
            ring.addr = None
            ring.num = ring.base = 0
        self._dirty = True

    async def _reset_all(self) -> None:
        """The front end left: forget everything it set up and unmap its memory."""
        with trio.CancelScope(shield=True):
            await self._stop_all_rings()
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.features = self.protocol_features = 0
        self.owner = False
        self._dirty = False
