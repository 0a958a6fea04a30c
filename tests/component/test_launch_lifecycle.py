"""Lifecycle: signals stop the VM in order and release everything; one instance per name."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio

from devicemodel import cli
from devicemodel.config import ConfigError, parse_args
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.instance_lock import InstanceLock
from tests.support.fds import open_fds
from tests.support.paths import ROOT


def lock_is_free(path: str) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def start(tmp_path, name: str, *extra: str, grace: str = "0",
          acpi: bool = False) -> subprocess.Popen[str]:
    """A sim VM; ``grace`` is its shutdown_timeout. The sim guest never enables ACPI, so
    it cannot hear its power button; with ``acpi`` it has (tests/support/acpi_guest.py)
    and ignores the button."""
    env = dict(os.environ, PYTHONPATH=ROOT, ACRN_PYDM_RUNTIME_DIR=str(tmp_path / "run"))
    env.pop("NOTIFY_SOCKET", None)
    program = "tests.support.acpi_guest" if acpi else "devicemodel"
    return subprocess.Popen(
        [sys.executable, "-m", program, "--hv", "sim", "-m", "128M", "-s", "0:0,hostbridge",
         "--cmd_monitor", str(tmp_path / f"{name}.sock"), "--shutdown_timeout", grace, *extra,
         name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_running(tmp_path, name: str, proc: subprocess.Popen[str], timeout: float = 30) -> dict:
    """Ask the monitor for the status until it answers 'running'."""
    path = str(tmp_path / f"{name}.sock")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.communicate()}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(path)
                s.sendall(b'{"cmd": "status"}\n')
                reply = json.loads(s.makefile().readline())
            if reply["ok"] and reply["result"]["state"] == "running":
                return reply["result"]
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the VM did not come up")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops_in_order_and_leaves_nothing(tmp_path, sig):
    proc = start(tmp_path, "vm1")
    try:
        status = wait_running(tmp_path, "vm1", proc)
        assert status["pid"] == proc.pid
        lock = tmp_path / "run" / "vm1.lock"
        assert not lock_is_free(str(lock))
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"signal {signal.Signals(sig).name}" in err and "VM vm1 stopped" in err
    assert not (tmp_path / "vm1.sock").exists()
    assert lock_is_free(str(lock))


def test_second_instance_with_the_same_name_refuses(tmp_path):
    first = start(tmp_path, "vm1")
    try:
        wait_running(tmp_path, "vm1", first)
        second = start(tmp_path, "vm1")
        out, err = second.communicate(timeout=30)
        assert second.returncode == 2
        assert err.splitlines() == [
            f"acrn-pydm: error: VM 'vm1' is already running (pid {first.pid}): "
            f"{tmp_path / 'run' / 'vm1.lock'} is locked; stop that instance first or give "
            "this VM another name"]
        # the refused instance did not touch the running one's monitor
        assert wait_running(tmp_path, "vm1", first)["pid"] == first.pid
        # another name is fine alongside
        other = start(tmp_path, "vm2")
        wait_running(tmp_path, "vm2", other)
        other.send_signal(signal.SIGTERM)
        assert other.wait(timeout=30) == 0
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0


def test_a_crash_leaves_nothing_that_blocks_the_next_start(tmp_path):
    proc = start(tmp_path, "vm1")
    wait_running(tmp_path, "vm1", proc)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.communicate(timeout=30)
    # what a crash leaves: the lock file (unlocked) and a dead monitor socket
    assert (tmp_path / "run" / "vm1.lock").exists()
    assert (tmp_path / "vm1.sock").exists()
    again = start(tmp_path, "vm1")
    try:
        assert wait_running(tmp_path, "vm1", again)["pid"] == again.pid
    finally:
        again.send_signal(signal.SIGTERM)
        out, err = again.communicate(timeout=30)
    assert again.returncode == 0, err


def test_monitor_path_that_is_not_a_socket_is_refused(tmp_path):
    (tmp_path / "vm1.sock").write_text("precious")
    proc = start(tmp_path, "vm1")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "exists and is not a socket" in err.splitlines()[-1]
    assert (tmp_path / "vm1.sock").read_text() == "precious"


def test_repeated_sigterm_forces_the_stop(tmp_path):
    # default grace time is 60 s; a second SIGTERM a second later destroys at once
    proc = start(tmp_path, "vm1", grace="60", acpi=True)
    try:
        wait_running(tmp_path, "vm1", proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.2)
        assert proc.poll() is None  # waiting for the guest
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "destroying the VM now" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_guest_without_acpi_is_stopped_at_once(tmp_path, sig):
    """Ctrl-C on a guest that never set SCI_EN: it cannot answer the power button, so the
    60 s grace time would only be waited out (issue 18, item 8)."""
    proc = start(tmp_path, "vm1", grace="60")
    try:
        wait_running(tmp_path, "vm1", proc)
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert took < 10, took
    said = [ln for ln in err.splitlines() if "destroying the VM now" in ln]
    assert len(said) == 1 and "the guest never enabled ACPI, so it cannot answer the power " \
        "button" in said[0], err
    assert "power button pressed" not in err


def test_instance_lock_in_process(tmp_path):
    a = InstanceLock("vm1", str(tmp_path))
    a.acquire()
    assert (tmp_path / "vm1.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(ConfigError, match="already running"):
        InstanceLock("vm1", str(tmp_path)).acquire()
    with InstanceLock("vm2", str(tmp_path)):
        pass
    a.release()
    with InstanceLock("vm1", str(tmp_path)) as b:
        assert b.held
    assert not b.held


def test_lock_dir_that_cannot_be_made_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="ACRN_PYDM_RUNTIME_DIR"):
        InstanceLock("vm1", str(blocker / "sub")).acquire()


async def test_sigterm_releases_every_host_resource(monkeypatch, tmp_path):
    """In process: after SIGTERM the VM was paused, its client and VM destroyed, the monitor
    socket removed, and no file descriptor (guest RAM memfds, sockets) is left open."""
    import devicemodel.hsm as hsm

    sims: list[SimHypervisor] = []

    def fake_open(name, vcpus=None):
        sims.append(SimHypervisor(vcpus))
        return sims[-1]

    monkeypatch.setattr(hsm, "open_hypervisor", fake_open)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    sock = tmp_path / "m.sock"
    cfg = parse_args(["-m", "256M", "-s", "0:0,hostbridge", "--cmd_monitor", str(sock),
                      "--shutdown_timeout", "0", "vm1"])
    before = open_fds()

    async def kill_when_up() -> None:
        while not sock.exists():
            await trio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill_when_up)
        with trio.fail_after(30):
            await cli.run_vm(cfg)
    sim = sims[0]
    assert sim.state == "destroyed"
    calls = sim.calls
    assert calls.index("start_vm") < calls.index("pause_vm") < calls.index(
        "destroy_ioreq_client") < calls.index("destroy_vm")
    assert not sock.exists()
    # the sim hypervisor's own record of guest RAM holds views on it, as the kernel would;
    # once it is gone, nothing of the VM may remain open
    del sim, sims[:]
    assert open_fds() - before == set()


async def test_sigterm_lets_an_acpi_guest_power_off_by_itself(monkeypatch, caplog):
    """systemd's stop as a real OS sees it: SIGTERM → power button (PWRBTN_STS + SCI) →
    the guest's OSPM writes S5 to PM1a_CNT → the VM ends before the grace time is up."""
    import logging

    import devicemodel.hsm as hsm
    from devicemodel.platform.acpi import ACPI_ENABLE, PM1A_CNT_ADDR, PM1A_EVT_ADDR, SCI_INT
    from devicemodel.platform.pm import PM1_PWRBTN_EN, PM1_PWRBTN_STS, PM1_SLP_EN, SMI_CMD_PORT

    sims: list[SimHypervisor] = []

    def fake_open(name, vcpus=None):
        sims.append(SimHypervisor(vcpus))
        return sims[-1]

    monkeypatch.setattr(hsm, "open_hypervisor", fake_open)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    caplog.set_level(logging.INFO)
    cfg = parse_args(["-m", "128M", "-s", "0:0,hostbridge", "--shutdown_timeout", "30", "vm1"])
    seen: dict[str, int] = {}

    async def ospm() -> None:
        while not sims or sims[0].state != "running":
            await trio.sleep(0.01)
        sim = sims[0]
        guest = sim.guest()
        await guest.pio_write(SMI_CMD_PORT, 1, ACPI_ENABLE)
        await guest.pio_write(PM1A_EVT_ADDR + 2, 2, PM1_PWRBTN_EN)
        os.kill(os.getpid(), signal.SIGTERM)
        while sim.irqlines.get(SCI_INT) != 1:  # the SCI rises
            await trio.sleep(0.01)
        seen["status"] = await guest.pio_read(PM1A_EVT_ADDR, 2)
        await guest.pio_write(PM1A_EVT_ADDR, 2, PM1_PWRBTN_STS)  # acknowledge
        control = await guest.pio_read(PM1A_CNT_ADDR, 2)
        await guest.pio_write(PM1A_CNT_ADDR, 2, control | (5 << 10) | PM1_SLP_EN)  # S5

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ospm)
        with trio.fail_after(20):
            await cli.run_vm(cfg)
    assert seen["status"] & PM1_PWRBTN_STS
    assert trio.current_time() - t0 < 20
    assert sims[0].state == "destroyed"
    assert "power button pressed" in caplog.text
    assert "did not power off" not in caplog.text
