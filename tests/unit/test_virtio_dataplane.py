"""A data-plane thread (virtio/dataplane.py) survives any kick fd a peer hands over.

A vhost-user front end chooses the kick fd. QEMU sends an eventfd; a hostile or broken
one may send a pipe that hangs up, a socket, a regular file, or a pipe holding fewer than
eight bytes. None of these may stop the device, make the thread spin on a descriptor
that is always readable, or keep it from stopping; kicks that reach the loop (``poke``)
must still be served.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devicemodel.memory import MiB
from devicemodel.virtio.dataplane import Dataplane
from devicemodel.virtio.mock import GuardedMemory, MockDriver
from devicemodel.virtio.queue import Virtqueue

SETTLE_S = 0.3
#: A thread waiting as it should serves a handful of times in SETTLE_S; a spinning one
#: serves (and polls) tens of thousands of times.
MAX_IDLE_SERVES = 20


class _Ring:
    """Stands in for a Virtqueue: counts the thread's serve calls, never has work."""

    def __init__(self) -> None:
        self.serves = 0
        self.lock = threading.Lock()

    def serve(self, _q: object) -> bool:
        with self.lock:
            self.serves += 1
        return False

    def enable_notification(self) -> bool:
        return False

    def disable_notification(self) -> None:
        pass

    def has_available(self) -> bool:
        return False

    def interrupt_unheeded(self) -> bool:
        return False


def _eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextmanager
def _dataplane(kick: int) -> Iterator[tuple[Dataplane, _Ring, list[str]]]:
    ring = _Ring()
    failures: list[str] = []
    dp = Dataplane("test-dataplane", ring, kick, ring.serve, failures.append)  # type: ignore[arg-type]
    try:
        yield dp, ring, failures
    finally:
        t0 = time.monotonic()
        dp.stop()
        assert time.monotonic() - t0 < 2, "stop() waited on the thread"
        assert not any(t.name == "test-dataplane" for t in threading.enumerate())


def _pipe_hung_up(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    r, w = os.pipe()
    return r, lambda: os.close(w)


def _pipe_partial(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    r, w = os.pipe()
    return r, lambda: os.write(w, b"\1\0\0")  # three of an eventfd value's eight bytes


def _pipe_partial_then_hung_up(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    r, w = os.pipe()

    def act() -> None:
        os.write(w, b"\1\0\0")
        os.close(w)

    return r, act


def _socket_partial(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    a, b = socket.socketpair()
    _keep.append(b)
    return a.detach(), lambda: b.send(b"\1\0")


def _socket_hung_up(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    a, b = socket.socketpair()
    return a.detach(), b.close


def _listening_socket(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "kick.sock"))
    s.listen(1)

    def connect() -> None:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(tmp_path / "kick.sock"))
        _keep.append(c)

    return s.detach(), connect


def _regular_file(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    path = tmp_path / "kick"
    path.write_bytes(b"")
    return os.open(path, os.O_RDONLY), lambda: None


def _regular_file_with_data(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    path = tmp_path / "kick"
    path.write_bytes(b"\1" * 4096 * 64)
    return os.open(path, os.O_RDONLY), lambda: None


def _dev_zero(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    return os.open("/dev/zero", os.O_RDONLY), lambda: None


def _pipe_write_end(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    r, w = os.pipe()
    return w, lambda: os.close(r)


def _unpollable_anon_inode(tmp_path: Path) -> tuple[int, Callable[[], None]]:
    """A Landlock ruleset: an anonymous inode, like an eventfd, but with no poll at all
    (epoll refuses it with EPERM)."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(struct.pack("<Q", 1))  # handled_access_fs: execute
    fd = libc.syscall(444, attr, 8, 0)  # landlock_create_ruleset
    if fd < 0:
        pytest.skip(f"no Landlock here: {os.strerror(ctypes.get_errno())}")
    return fd, lambda: None


_keep: list[socket.socket] = []

KINDS = {
    "pipe that hung up": _pipe_hung_up,
    "pipe with a partial value": _pipe_partial,
    "pipe with a partial value, then hung up": _pipe_partial_then_hung_up,
    "socket with a partial value": _socket_partial,
    "socket whose peer hung up": _socket_hung_up,
    "listening socket": _listening_socket,
    "empty regular file": _regular_file,
    "regular file with data": _regular_file_with_data,
    "/dev/zero": _dev_zero,
    "anonymous inode that cannot be polled": _unpollable_anon_inode,
    "write end of a pipe without a reader": _pipe_write_end,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_any_kick_fd_leaves_the_thread_serving(tmp_path: Path, kind: str) -> None:
    kick, act = KINDS[kind](tmp_path)
    try:
        with _dataplane(kick) as (dp, ring, failures):
            _eventually(lambda: ring.serves >= 1, "the first serve")
            act()
            time.sleep(SETTLE_S)
            assert failures == [], f"the device was stopped: {failures}"
            with ring.lock:
                idle = ring.serves
            assert idle <= MAX_IDLE_SERVES, f"the thread spun: {idle} serves in {SETTLE_S}s"
            dp.poke()  # a kick that came through the loop is still served
            _eventually(lambda: ring.serves > idle, "a poked serve")
    finally:
        for s in _keep:
            s.close()
        _keep.clear()


def test_an_eventfd_kick_is_served_each_time() -> None:
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    peer = os.dup(kick)
    try:
        with _dataplane(kick) as (_, ring, failures):
            _eventually(lambda: ring.serves >= 1, "the first serve")
            for n in range(2, 6):
                os.eventfd_write(peer, 1)
                _eventually(lambda n=n: ring.serves >= n, f"serve {n}")
            time.sleep(0.05)
            assert ring.serves <= 6 and failures == []
    finally:
        os.close(peer)


@pytest.mark.parametrize("kind", ["eventfd", "pipe"])
def test_a_device_loop_runs_on_an_eventfd_kick_only(kind: str) -> None:
    """A device's own loop (``lane``) sleeps edge-triggered, never reading the kick: so
    it gets an eventfd kick only; a pipe's bytes would wake it for ever. It is woken once
    per kick and poke, and ends at stop."""
    if kind == "eventfd":
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        peer = os.dup(kick)
    else:
        kick, peer = os.pipe()
    ring = _Ring()
    wakes: list[int] = []

    def lane(dp: Dataplane) -> bool:
        while not dp.stopping:
            assert dp.poll is not None
            if dp.poll(5.0):
                wakes.append(1)
        return True

    dp = Dataplane("test-lane", ring, kick, ring.serve, lambda _: None,  # type: ignore[arg-type]
                   lane=lane)
    try:
        if kind == "eventfd":
            for n in range(1, 4):
                os.eventfd_write(peer, 1)
                _eventually(lambda n=n: len(wakes) == n, f"wake-up {n}")
            dp.poke()
            _eventually(lambda: len(wakes) == 4, "the poke")
            time.sleep(0.05)
            assert len(wakes) == 4 and ring.serves == 0
        else:
            _eventually(lambda: ring.serves >= 1, "the general loop")
            os.write(peer, b"\1" * 8)
            _eventually(lambda: ring.serves >= 2, "the kick served")
            assert wakes == []
    finally:
        t0 = time.monotonic()
        dp.stop()
        assert time.monotonic() - t0 < 2
        os.close(peer)


def test_drain_never_waits_even_if_the_front_end_cleared_o_nonblock():
    """The front end shares the kick fd's open file description: it can clear O_NONBLOCK
    and read its own kick before our thread does. The drain must still come back
    (issue 18: a data-plane thread stuck in read() cannot be stopped)."""
    import threading

    from devicemodel.virtio.dataplane import drain_kick

    fd = os.eventfd(0)  # blocking, counter 0: what the thread finds after the race
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(drain_kick(fd)), daemon=True)
    try:
        t.start()
        t.join(2)
        assert not t.is_alive(), "drain_kick blocked in read()"
        assert result == [True]  # nothing there, the fd is still alive
    finally:
        os.eventfd_write(fd, 1)  # frees a reader stuck in the old code
        t.join(2)
        os.close(fd)


# --- a kick or an interrupt the guest lost ---------------------------------------------


@contextmanager
def _served_ring(monkeypatch: pytest.MonkeyPatch, event_idx: bool = True
                 ) -> Iterator[tuple[MockDriver, Virtqueue, Dataplane, list[int], int]]:
    """A real ring served by a data-plane thread that looks again after 50 ms idle; the
    used idx at each interrupt it sends again; the kick eventfd (never written here)."""
    monkeypatch.setattr(Dataplane, "idle_s", 0.05)
    drv = MockDriver(GuardedMemory([(0, 8 * MiB)]), 0x10000, 8)
    q = drv.queue()
    q.start(event_idx=event_idx, indirect=False)
    again: list[int] = []

    def serve(q: Virtqueue) -> bool:
        chain = q.pop()
        if chain is None:
            return False
        q.add_used(chain.head, 0)
        q.needs_notification()  # (the interrupt it may send is lost on the way)
        return True

    kick = os.eventfd(0, os.EFD_NONBLOCK)
    dp = Dataplane("test-lost", q, kick, serve, lambda _: None,
                   lambda q: again.append(q.used_idx))
    try:
        yield drv, q, dp, again, kick
    finally:
        dp.stop()


def test_requests_posted_without_a_kick_are_served_after_a_pause(monkeypatch):
    """A guest whose barriers are missing reads a stale avail_event and does not kick."""
    with _served_ring(monkeypatch) as (drv, q, dp, _, _):
        time.sleep(0.1)  # the thread sleeps, no kick will come
        drv.add_chain([], [16])
        _eventually(lambda: drv.used_idx() == 1, "the unkicked request served")
        assert dp.unkicked == 1


def test_an_interrupt_the_driver_missed_is_sent_again_once(monkeypatch):
    """The driver's used_event stays short of our used idx (it waits for an interrupt):
    one more interrupt after the pause, not one every pause."""
    with _served_ring(monkeypatch) as (drv, q, dp, again, kick):
        drv.set_used_event(0)
        drv.add_chain([], [16])
        os.eventfd_write(kick, 1)
        _eventually(lambda: again == [1], "the interrupt sent again")
        time.sleep(0.3)  # six more pauses
        assert again == [1] and dp.reinterrupted == 1
        drv.set_used_event(1)  # the driver took it and asks for the next one
        drv.add_chain([], [16])
        os.eventfd_write(kick, 1)
        _eventually(lambda: drv.used_idx() == 2, "the second request served")
        time.sleep(0.3)
        assert again == [1, 2]


def test_a_driver_that_caught_up_gets_no_extra_interrupt(monkeypatch):
    with _served_ring(monkeypatch) as (drv, q, dp, again, kick):
        drv.set_used_event(1)  # it will have taken everything by the time we look
        drv.add_chain([], [16])
        os.eventfd_write(kick, 1)
        _eventually(lambda: drv.used_idx() == 1, "the request served")
        time.sleep(0.3)
        assert again == [] and dp.reinterrupted == 0 and dp.unkicked == 0
