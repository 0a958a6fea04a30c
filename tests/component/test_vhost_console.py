"""virtio-console over vhost-user: a line each way.

Our own front end plays the driver, through the real back-end process (``acrn-pydm
vhost-user virtio-console,...``) and its socket protocol, so these run without any QEMU; a
Linux driver reaches the same back end under QEMU 11.1 (QEMU 7.2 has no vhost-user console
device) in tests/integration/test_integration_vhost_qemu11.py. The port's host side is a UNIX socket
the test talks to.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

from devicemodel.memory import GuestMemory, MiB
from devicemodel.vhost_user.frontend import Frontend, RingSetup
from devicemodel.virtio.device import VIRTIO_F_RING_EVENT_IDX
from devicemodel.virtio.mock import MockDriver
from tests.support.paths import REPO

VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
RX, TX = 0, 1  # port 0's queues


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


async def test_console_line_each_way_through_the_backend_process(tmp_path: Path) -> None:
    vu_sock, port_sock = tmp_path / "con.sock", tmp_path / "port0.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "devicemodel", "vhost-user",
         f"virtio-console,@socket:con0={port_sock}:server", "--socket-path", str(vu_sock)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(vu_sock, proc)
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.connect(str(port_sock))
        host.settimeout(5)
        mem = GuestMemory(128 * MiB)
        fe = await Frontend.connect(str(vu_sock))
        try:
            # a driver without MULTIPORT: one port on queues 0 (rx) and 1 (tx)
            await fe.negotiate(~(VIRTIO_CONSOLE_F_MULTIPORT | VIRTIO_F_RING_EVENT_IDX))
            assert await fe.set_mem_table(mem) == 0
            rx = MockDriver(mem, 0x10_0000, 64, index=RX, data_size=1 << 20)
            tx = MockDriver(mem, 0x40_0000, 64, index=TX, data_size=1 << 20)
            for d in (rx, tx):
                await fe.start_ring(RingSetup(d.index, 64, d.desc_addr, d.avail_addr,
                                              d.used_addr))
            heads = [rx.add_chain(writable=[256]) for _ in range(4)]
            fe.kick_ring(RX)

            # host → guest
            await trio.to_thread.run_sync(host.sendall, b"hello guest\n")
            await fe.wait_call(RX)
            (head, n), = rx.get_used()
            assert head in heads and rx.written(head, n) == b"hello guest\n"

            # guest → host
            tx.add_chain(readable=[b"hello host\n"])
            fe.kick_ring(TX)
            got = b""
            while not got.endswith(b"\n"):
                got += await trio.to_thread.run_sync(host.recv, 100)
            assert got == b"hello host\n"
            await fe.wait_call(TX)
        finally:
            fe.close()
            host.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
