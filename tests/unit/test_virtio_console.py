"""virtio-console: the multiport control handshake Linux does, with socket, pty and file ports."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

from devicemodel.config import ConfigError
from devicemodel.memory import GuestMemory, MiB
from devicemodel.virtio.console import (
    VIRTIO_CONSOLE_CONSOLE_PORT,
    VIRTIO_CONSOLE_DEVICE_ADD,
    VIRTIO_CONSOLE_DEVICE_READY,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_PORT_NAME,
    VIRTIO_CONSOLE_PORT_OPEN,
    VIRTIO_CONSOLE_PORT_READY,
    PortSpec,
    VirtioConsole,
    parse_console_options,
)
from devicemodel.virtio.mock import MockDriver, RecordingInterrupt, wait_used

CTRL = struct.Struct("<IHH")


GUEST_RAM = 256 * MiB  # the ``mem`` fixture's size (tests/conftest.py): room for many ports


def drivers(mem: GuestMemory, n: int) -> list[MockDriver]:
    return [MockDriver(mem, 0x100000 + i * 0x300000, 64, index=i, data_size=2 * MiB)
            for i in range(n)]


async def control_messages(ctrl_rx: MockDriver, count: int) -> list[tuple[int, int, int, bytes]]:
    out = []
    for h, n in await wait_used(ctrl_rx, count):
        data = ctrl_rx.written(h, n)
        out.append((*CTRL.unpack_from(data), data[CTRL.size :]))
        ctrl_rx.add_chain([], [64])  # give the buffer back, as the driver does
    return out


def send_control(dev: VirtioConsole, ctrl_tx: MockDriver, pid: int, event: int,
                 value: int) -> None:
    ctrl_tx.add_chain([CTRL.pack(pid, event, value)])
    dev.queue_notify(3)


async def read_guest_rx(drv: MockDriver, want: bytes) -> bytes:
    got = b""
    with trio.fail_after(5):
        while len(got) < len(want):
            for h, n in await wait_used(drv, 1):
                got += drv.written(h, n)
    return got


async def test_multiport_handshake_and_backends(mem, tmp_path):
    sock_path = str(tmp_path / "con.sock")
    out_path = tmp_path / "out.txt"
    opts = parse_console_options(
        f"@socket:con0={sock_path}:server,pty:p1,file:log={out_path}")
    dev = VirtioConsole(opts)
    qs = drivers(mem, dev.num_queues)
    assert dev.num_queues == 8
    assert struct.unpack("<HHII", dev.read_config(0, 12)) == (0, 0, 3, 0)
    irq = RecordingInterrupt()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run)
            dev.activate(dev.device_features, [d.queue() for d in qs], irq)
            ctrl_rx, ctrl_tx = qs[2], qs[3]
            for _ in range(16):
                ctrl_rx.add_chain([], [64])
            for d in (qs[0], qs[4]):
                for _ in range(4):
                    d.add_chain([], [128])
            dev.queue_notify(2)

            send_control(dev, ctrl_tx, 0, VIRTIO_CONSOLE_DEVICE_READY, 1)
            adds = await control_messages(ctrl_rx, 3)
            assert adds == [(i, VIRTIO_CONSOLE_DEVICE_ADD, 1, b"") for i in range(3)]

            for pid in range(3):
                send_control(dev, ctrl_tx, pid, VIRTIO_CONSOLE_PORT_READY, 1)
            msgs = await control_messages(ctrl_rx, 7)
            assert msgs == [
                (0, VIRTIO_CONSOLE_CONSOLE_PORT, 1, b""),
                (0, VIRTIO_CONSOLE_PORT_NAME, 1, b"con0"),
                (0, VIRTIO_CONSOLE_PORT_OPEN, 0, b""),  # no client on the socket yet
                (1, VIRTIO_CONSOLE_PORT_NAME, 1, b"p1"),
                (1, VIRTIO_CONSOLE_PORT_OPEN, 1, b""),
                (2, VIRTIO_CONSOLE_PORT_NAME, 1, b"log"),
                (2, VIRTIO_CONSOLE_PORT_OPEN, 1, b""),
            ]

            # socket port: a client connects, data flows both ways
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await client.connect(sock_path)
            assert await control_messages(ctrl_rx, 1) == [(0, VIRTIO_CONSOLE_PORT_OPEN, 1, b"")]
            await client.send(b"hello guest")
            assert await read_guest_rx(qs[0], b"hello guest") == b"hello guest"
            qs[1].add_chain([b"hello ", b"host"])
            dev.queue_notify(1)
            got = b""
            with trio.fail_after(5):
                while got != b"hello host":
                    got += await client.recv(100)
            client.close()
            assert await control_messages(ctrl_rx, 1) == [(0, VIRTIO_CONSOLE_PORT_OPEN, 0, b"")]

            # pty port
            slave = os.open(dev.ports[1].backend.pty_name, os.O_RDWR | os.O_NOCTTY)
            try:
                os.write(slave, b"ping")
                assert await read_guest_rx(qs[4], b"ping") == b"ping"
                qs[5].add_chain([b"pong"])
                dev.queue_notify(5)
                await wait_used(qs[5], 1)
                assert os.read(slave, 100) == b"pong"
            finally:
                os.close(slave)

            # file port: output only
            qs[7].add_chain([b"to the log\n"])
            dev.queue_notify(7)
            await wait_used(qs[7], 1)
            assert out_path.read_bytes() == b"to the log\n"
            assert dev.failure is None
            nursery.cancel_scope.cancel()
    finally:
        dev.close()
    assert not os.path.exists(sock_path)


async def test_single_port_without_multiport(mem, tmp_path):
    sock_path = str(tmp_path / "c.sock")
    dev = VirtioConsole(parse_console_options(f"@socket:c={sock_path},pty:other"))
    qs = drivers(mem, dev.num_queues)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run)
            feats = dev.device_features & ~VIRTIO_CONSOLE_F_MULTIPORT
            dev.activate(feats, [d.queue() for d in qs], RecordingInterrupt())
            client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await client.connect(sock_path)
            qs[0].add_chain([], [64])
            dev.queue_notify(0)
            await client.send(b"x")
            assert await read_guest_rx(qs[0], b"x") == b"x"
            client.close()
            nursery.cancel_scope.cancel()
    finally:
        dev.close()


async def test_socket_client_mode(mem, tmp_path):
    path = str(tmp_path / "srv.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    dev = VirtioConsole(parse_console_options(f"@socket:c={path}:client"))
    peer, _ = listener.accept()
    qs = drivers(mem, dev.num_queues)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dev.run)
            dev.activate(dev.device_features, [d.queue() for d in qs], RecordingInterrupt())
            qs[1].add_chain([b"out"])
            dev.queue_notify(1)
            await wait_used(qs[1], 1)
            assert peer.recv(10) == b"out"
            nursery.cancel_scope.cancel()
    finally:
        dev.close()
        peer.close()
        listener.close()


def test_parse_options():
    o = parse_console_options("@stdio:con,pty:p=/tmp/link,file:f=/tmp/x,socket:s=/tmp/s:client")
    assert o.ports == (
        PortSpec("stdio", "con", None, True, True),
        PortSpec("pty", "p", "/tmp/link", False, True),
        PortSpec("file", "f", "/tmp/x", False, True),
        PortSpec("socket", "s", "/tmp/s", False, False),
    )


@pytest.mark.parametrize("text,word", [
    ("", "at least one port"),
    ("serial:x", "serial:x"),
    ("pty", "port name"),
    ("file:f", "file:f"),
    ("socket:s=/x:both", "socket:s=/x:both"),
    ("stdio:a,stdio:b", "only one port may use stdio"),
    ("pty:a,pty:a", "unique"),
])
def test_bad_options(text, word):
    with pytest.raises(ConfigError, match=word):
        parse_console_options(text)


def test_client_without_server_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nothing"):
        VirtioConsole(parse_console_options(f"socket:s={tmp_path}/nothing:client"))
