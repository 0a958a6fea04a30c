"""A front end that hands the back end hostile file descriptors (issue 18, item 1).

The back end runs as its own process (``acrn-pydm vhost-user``), as QEMU would see it. The
front end hands over, as a ring's call fd, a *blocking* eventfd already saturated (counter
2^64-2) or a blocking pipe already full, then submits one request. Before the fix the
request completed and the back end never answered again (the interrupt's write blocked,
holding the GIL); SIGTERM did nothing for virtio-blk. Now the signal is dropped (the front
end already has one pending), the back end answers the next message and the next front
end, and SIGTERM ends it at once. The same holds when the front end clears O_NONBLOCK
again after handing the fd over (it shares the open file description with us).
"""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import trio

from devicemodel import peerfd
from devicemodel.memory import GuestMemory, MiB
from devicemodel.vhost_user import protocol as p
from devicemodel.vhost_user.frontend import Frontend
from devicemodel.vhost_user.protocol import Req
from devicemodel.virtio.mock import MockDriver
from devicemodel.virtio.rnd import VirtioRnd
from tests.support.launch import start_listening
from tests.support.vhost import NO_EVENT_IDX, disk_image, frontend, served, start

EVENTFD_MAX = 2**64 - 2


def _saturated_eventfd() -> tuple[int, list[int]]:
    fd = os.eventfd(0)  # blocking, as a hostile front end makes it
    os.eventfd_write(fd, EVENTFD_MAX)
    return fd, [fd]


def _full_pipe() -> tuple[int, list[int]]:
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, bytes(65536))
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return w, [r, w]


HOSTILE = {"saturated-eventfd": _saturated_eventfd, "full-pipe": _full_pipe}


def _start_backend(tmp_path: Path, device: str) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp_path / "be.sock"
    spec = f"virtio-blk,{disk_image(tmp_path)}" if device == "blk" else "virtio-rnd"
    return start_listening(["vhost-user", spec, "--socket-path", str(sock)], sock), sock


def _request(drv: MockDriver, device: str) -> int:
    if device == "blk":  # a read of sector 0
        return drv.add_chain(readable=[struct.pack("<IIQ", 0, 0, 0)], writable=[512, 1])
    return drv.add_chain(writable=[64])


async def _answers(sock: Path, timeout: float = 3.0) -> bool:
    """Whether a new front end gets GET_FEATURES answered in time."""
    with trio.move_on_after(timeout):
        fe = await Frontend.connect(str(sock))
        try:
            return bool(await fe.call_u64(Req.GET_FEATURES) & p.F_PROTOCOL_FEATURES)
        finally:
            fe.close()
    return False


@pytest.mark.parametrize("device", ["blk", "rnd"])
@pytest.mark.parametrize("hostile", sorted(HOSTILE))
@pytest.mark.parametrize("when", ["handed-blocking", "cleared-after"])
async def test_a_full_call_fd_does_not_freeze_the_back_end(tmp_path, device, hostile, when):
    proc, sock = _start_backend(tmp_path, device)
    mem = GuestMemory(128 * MiB)
    call, keep = HOSTILE[hostile]()
    try:
        fe = await Frontend.connect(str(sock))
        try:
            await fe.negotiate(NO_EVENT_IDX)
            drv = await start(fe, mem)
            if when == "cleared-after":
                await fe.send(Req.SET_VRING_CALL, p.U64.pack(0), [call])
                assert await fe.call_u64(Req.GET_FEATURES)  # the back end took the fd
                os.set_blocking(call, True)  # the front end clears O_NONBLOCK again
            else:
                await fe.send(Req.SET_VRING_CALL, p.U64.pack(0), [call])
            await trio.sleep(0.05)  # the ring starts once the messages settle
            _request(drv, device)
            fe.kick_ring(0)
            with trio.fail_after(10):
                while drv.used_idx() != 1:  # the request completes, its signal is dropped
                    await trio.sleep(0.01)
            # the back end still answers this front end ...
            with trio.fail_after(3):
                assert await fe.call_u64(Req.GET_FEATURES) & p.F_PROTOCOL_FEATURES
            _request(drv, device)  # ... and serves the ring again
            fe.kick_ring(0)
            with trio.fail_after(10):
                while drv.used_idx() != 2:
                    await trio.sleep(0.01)
        finally:
            fe.close()
        assert await _answers(sock), "a new front end was not answered"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1].decode(errors="replace")
        for fd in keep:
            os.close(fd)
        mem.close()
    assert "Traceback" not in stderr, stderr


def _epoll_fd() -> int:
    ep = select.epoll()
    try:
        return os.dup(ep.fileno())
    finally:
        ep.close()


@pytest.mark.parametrize("kind", ["regular-file", "memfd", "dev-null", "epoll"])
async def test_call_and_kick_fds_that_are_not_eventfds_are_refused(tmp_path, kind):
    """What O_NONBLOCK means nothing for (a file on a FUSE mount the peer serves blocks
    as long as it likes) is refused with one line naming the ring and what the fd is."""
    sock = tmp_path / "rnd.sock"
    opener = {"regular-file": lambda: os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT),
              "memfd": lambda: os.memfd_create("x"),
              "dev-null": lambda: os.open(os.devnull, os.O_RDWR),
              "epoll": _epoll_fd}[kind]
    async with served(VirtioRnd(), sock):
        for req in (Req.SET_VRING_CALL, Req.SET_VRING_KICK, Req.SET_VRING_ERR):
            async with frontend(sock) as fe:
                await fe.negotiate()
                fd = opener()
                try:
                    status = await fe.ack(req, p.U64.pack(0), [fd])
                finally:
                    os.close(fd)
                assert status == 1  # REPLY_ACK failure, then the back end hangs up
                with pytest.raises(ConnectionError):
                    await fe.call_u64(Req.GET_FEATURES)


def test_peer_fd_kinds_and_non_blocking_use():
    """peerfd itself: what is accepted, and that no use of a hostile fd blocks."""
    e = os.eventfd(0)
    r, w = os.pipe()
    try:
        assert peerfd.adopt(e, "e") == "eventfd" and not os.get_blocking(e)
        assert peerfd.adopt(w, "w") == "fifo"
        assert peerfd.read_kick(e) == peerfd.NOTHING
        assert peerfd.signal_fd(e) is peerfd.Sent.SENT
        assert peerfd.read_kick(e) == peerfd.KICK
        os.eventfd_write(e, EVENTFD_MAX)
        assert peerfd.signal_fd(e) is peerfd.Sent.PENDING
        os.set_blocking(e, True)
        t0 = time.monotonic()
        assert peerfd.signal_fd(e) is peerfd.Sent.BLOCKED
        assert time.monotonic() - t0 < 1
        os.set_blocking(e, True)  # and a read another reader raced never blocks either
        os.eventfd_read(e)
        assert peerfd.read_kick(e) == peerfd.NOTHING
        os.write(w, b"abc")  # a partial value is a kick
        assert peerfd.read_kick(r) == peerfd.KICK
        os.close(w)
        w = -1
        assert peerfd.read_kick(r) == peerfd.CLOSED  # the writer hung up
    finally:
        for fd in (e, r, w):
            if fd >= 0:
                os.close(fd)
