"""virtio-console (virtio 1.2 §5.3) with acrn-dm's port backends and the multiport
control queue.

Queues: port 0 uses 0 (rx) and 1 (tx), the control queues are 2 (device → driver) and
3 (driver → device), port n ≥ 1 uses 2n+2 and 2n+3. ``max_nr_ports`` is the number of
configured ports. Without VIRTIO_CONSOLE_F_MULTIPORT only port 0 exists. Each port's
host end is in ports.py.
"""

from __future__ import annotations

import struct
from collections import deque

import trio

from ..buffers import copy_into
from ..device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_CONSOLE,
    Kick,
    PciIds,
    VirtioDevice,
)
from ..queue import Virtqueue
from .options import MAX_PORTS, ConsoleOptions, parse_console_options
from .ports import Port, PortBackend, open_port

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1

# control events (§5.3.6.2)
VIRTIO_CONSOLE_DEVICE_READY = 0
VIRTIO_CONSOLE_DEVICE_ADD = 1
VIRTIO_CONSOLE_DEVICE_REMOVE = 2
VIRTIO_CONSOLE_PORT_READY = 3
VIRTIO_CONSOLE_CONSOLE_PORT = 4
VIRTIO_CONSOLE_RESIZE = 5
VIRTIO_CONSOLE_PORT_OPEN = 6
VIRTIO_CONSOLE_PORT_NAME = 7

QUEUE_SIZE = 64  # acrn-dm's VIRTIO_CONSOLE_RINGSZ
CONFIG_SIZE = 12  # cols, rows, max_nr_ports, emerg_wr
CTRL_RX, CTRL_TX = 2, 3
MAX_PENDING_CONTROL = 4 * MAX_PORTS + 16

_CTRL = struct.Struct("<IHH")  # id, event, value


class VirtioConsole(VirtioDevice):
    device_type = VIRTIO_ID_CONSOLE
    pci_ids = PciIds(legacy_device_id=0x1003, device_type=VIRTIO_ID_CONSOLE,
                     class_code=0x078000)
    name = "virtio-console"

    def __init__(self, opts: ConsoleOptions,
                 backends: list[PortBackend] | None = None) -> None:
        n = len(opts.ports)
        super().__init__(2 * n + 2, QUEUE_SIZE, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
                         | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_CONSOLE_F_MULTIPORT,
                         CONFIG_SIZE)
        struct.pack_into("<HHII", self.config, 0, 0, 0, n, 0)
        opened: list[PortBackend] = []
        try:
            for spec in opts.ports if backends is None else []:
                opened.append(open_port(spec))
        except BaseException:
            for b in opened:
                b.close()
            raise
        self.ports = [Port(i, s, b) for i, (s, b) in
                      enumerate(zip(opts.ports, backends or opened, strict=True))]
        self._ctrl_out: deque[bytes] = deque()
        self._ctrl_kick = Kick()

    def close(self) -> None:
        for p in self.ports:
            p.backend.close()

    def on_reset(self) -> None:
        self._ctrl_out.clear()
        for p in self.ports:
            p.guest_ready = p.guest_open = False
            p.host_open_sent = None

    @property
    def multiport(self) -> bool:
        return bool(self.features & VIRTIO_CONSOLE_F_MULTIPORT)

    def start_workers(self, nursery: trio.Nursery) -> None:
        qs = self.queues
        self._ctrl_out.clear()
        self._ctrl_kick = Kick()
        ports = self.ports if self.multiport else self.ports[:1]
        for p in ports:
            rx, tx = (qs[i] for i in p.queues)
            if rx.ready:
                nursery.start_soon(self._port_rx, p, rx)
            if tx.ready:
                nursery.start_soon(self._port_tx, p, tx)
            nursery.start_soon(self._watch_host, p)
        if self.multiport:
            if qs[CTRL_RX].ready:
                nursery.start_soon(self._ctrl_rx, qs[CTRL_RX])
            if qs[CTRL_TX].ready:
                nursery.start_soon(self._ctrl_tx, qs[CTRL_TX])

    # data ------------------------------------------------------------------------------

    async def _port_rx(self, port: Port, q: Virtqueue) -> None:
        while True:
            data = memoryview(await port.backend.receive())
            while data:
                chain = q.pop()
                if chain is None:
                    await self.wait_kick(q)
                    continue
                n = copy_into(chain.writable, data)
                q.add_used(chain.head, n)
                data = data[n:]
            self.signal(q)

    async def _port_tx(self, port: Port, q: Virtqueue) -> None:
        while True:
            chain = q.pop()
            if chain is None:
                await self.wait_kick(q)
                continue
            for v in chain.readable:
                await port.backend.send(v)
            q.add_used(chain.head, 0)
            self.signal(q)

    async def _watch_host(self, port: Port) -> None:
        changed = Kick()
        async with trio.open_nursery() as n:
            n.start_soon(port.backend.serve, changed)
            while True:
                await changed.wait()
                self._send_host_open(port)

    # control ---------------------------------------------------------------------------

    def _control(self, pid: int, event: int, value: int, extra: bytes = b"") -> None:
        if len(self._ctrl_out) >= MAX_PENDING_CONTROL:
            self.glog.warning("%s: driver does not read control messages; dropping", self.name)
            return  # a driver that asks and never reads must not grow our memory
        self._ctrl_out.append(_CTRL.pack(pid, event, value) + extra)
        self._ctrl_kick.set()

    def _send_host_open(self, port: Port) -> None:
        if not self.multiport or not port.guest_ready:
            return
        state = port.backend.connected
        if state != port.host_open_sent:
            port.host_open_sent = state
            self._control(port.id, VIRTIO_CONSOLE_PORT_OPEN, int(state))

    async def _ctrl_rx(self, q: Virtqueue) -> None:
        while True:
            if not self._ctrl_out:
                await self._ctrl_kick.wait()
                continue
            chain = q.pop()
            if chain is None:
                await self.wait_kick(q)
                continue
            msg = self._ctrl_out.popleft()
            n = copy_into(chain.writable, memoryview(msg))
            q.add_used(chain.head, n)
            self.signal(q)

    async def _ctrl_tx(self, q: Virtqueue) -> None:
        while True:
            chain = q.pop()
            if chain is None:
                await self.wait_kick(q)
                continue
            msg = b"".join(bytes(v) for v in chain.readable[:4])[: _CTRL.size]
            q.add_used(chain.head, 0)
            self.signal(q)
            if len(msg) < _CTRL.size:
                self.glog.warning("%s: short control message", self.name)
                continue
            self._handle_control(*_CTRL.unpack(msg))

    def _handle_control(self, pid: int, event: int, value: int) -> None:
        if event == VIRTIO_CONSOLE_DEVICE_READY:
            if value == 1:
                for p in self.ports:
                    self._control(p.id, VIRTIO_CONSOLE_DEVICE_ADD, 1)
            return
        if not 0 <= pid < len(self.ports):
            self.glog.warning("%s: control event %d for unknown port %d", self.name, event, pid)
            return
        port = self.ports[pid]
        if event == VIRTIO_CONSOLE_PORT_READY:
            if value != 1:
                return
            port.guest_ready = True
            if port.spec.console:
                self._control(pid, VIRTIO_CONSOLE_CONSOLE_PORT, 1)
            self._control(pid, VIRTIO_CONSOLE_PORT_NAME, 1, port.spec.name.encode())
            port.host_open_sent = None
            self._send_host_open(port)
        elif event == VIRTIO_CONSOLE_PORT_OPEN:
            port.guest_open = bool(value)


def parse_options(options: str, slot: int = 0, func: int = 0) -> ConsoleOptions:
    """What ``create`` builds from, without opening a host end (the validator's check)."""
    return parse_console_options(options)


def create(options: str, slot: int = 0, func: int = 0) -> VirtioConsole:
    """The ``-s <slot>,virtio-console,<options>`` device."""
    return VirtioConsole(parse_options(options, slot, func))
