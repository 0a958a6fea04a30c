"""One client's session: its messages applied, in order, to one ServedDevice.

Commands are handled strictly in the order they arrive, in one task, as the protocol
asks (a client may pipeline). Every command gets a reply unless it set No_reply; a
command we cannot serve gets an error reply with an errno and the session goes on. Only
a stream we cannot frame any more (a header announcing fewer than 16 bytes, a message
cut by EOF) ends the session. VERSION must come first.
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from .. import peerfd
from ..memory import GuestMemoryError
from ..ratelimit import RateLimitedLog
from . import protocol as p
from .connection import Channel, Disconnected, Message
from .device import ServedDevice
from .irqs import ClientIrqs
from .protocol import Cmd, Fatal, Refused

log = logging.getLogger(__name__)

#: VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP / _ALL
UNMAP_DIRTY_BITMAP = 1 << 0
UNMAP_ALL = 1 << 1
#: VFIO_DEVICE_FEATURE_*: we offer none (no migration, no DMA logging); Linux's answer
FEATURE_UNSUPPORTED = errno.ENOTTY
#: commands after which the device's reaction completes before the next command
_WRITES = frozenset({Cmd.REGION_WRITE, Cmd.REGION_WRITE_MULTI, Cmd.DEVICE_RESET})


class Session:
    """Serve one connected client until it goes away."""

    def __init__(self, served: ServedDevice, channel: Channel) -> None:
        self.served = served
        self.channel = channel
        self.negotiated = False
        self.write_multiple = False
        self.irqs = ClientIrqs(served.irq_counts, lambda: served.lines.level,
                               self._unmask_fd_changed, served.vectors)
        self._unmask_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.handled = 0
        self.errors = 0
        self._rl = RateLimitedLog(log)
        self._handlers = {
            Cmd.VERSION: self._version,
            Cmd.DMA_MAP: self._dma_map,
            Cmd.DEVICE_GET_INFO: self._device_info,
            Cmd.DEVICE_GET_REGION_INFO: self._region_info,
            Cmd.DEVICE_GET_IRQ_INFO: self._irq_info,
            Cmd.DEVICE_SET_IRQS: self._set_irqs,
            Cmd.REGION_READ: self._region_read,
            Cmd.REGION_WRITE: self._region_write,
            Cmd.REGION_WRITE_MULTI: self._write_multi,
            Cmd.DEVICE_RESET: self._reset,
        }

    async def serve(self) -> None:
        """Returns when the client disconnects (or sends what cannot be framed); the
        client's memory and eventfds are gone then, the device state is kept."""
        self.served.lines.irqs = self.irqs
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_memory, nursery.cancel_scope)
                await self._loop()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._unmask_fd_changed(None)
            self.served.client_gone()
            self.served.lines.irqs = None

    async def _loop(self) -> None:
        while True:
            try:
                msg = await self.channel.receive()
            except Disconnected:
                return
            except Fatal as e:
                # str(e): a record holding the exception would keep its frames (and the
                # client's memory) alive for as long as the record lives
                log.warning("%s: %s; closing the connection", self.served.name, str(e))
                if e.header is not None:
                    await self._send(p.error_reply(e.header, errno.EINVAL))
                return
            try:
                await self._dispatch(msg)
            finally:
                msg.close()

    async def _dispatch(self, msg: Message) -> None:
        h = msg.header
        if log.isEnabledFor(logging.DEBUG):
            log.debug("<- id %d cmd %d flags %#x size %d fds %d %s", h.id, h.command, h.flags,
                      h.size, len(msg.fds), msg.payload[:40].hex())
        if h.kind == p.TYPE_REPLY:
            # we send no requests, so this answers nothing; replying would only confuse
            self._rl.warning("%s: unexpected reply (command %d, id %d) ignored",
                             self.served.name, h.command, h.id)
            return
        try:
            if msg.refused is not None:
                raise Refused(*msg.refused)
            if h.kind != p.TYPE_COMMAND:
                raise Refused(errno.EINVAL, f"message type {h.kind} is neither command nor reply")
            if h.flags & ~(p.TYPE_MASK | p.NO_REPLY):
                raise Refused(errno.EINVAL, f"unknown header flags {h.flags:#x}")
            if not self.negotiated and h.command != Cmd.VERSION:
                raise Refused(errno.EINVAL, "VERSION must be the first command")
            payload = await self._handle(h.command, msg)
        except Refused as e:
            self.errors += 1
            self._rl.warning("%s: command %d refused: %s", self.served.name, h.command, str(e))
            if not h.no_reply:
                await self._send(p.error_reply(h, e.errno))
            return
        self.handled += 1
        if not h.no_reply:
            await self._send(p.reply(h, payload))

    async def _handle(self, command: int, msg: Message) -> bytes:
        if command == Cmd.DMA_UNMAP:
            return self._dma_unmap(msg)
        if command != Cmd.DMA_MAP:
            self.served.settle()
        handler = self._handlers.get(command)  # type: ignore[call-overload]
        if handler is None:
            if command in (Cmd.DMA_READ, Cmd.DMA_WRITE):
                raise Refused(errno.EINVAL, f"command {command} goes from server to client")
            if command == Cmd.DEVICE_FEATURE:
                raise Refused(FEATURE_UNSUPPORTED, "no device features (no migration)")
            raise Refused(errno.ENOSYS, f"command {command} is not supported")
        if command not in (Cmd.DMA_MAP, Cmd.DEVICE_SET_IRQS) and msg.fds:
            raise Refused(errno.EINVAL, f"command {command} carries no file descriptors")
        try:
            payload = handler(msg)
        except GuestMemoryError as e:  # a device handler touched unmapped memory
            raise Refused(errno.EFAULT, str(e)) from None
        if command in _WRITES:
            await self.served.writes_done()
        return payload

    async def _send(self, data: bytes) -> None:
        try:
            await self.channel.send(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; the receive loop sees it next

    # --- negotiation --------------------------------------------------------------------------
    def _version(self, msg: Message) -> bytes:
        if self.negotiated:
            raise Refused(errno.EINVAL, "VERSION was already negotiated")
        v = p.parse_version(msg.payload)
        if v.major != p.MAJOR:
            raise Refused(errno.ENOTSUP, f"protocol version {v.major}.{v.minor}; we speak "
                          f"{p.MAJOR}.x")
        theirs = v.capabilities
        caps: dict[str, object] = {}
        if "max_msg_fds" in theirs:
            caps["max_msg_fds"] = p.MAX_MSG_FDS
        if "max_data_xfer_size" in theirs:
            caps["max_data_xfer_size"] = p.MAX_DATA_XFER
        pgsizes = theirs.get("pgsizes", p.PAGE_SIZE)
        if not isinstance(pgsizes, int) or not pgsizes & p.PAGE_SIZE:
            raise Refused(errno.ENOTSUP, f"pgsizes {pgsizes!r} lacks 4 KiB pages")
        if "pgsizes" in theirs:
            caps["pgsizes"] = p.PAGE_SIZE
        max_maps = theirs.get("max_dma_maps")
        if isinstance(max_maps, int) and not isinstance(max_maps, bool):
            caps["max_dma_maps"] = max(1, min(max_maps, p.MAX_DMA_MAPS))
        if theirs.get("write_multiple") is True:
            caps["write_multiple"] = True
            self.write_multiple = True
        # no "migration": we cannot save a device's state
        self.negotiated = True
        log.info("%s: client speaks %d.%d, capabilities %s", self.served.name, v.major,
                 v.minor, sorted(theirs))
        return p.version_payload(p.MAJOR, min(v.minor, p.MINOR), caps)

    # --- memory -------------------------------------------------------------------------------
    def _dma_map(self, msg: Message) -> bytes:
        req = p.parse_dma_map(msg.payload)
        argsz = p.dma_map.sizeof()
        if int.from_bytes(msg.payload[:4], "little") < argsz:
            raise Refused(errno.EINVAL, f"DMA_MAP argsz below {argsz}")
        fds = msg.take_fds()
        if len(fds) > 1:
            for fd in fds:
                os.close(fd)
            raise Refused(errno.EINVAL, f"DMA_MAP with {len(fds)} file descriptors")
        self.served.dma_map(req, fds[0] if fds else None)
        return b""

    def _dma_unmap(self, msg: Message) -> bytes:
        if msg.fds:
            raise Refused(errno.EINVAL, "DMA_UNMAP carries no file descriptors")
        argsz, flags, address, size = p.parse_dma_unmap(msg.payload)
        if flags & UNMAP_DIRTY_BITMAP or flags & ~(UNMAP_DIRTY_BITMAP | UNMAP_ALL):
            raise Refused(errno.ENOTSUP, f"DMA_UNMAP flags {flags:#x} (no dirty tracking)")
        memory = self.served.memory
        gone = list(memory.maps) if flags & UNMAP_ALL else memory.within(address, size)
        self.served.dma_unmap(gone)
        return p.dma_unmap_payload(argsz, flags, address, size)

    # --- device, regions, IRQs ------------------------------------------------------------------
    def _device_info(self, msg: Message) -> bytes:
        need = p.device_info.sizeof()
        req = p.parse_argsz(msg.payload, "DEVICE_GET_INFO", "device_info", need)
        if req.argsz < need:  # type: ignore[attr-defined]
            raise Refused(errno.EINVAL, f"DEVICE_GET_INFO argsz below {need}")
        return p.device_info_payload(p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET,
                                     p.NUM_REGIONS, p.NUM_IRQS)

    def _region_info(self, msg: Message) -> bytes:
        need = p.region_info.sizeof()
        req = p.parse_argsz(msg.payload, "DEVICE_GET_REGION_INFO", "region_info", need)
        if req.argsz < need:  # type: ignore[attr-defined]
            raise Refused(errno.EINVAL, f"DEVICE_GET_REGION_INFO argsz below {need}")
        index = req.index  # type: ignore[attr-defined]
        if index >= p.NUM_REGIONS:
            raise Refused(errno.EINVAL, f"no region {index} (the device has {p.NUM_REGIONS})")
        flags, size = self.served.region_info(index)
        return p.region_info_payload(index, flags, size)

    def _irq_info(self, msg: Message) -> bytes:
        need = p.irq_info.sizeof()
        req = p.parse_argsz(msg.payload, "DEVICE_GET_IRQ_INFO", "irq_info", need)
        if req.argsz < need:  # type: ignore[attr-defined]
            raise Refused(errno.EINVAL, f"DEVICE_GET_IRQ_INFO argsz below {need}")
        index = req.index  # type: ignore[attr-defined]
        if index >= p.NUM_IRQS:
            raise Refused(errno.EINVAL, f"no IRQ index {index}")
        irq = self.irqs.indexes[index]
        return p.irq_info_payload(index, irq.info_flags, irq.count)

    def _set_irqs(self, msg: Message) -> bytes:
        req = p.parse_irq_set(msg.payload)
        self.irqs.set_irqs(req, msg.take_fds())
        return b""

    def _region_read(self, msg: Message) -> bytes:
        offset, region, count, _ = p.parse_region_access(msg.payload, write=False)
        data = self.served.read(region, offset, count)
        return p.region_access_payload(offset, region, count, data)

    def _region_write(self, msg: Message) -> bytes:
        offset, region, count, data = p.parse_region_access(msg.payload, write=True)
        self.served.write(region, offset, data)
        return p.region_access_payload(offset, region, count)

    def _write_multi(self, msg: Message) -> bytes:
        if not self.write_multiple:
            raise Refused(errno.EINVAL, "REGION_WRITE_MULTI was not negotiated")
        writes = p.parse_write_multi(msg.payload)
        done = 0
        for offset, region, _, data in writes:
            self.served.write(region, offset, data)
            done += 1
        return p.U64.pack(done)

    def _reset(self, msg: Message) -> bytes:
        if msg.payload:
            raise Refused(errno.EINVAL, "DEVICE_RESET has no payload")
        self.served.reset()
        return b""

    async def _watch_memory(self, scope: trio.CancelScope) -> None:
        """A DMA region shrank under us (the client truncated its file; memguard patched
        the page with zeros): the client is dropped, which resets a virtio function with
        live queues and unmaps everything it gave us."""
        fd = self.served.memory.fault_fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            if peerfd.read_kick(fd) != peerfd.KICK:
                continue
            where = self.served.memory.shrunk()
            if where is None:
                continue  # a region already unmapped
            log.error("%s: the client truncated its memory under %s; closing the "
                      "connection", self.served.name, where)
            scope.cancel()
            return

    # --- the INTx unmask eventfd ----------------------------------------------------------------
    def _unmask_fd_changed(self, fd: int | None) -> None:
        if self._unmask_scope is not None:
            self._unmask_scope.cancel()
            self._unmask_scope = None
        if fd is not None and self._nursery is not None:
            scope = trio.CancelScope()
            self._unmask_scope = scope
            self._nursery.start_soon(self._watch_unmask, fd, scope)

    async def _watch_unmask(self, fd: int, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (OSError, trio.ClosedResourceError):
                    return
                got = peerfd.read_kick(fd)  # non-blocking even if the client cleared it
                if got == peerfd.CLOSED:
                    return
                if got == peerfd.KICK:
                    self.irqs.intx_unmask()
