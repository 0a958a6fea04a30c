"""The UART and virtio-console on chardev's host ends, as a user meets them: a terminal
left as it was, stdio held by one device, a host that never reads, a path that is a FIFO.

Each runs acrn-pydm as a child process (a sim VM, or a vhost-user back end driven by our
front end), since stdio and the controlling terminal belong to a process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import trio

from devicemodel.memory import GuestMemory, MiB
from devicemodel.vhost_user.frontend import Frontend, RingSetup
from devicemodel.vhost_user.protocol import Req
from devicemodel.virtio.device import VIRTIO_F_RING_EVENT_IDX
from devicemodel.virtio.mock import MockDriver, wait_used
from tests.support.paths import ROOT

VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, ACRN_PYDM_RUNTIME_DIR=str(tmp_path / "run"))
    env.pop("NOTIFY_SOCKET", None)
    return env


def _sim_vm(tmp_path: Path, *args: str, **kw) -> subprocess.Popen[bytes]:  # noqa: ANN003
    return subprocess.Popen(
        [sys.executable, "-m", "devicemodel", "--hv", "sim", "-m", "128M",
         "-s", "0:0,hostbridge", "--cmd_monitor", str(tmp_path / "mon.sock"),
         "--shutdown_timeout", "0", *args, "vm"],
        env=_env(tmp_path), cwd=ROOT, **kw)


def _wait_running(tmp_path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the VM exited early"
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(tmp_path / "mon.sock"))
                s.sendall(b'{"cmd": "status"}\n')
                reply = json.loads(s.makefile().readline())
            if reply["ok"] and reply["result"]["state"] == "running":
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the VM did not come up")


def _error_lines(err: bytes) -> list[str]:
    """What the process said went wrong (it may log what it set up before that)."""
    return [ln for ln in err.decode().splitlines() if "error" in ln.lower() or "Trace" in ln]


STDIO_DEVICES = {
    "uart": ["-s", "1:0,lpc", "-l", "com1,stdio"],
    "console": ["-s", "3,virtio-console,@stdio:con0"],
}


@pytest.mark.parametrize("device", list(STDIO_DEVICES))
def test_the_terminal_is_raw_while_running_and_restored_on_exit(tmp_path: Path,
                                                                device: str) -> None:
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON and before[3] & termios.ECHO
    proc = _sim_vm(tmp_path, *STDIO_DEVICES[device], stdin=slave, stdout=slave,
                   stderr=subprocess.PIPE)
    try:
        _wait_running(tmp_path, proc)
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO), "stdin is not raw"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        assert termios.tcgetattr(slave) == before, "the terminal was not restored"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def test_only_one_device_may_hold_stdio(tmp_path: Path) -> None:
    proc = _sim_vm(tmp_path, *STDIO_DEVICES["uart"], *STDIO_DEVICES["console"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    errors = _error_lines(err)
    assert len(errors) == 1 and "stdio is already used by another device" in errors[0], errors


@pytest.mark.parametrize("args", [
    ["-s", "1:0,lpc", "-l", "com1,file:{fifo}"],
    ["-s", "3,virtio-console,file:log={fifo}"],
    ["-s", "3,virtio-blk,{fifo},ro"],
], ids=["uart-file", "console-file", "blk-image"])
def test_a_fifo_without_a_reader_is_a_clear_error_not_a_hang(tmp_path: Path,
                                                             args: list[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = _sim_vm(tmp_path, *(a.format(fifo=fifo) for a in args),
                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    errors = _error_lines(err)
    assert len(errors) == 1 and str(fifo) in errors[0] and "reader" in errors[0], errors


async def test_a_console_on_stdout_nobody_reads_never_stalls_the_back_end(
        tmp_path: Path) -> None:
    """stdout is a pipe nobody reads: the guest's output beyond the pipe's buffer is
    dropped (a terminal never stalls the guest), and the back end keeps answering."""
    vu_sock = tmp_path / "con.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "devicemodel", "vhost-user", "virtio-console,@stdio:con0",
         "--socket-path", str(vu_sock)],
        cwd=ROOT, env=_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    mem = GuestMemory(128 * MiB)
    try:
        with trio.fail_after(30):
            while not vu_sock.exists():
                assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
                await trio.sleep(0.02)
        fe = await Frontend.connect(str(vu_sock))
        try:
            await fe.negotiate(~(VIRTIO_CONSOLE_F_MULTIPORT | VIRTIO_F_RING_EVENT_IDX))
            assert await fe.set_mem_table(mem) == 0
            rx = MockDriver(mem, 0x10_0000, 64, index=0, data_size=1 << 20)
            tx = MockDriver(mem, 0x40_0000, 64, index=1, data_size=8 << 20)
            for d in (rx, tx):
                await fe.start_ring(RingSetup(d.index, 64, d.desc_addr, d.avail_addr,
                                              d.used_addr))
            chunk = b"x" * (64 * 1024)
            for _ in range(4):  # 4 x 16 x 64 KiB = 4 MiB into a 64 KiB pipe
                heads = [tx.add_chain(readable=[chunk]) for _ in range(16)]
                fe.kick_ring(1)
                with trio.fail_after(10):
                    used = await wait_used(tx, len(heads))
                assert sorted(h for h, _ in used) == sorted(heads)
            with trio.fail_after(10):
                assert await fe.call_u64(Req.GET_FEATURES)  # still answering
        finally:
            fe.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        mem.close()
