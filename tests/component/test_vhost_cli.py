"""``acrn-pydm vhost-user``: the back-end program conventions of vhost-user.rst."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from devicemodel.memory import GuestMemory, MiB
from devicemodel.vhost_user import protocol as p
from devicemodel.vhost_user.protocol import Req
from tests.support.launch import start_listening
from tests.support.paths import REPO
from tests.support.vhost import NO_EVENT_IDX, frontend, start


def _cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devicemodel", "vhost-user", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30, **kw)


@pytest.mark.parametrize("spec,kind", [("virtio-rnd", "rng"), ("virtio-blk,/x.img", "block"),
                                       ("virtio-net,tap=t0", "net")])
def test_print_capabilities_is_json_and_ignores_the_rest(spec: str, kind: str) -> None:
    out = _cli(spec, "--print-capabilities", "--socket-path", "/nonexistent/dir/s")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"type": kind, "features": []}


def test_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    for args in (["virtio-bogus", "--socket-path", str(tmp_path / "s")],
                 ["virtio-rnd"],
                 ["virtio-rnd", "--socket-path", "a", "--fd", "3"],
                 ["virtio-blk,/does/not/exist.img", "--socket-path", str(tmp_path / "s")]):
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and "error:" in out.stderr, out.stderr


def _get_features(path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(p.encode(Req.GET_FEATURES, reply=False))
    reply = b""
    while len(reply) < 20:
        reply += s.recv(20 - len(reply))
    s.close()
    return p.U64.unpack_from(reply, 12)[0]


@contextmanager
def _rnd_backend(sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``acrn-pydm vhost-user virtio-rnd`` listening on ``sock``; killed if still running."""
    proc = start_listening(["vhost-user", "virtio-rnd", "--socket-path", str(sock)], sock)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_sigterm_ends_cleanly_and_removes_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "rnd.sock"
    with _rnd_backend(sock) as proc:
        # two front ends one after the other: the second finds the back end still serving
        for _ in range(2):
            assert _get_features(str(sock)) & p.F_PROTOCOL_FEATURES
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 3
        assert not sock.exists()


def test_inherited_fd(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = b.fileno()
    proc = subprocess.Popen([sys.executable, "-m", "devicemodel", "vhost-user", "virtio-rnd",
                             "--fd", str(fd)], cwd=REPO, pass_fds=[fd])
    b.close()
    a.settimeout(10)
    a.sendall(p.encode(Req.GET_FEATURES, reply=False))
    reply = b""
    while len(reply) < 20:
        reply += a.recv(20 - len(reply))
    assert p.U64.unpack_from(reply, 12)[0] & p.F_PROTOCOL_FEATURES
    a.close()  # the front end hangs up: a back end on an inherited connection exits
    assert proc.wait(10) == 0


async def test_sigusr2_logs_the_rings_and_serving_goes_on(tmp_path: Path) -> None:
    """A stall report asks a running back end for its rings' state: one log line per
    ring with both sides' indices, and the back end keeps serving (SIGUSR2's default
    action would have killed it)."""
    sock = tmp_path / "rnd.sock"
    mem = GuestMemory(128 * MiB)
    with _rnd_backend(sock) as proc:
        proc.send_signal(signal.SIGUSR2)  # no front end yet
        async with frontend(sock) as fe:
            await fe.negotiate(NO_EVENT_IDX)  # (the mock driver keeps used_event at 0)
            drv = await start(fe, mem)
            drv.add_chain(writable=[16])
            fe.kick_ring(0)
            with trio.fail_after(10):
                await fe.wait_call(0)
            proc.send_signal(signal.SIGUSR2)
            await trio.sleep(0.5)
            drv.add_chain(writable=[16])  # still serving
            fe.kick_ring(0)
            with trio.fail_after(10):
                await fe.wait_call(0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "virtio-rnd: no rings running (features 0x0)" in err, err
        assert ("virtio-rnd: queue 0: size 64, event_idx 0; avail idx 1 flags 0x0, popped to"
                " 1, avail_event 0; used idx 1 flags 0x0 (ours 1), used_event 0, last "
                "interrupt check at 0; enabled 1, kick=yes call=yes") in err, err
        assert "virtio-rnd: signals not written: none" in err
    mem.close()
