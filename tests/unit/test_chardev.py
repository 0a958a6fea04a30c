"""devicemodel.chardev's host ends on their own: sockets' client policies, files, ptys.

The devices on top (UART, virtio-console ports) are tested through the guest in
tests/component; here each end's promise: non-blocking, bounded, and undone at close.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from devicemodel.chardev import HostEnd, connect_unix, listen_unix, open_file, open_pty


async def _connect(path: Path) -> trio.socket.SocketType:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await s.connect(str(path))
    return s


async def _read_one(end: HostEnd) -> bytes:
    with trio.fail_after(5):
        return await end.read(100)


@pytest.mark.parametrize("takeover", [False, True])
async def test_a_server_serves_one_client_at_a_time(tmp_path: Path, takeover: bool) -> None:
    """One-at-a-time (the UART's): the second client waits until the first leaves.
    Takeover (virtio-console's): the newest client gets the port."""
    end = listen_unix(str(tmp_path / "s"), backlog=4, takeover=takeover)
    flips: list[bool] = []
    try:
        async with trio.open_nursery() as n:
            n.start_soon(end.serve, lambda: flips.append(end.connected))
            first = await _connect(tmp_path / "s")
            await first.send(b"one")
            assert await _read_one(end) == b"one"
            second = await _connect(tmp_path / "s")
            await second.send(b"two")
            await trio.sleep(0.1)
            if takeover:
                assert await _read_one(end) == b"two"
                assert await first.recv(10) == b""  # the first was dropped
            else:
                assert end.read_now(100) is None  # the second is not served yet
                assert end.write_now(b"to first") == len(b"to first")
                assert await first.recv(100) == b"to first"
                first.close()
                assert await _read_one(end) == b"two"  # the next client, once it left
            assert end.write_now(b"hi") == 2
            assert await second.recv(10) == b"hi"
            second.close()
            with trio.fail_after(5):
                while end.connected:
                    await trio.sleep(0.01)
                    end.read_now(100)
            assert end.write_now(b"lost") is None  # nobody to take it
            n.cancel_scope.cancel()
    finally:
        end.close()
    assert not (tmp_path / "s").exists()
    assert flips[-1] is False and True in flips


async def test_a_client_end_does_not_reconnect(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen(1)
    end = connect_unix(str(tmp_path / "s"))
    peer, _ = listener.accept()
    try:
        assert end.connected and end.write_now(b"x") == 1 and peer.recv(1) == b"x"
        peer.close()
        with trio.move_on_after(0.3):
            await end.read(10)  # sees the hang-up, then waits for a peer that never comes
        assert not end.connected and end.write_now(b"y") is None
    finally:
        end.close()
        listener.close()


async def test_a_peer_that_never_reads_fills_only_its_socket(tmp_path: Path) -> None:
    end = listen_unix(str(tmp_path / "s"))
    try:
        async with trio.open_nursery() as n:
            n.start_soon(end.serve, lambda: None)
            peer = await _connect(tmp_path / "s")
            with trio.fail_after(5):
                while not end.connected:
                    await trio.sleep(0.01)
            taken, chunk = 0, bytes(65536)
            for _ in range(1000):  # 64 MiB offered; the socket buffer takes a few hundred KiB
                n_ = end.write_now(chunk)
                assert n_ is not None
                if n_ == 0:
                    break
                taken += n_
            assert 0 < taken < 16 << 20 and end.write_now(chunk) == 0
            with trio.move_on_after(0.1) as waited:
                await end.wait_writable()
            assert waited.cancelled_caught  # full: wait_writable waits, it does not spin
            peer.close()
            n.cancel_scope.cancel()
    finally:
        end.close()


def test_a_stale_socket_is_replaced_but_no_other_file(tmp_path: Path) -> None:
    path = tmp_path / "s"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    listen_unix(str(path)).close()  # a socket left by an earlier run: replaced
    path.write_text("keep me")
    with pytest.raises(OSError):
        listen_unix(str(path))
    assert path.read_text() == "keep me"


def test_a_file_on_a_fifo_without_reader_is_refused_not_waited_for(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # ENXIO at once (a blocking open would wait forever)
        open_file(str(fifo))
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        end = open_file(str(fifo))
        try:
            total = 0
            while (n := end.write_now(bytes(65536))) and total < 64 << 20:
                total += n
            assert n == 0 and total < 64 << 20  # a full pipe takes nothing more, at once
        finally:
            end.close()
    finally:
        os.close(r)


def test_a_pty_link_is_made_and_removed_and_never_clobbers(tmp_path: Path) -> None:
    link = tmp_path / "console"
    end = open_pty(str(link))
    try:
        assert os.readlink(link) == end.path and end.terminal
    finally:
        end.close()
    assert not os.path.lexists(link)
    link.write_text("a user's file")
    with pytest.raises(OSError):
        open_pty(str(link))
    assert link.read_text() == "a user's file"
