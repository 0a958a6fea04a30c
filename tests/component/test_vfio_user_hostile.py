"""The vfio-user server against a hostile client: the classes of issue 18 items 1 and 2.

The server runs as its own process (``acrn-pydm vfio-user``), as QEMU would see it. A
client hands a *blocking* eventfd already saturated (or clears O_NONBLOCK on it after
handing it over) as an MSI-X vector's trigger, or truncates the memfd behind its DMA
region while a virtqueue lives there. Before the fix the first interrupt froze the server
for good (its write blocked), and the truncation killed it by SIGBUS. Now the interrupt is
dropped (the client already has one pending) and the server answers the next command;
a truncated region drops the client with one line and the next client is served.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from devicemodel.vfio_user import protocol as p
from devicemodel.vfio_user.connection import Disconnected
from tests.support.launch import start_listening
from tests.support.vfio_user import Client, ClientRam, ModernVirtio

RING = 0x1_0000
EVENTFD_MAX = 2**64 - 2


def _start_server(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp_path / "vu.sock"
    return start_listening(["vfio-user", "virtio-rnd,modern", "--socket-path", str(sock)],
                           sock), sock


async def _client(sock: Path) -> Client:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await s.connect(str(sock))
    c = Client(s)
    await c.version()
    return c


async def _rnd(drv: ModernVirtio, q: object, used: int) -> None:
    q.add_chain(writable=[32])  # type: ignore[attr-defined]
    await drv.kick(0)
    with trio.fail_after(10):
        while q.used_idx() != used:  # type: ignore[attr-defined]
            await trio.sleep(0.005)


def _finish(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.communicate()[1].decode(errors="replace")


@pytest.mark.parametrize("when", ["handed-blocking", "cleared-after"])
async def test_a_saturated_vector_eventfd_does_not_freeze_the_server(tmp_path, when):
    proc, sock = _start_server(tmp_path)
    ram = ClientRam()
    hostile = os.eventfd(0)  # blocking
    os.eventfd_write(hostile, EVENTFD_MAX)
    try:
        c = await _client(sock)
        drv, q = await ModernVirtio.one_queue(c, ram, RING)
        await c.set_irqs(p.MSIX_IRQ, p.SET_DATA_EVENTFD | p.SET_ACTION_TRIGGER, 1, 1,
                         [os.dup(hostile)])
        if when == "cleared-after":
            os.set_blocking(hostile, True)  # the client clears O_NONBLOCK again
        await _rnd(drv, q, 1)  # completes; its interrupt is dropped, not waited for
        with trio.fail_after(3):  # the server still answers ...
            await c.cfg_read(0, 2)
        await _rnd(drv, q, 2)  # ... and serves the queue
        drv.close()
        c.close()
        with trio.fail_after(5):
            c2 = await _client(sock)  # and the next client
            c2.close()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        stderr = _finish(proc)
        os.close(hostile)
        ram.close()
    assert "Traceback" not in stderr, stderr


async def test_memory_truncated_under_a_live_queue_drops_the_client(tmp_path):
    proc, sock = _start_server(tmp_path)
    ram = ClientRam()
    try:
        c = await _client(sock)
        drv, q = await ModernVirtio.one_queue(c, ram, RING)
        await _rnd(drv, q, 1)
        os.ftruncate(ram.fd, 0)  # neither side may touch the pages from here on
        try:
            await drv.kick(0)
        except (ConnectionError, Disconnected):
            pass  # the server met the missing pages first (it may look at the ring any time)
        with trio.fail_after(10):  # the server closes the connection
            try:
                while await c.channel.sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        await trio.sleep(0.2)
        assert proc.poll() is None, f"the server died: {proc.returncode}"
        drv.close()
        c.close()
        with trio.fail_after(5):
            c2 = await _client(sock)  # the next client is served
            assert await c2.cfg_read(0, 2) == 0x1AF4
            c2.close()
    finally:
        stderr = _finish(proc)
        for v in ram._views:
            v.release()
        os.close(ram.fd)
    assert proc.returncode == 0, stderr
    assert "the client truncated its memory under 0x0+0x400000 (+0x" in stderr, stderr
    assert "Traceback" not in stderr, stderr
