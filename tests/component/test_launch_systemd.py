"""systemd: the units pass systemd-analyze, and a real run speaks sd_notify correctly."""

from __future__ import annotations

import configparser
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from devicemodel import sdnotify
from tests.support.paths import ROOT

UNIT = os.path.join(ROOT, "systemd", "acrn-pydm@.service")
NETWORK = os.path.join(ROOT, "systemd", "network")
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(Debian package systemd, in scripts/test.sh)")


def _unit_copy(tmp_path) -> str:
    """The unit with ExecStart pointing at a binary that exists here (verify checks it)."""
    exe = shutil.which("acrn-pydm") or sys.executable
    text = pathlib.Path(UNIT).read_text().replace("ExecStart=acrn-pydm", f"ExecStart={exe}")
    (tmp_path / "acrn-pydm@.service").write_text(text)
    (tmp_path / "acrn-pydm@vm1.service").symlink_to("acrn-pydm@.service")
    return str(tmp_path / "acrn-pydm@vm1.service")


@needs_analyze
def test_unit_verifies_without_a_single_warning(tmp_path):
    inst = _unit_copy(tmp_path)
    res = subprocess.run([ANALYZE, "verify", "--man=no", inst], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # verify exits 0 on unknown keys; any line about our file is a defect
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if "acrn-pydm@" in ln]
    assert ours == []


@needs_analyze
def test_unit_verify_would_catch_a_typo(tmp_path):
    """The check above can fail: a misspelt directive is reported."""
    inst = _unit_copy(tmp_path)
    unit = tmp_path / "acrn-pydm@.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSistem=strict"))
    res = subprocess.run([ANALYZE, "verify", "--man=no", inst], capture_output=True,
                         text=True, timeout=120)
    assert "ProtectSistem" in res.stdout + res.stderr


@needs_analyze
def test_unit_sandbox_exposure(tmp_path):
    """systemd's own score of the sandbox (0 = locked down, 10 = exposed)."""
    inst = _unit_copy(tmp_path)
    res = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", inst],
                         capture_output=True, text=True, timeout=120)
    if "--offline" in res.stderr and res.returncode != 0:
        pytest.skip("this systemd-analyze has no offline security mode")
    line = [ln for ln in res.stdout.splitlines() if "Overall exposure level" in ln]
    assert line, res.stdout + res.stderr
    score = float(line[0].split(":")[1].split()[0])
    print(f"systemd-analyze security exposure: {score}")
    assert score <= 4.0


def test_unit_contents():
    """The promises of the unit, read as systemd would parse them."""
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment]
    # repeated keys (DeviceAllow=) collapse in configparser; read those by hand
    text = pathlib.Path(UNIT).read_text()
    cp.read_string(text)
    svc = cp["Service"]
    assert svc["Type"] == "notify"
    # by name, so a pip install (/usr/local/bin) and a distribution package both work
    assert svc["ExecStart"] == "acrn-pydm run /etc/acrn-pydm/%i.toml"
    assert int(svc["WatchdogSec"]) > 0
    assert int(svc["TimeoutStopSec"]) > 60  # above the default shutdown_timeout
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["RestartPreventExitStatus"] == "2"
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["PrivateTmp"] == "yes"
    assert "ReadWritePaths=-/var/lib/acrn-pydm" in text
    allowed = [ln.split("=", 1)[1].split()[0] for ln in text.splitlines()
               if ln.startswith("DeviceAllow=")]
    for dev in ("/dev/acrn_hsm", "/dev/acrn_vhm", "/dev/kvm", "/dev/net/tun",
                "/dev/vfio/vfio", "char-vfio"):
        assert dev in allowed
    # ProtectKernelLogs= hides /dev/kmsg whatever DeviceAllow= says (seen under systemd 257)
    assert svc["ProtectKernelLogs"] == "yes" and "/dev/kmsg" not in allowed
    # a VM without a file must fail loudly, not be skipped by a condition
    assert "ConditionPathExists" not in cp["Unit"]
    assert svc["DevicePolicy"] == "closed"
    assert set(svc["CapabilityBoundingSet"].split()) == {
        "CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_IPC_LOCK"}
    assert "SystemCallFilter=@system-service" in text


def test_networkd_files_as_acrn_ships():
    def load(name: str) -> configparser.ConfigParser:
        cp = configparser.ConfigParser(interpolation=None)
        cp.optionxform = str  # type: ignore[assignment]
        cp.read(os.path.join(NETWORK, name))
        return cp

    bridge = load("50-acrn.netdev")
    assert dict(bridge["NetDev"]) == {"Name": "acrn-br0", "Kind": "bridge"}
    ports = load("50-acrn.network")
    assert set(ports["Match"]["Name"].split()) == {"e*", "acrn_tap*", "tap*"}
    assert ports["Network"]["Bridge"] == "acrn-br0"
    eth = load("50-eth.network")
    assert eth["Match"]["Name"] == "acrn-br0" and eth["Network"]["DHCP"] == "ipv4"
    tap = load("50-acrn_tap0.netdev")
    assert tap["NetDev"]["Kind"] == "tap"
    # the taps the networkd files create are the ones the bridge network enslaves
    assert tap["NetDev"]["Name"].startswith("acrn_tap")


# --- sd_notify from a real run ------------------------------------------------------------

class NotifyListener:
    """What systemd does: a datagram socket that collects the service's messages."""

    def __init__(self, tmp_path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"acrn-pydm-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = str(tmp_path / "notify.sock")
            self.sock.bind(path)
            self.env_value = path
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        for msg in self.messages:
            if key in msg:
                return msg
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(msg)
            if key in msg:
                return msg
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def drain(self) -> None:
        """Collect what is still queued (the service has exited)."""
        self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            self.messages.append(dict(line.split("=", 1) for line in
                                      data.decode().splitlines() if "=" in line))

    def count(self, key: str) -> int:
        return sum(1 for m in self.messages if key in m)

    def close(self) -> None:
        self.sock.close()


def start_vm(tmp_path, *args: str, env: dict[str, str] | None = None,
             acpi: bool = False) -> subprocess.Popen[str]:
    """A sim VM; with ``acpi`` its guest has enabled ACPI (and ignores the power button)."""
    full = dict(os.environ, PYTHONPATH=ROOT, ACRN_PYDM_RUNTIME_DIR=str(tmp_path / "run"))
    full.pop("NOTIFY_SOCKET", None)
    full.pop("WATCHDOG_USEC", None)
    full.update(env or {})
    program = "tests.support.acpi_guest" if acpi else "devicemodel"
    return subprocess.Popen([sys.executable, "-m", program, "--hv", "sim", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full,
                            cwd=ROOT)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_status_watchdog_stopping(tmp_path, abstract):
    listener = NotifyListener(tmp_path, abstract)
    # a guest that enabled ACPI but ignores its power button: destroyed after 1 s
    proc = start_vm(tmp_path, "-m", "128M", "-s", "0:0,hostbridge", "--shutdown_timeout", "1",
                    "vm1", acpi=True,
                    env={"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "200000"})
    try:
        first = listener.wait_for("STATUS")
        assert "building" in first["STATUS"]
        ready = listener.wait_for("READY")
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(proc.pid)
        assert "running" in ready["STATUS"] and "vm1" in ready["STATUS"]
        # pinged every 100 ms: several pings in half a second
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.6:
            listener.wait_for("WATCHDOG")
            listener.messages = [m for m in listener.messages if "WATCHDOG" not in m] + \
                [{"PING": "1"}]
        pings = listener.count("PING")
        assert pings >= 3, pings
        proc.send_signal(signal.SIGTERM)
        t_stop = time.monotonic()
        stopping = listener.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1" and "SIGTERM" in stopping["STATUS"]
        # systemd is told the stop may take the guest's grace time
        extend = listener.wait_for("EXTEND_TIMEOUT_USEC")
        assert int(extend["EXTEND_TIMEOUT_USEC"]) >= 1_000_000
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert time.monotonic() - t_stop >= 0.9
        assert "power button pressed" in err and "did not power off within 1 s" in err
        listener.drain()
        statuses = [m["STATUS"] for m in listener.messages if "STATUS" in m]
        assert statuses[-1] == "VM vm1 stopped", statuses
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        listener.close()


def test_watchdog_is_not_pinged_when_meant_for_another_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == pytest.approx(0.1)
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None


def test_notifier_without_systemd_is_silent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = sdnotify.Notifier()
    assert not n.enabled and n.notify(READY=1) is False
    # a socket that vanished must not raise either
    n = sdnotify.Notifier("/nonexistent/notify.sock")
    assert n.enabled and n.notify(READY=1) is False
    n.close()


def test_journald_priority_prefixes(tmp_path):
    """With JOURNAL_STREAM naming stderr, every log line carries its syslog priority."""
    err_path = tmp_path / "stderr"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("JOURNAL_STREAM", None)
    script = (
        "import logging, os, sys\n"
        "st = os.fstat(2)\n"
        "if sys.argv[1] == 'journal':\n"
        "    os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from devicemodel.logsetup import setup_logging\n"
        "setup_logging('console,level=5')\n"
        "log = logging.getLogger('devicemodel.x')\n"
        "log.error('e'); log.warning('w'); log.log(25, 'n'); log.info('i'); log.debug('d')\n"
        "try:\n    1/0\nexcept ZeroDivisionError:\n    log.exception('boom')\n"
    )
    with open(err_path, "w") as err:
        subprocess.run([sys.executable, "-c", script, "journal"], stderr=err, env=env,
                       check=True, timeout=60)
    lines = err_path.read_text().splitlines()
    assert lines[:5] == ["<3>devicemodel.x: e", "<4>devicemodel.x: w", "<5>devicemodel.x: n",
                         "<6>devicemodel.x: i", "<7>devicemodel.x: d"]
    assert lines[5] == "<3>devicemodel.x: boom"
    assert all(ln.startswith("<3>") for ln in lines[5:])  # the traceback too
    # without JOURNAL_STREAM: a plain console format, no prefixes
    with open(err_path, "w") as err:
        subprocess.run([sys.executable, "-c", script, "plain"], stderr=err, env=env,
                       check=True, timeout=60)
    plain = err_path.read_text().splitlines()
    assert plain[0] == "acrn-pydm[devicemodel.x] ERROR: e"
    assert not any(ln.startswith("<") for ln in plain)


def test_logger_setting_levels_and_disk_logger(tmp_path, monkeypatch):
    import io
    import logging

    from devicemodel.logsetup import setup_logging

    monkeypatch.setenv("ACRN_PYDM_LOG_DIR", str(tmp_path))
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        problems = setup_logging("console,level=2;disk,level=5", vm_name="vm9", stream=stream)
        assert problems == []
        log = logging.getLogger("devicemodel.t")
        log.info("info line")
        log.warning("warn line")
        log.debug("debug line")
        for h in root.handlers:
            h.flush()
        assert stream.getvalue().splitlines() == ["acrn-pydm[devicemodel.t] WARNING: warn line"]
        disk = (tmp_path / "vm9.log").read_text()
        assert "info line" in disk and "warn line" in disk and "debug line" in disk
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


async def test_a_stalled_event_loop_stops_the_watchdog_pings(tmp_path):
    """The pings come from the trio loop itself: while it is blocked, systemd hears nothing
    (and after WatchdogSec kills and restarts the service)."""
    import threading

    import trio

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "wd.sock")
    listener.bind(path)
    listener.settimeout(0.5)
    stamps: list[float] = []
    done = threading.Event()

    def collect() -> None:
        while not done.is_set():
            try:
                if listener.recv(64) == b"WATCHDOG=1":
                    stamps.append(time.monotonic())
            except TimeoutError:
                pass

    reader = threading.Thread(target=collect)
    reader.start()
    notifier = sdnotify.Notifier(path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sdnotify.watchdog, notifier, 0.02)
            await trio.sleep(0.2)
            stall_start = time.monotonic()
            time.sleep(0.6)  # a device handler that blocks the loop
            stall_end = time.monotonic()
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    finally:
        done.set()
        reader.join()
        listener.close()
        notifier.close()
    # (a ping sent just before the stall may be read a little late by the thread)
    during = [t for t in stamps if stall_start + 0.25 < t < stall_end]
    assert during == []
    assert sum(1 for t in stamps if t < stall_start) >= 4
    assert any(t > stall_end for t in stamps)  # and they resume with the loop


def test_start_error_is_at_error_priority_and_becomes_the_status(tmp_path):
    """Under systemd a start error is one line at error priority (journalctl -p err) and the
    unit's status, not the last step before it (seen in the systemd guest, issue 19)."""
    listener = NotifyListener(tmp_path)
    missing = tmp_path / "nosuch.toml"
    script = ("import os, sys\n"
              "st = os.fstat(2)\n"
              "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
              "from devicemodel.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    err_path = tmp_path / "stderr"
    env = dict(os.environ, PYTHONPATH=ROOT, NOTIFY_SOCKET=listener.env_value)
    try:
        with open(err_path, "w") as err:
            res = subprocess.run([sys.executable, "-c", script, "run", str(missing)],
                                 stderr=err, env=env, timeout=60)
        assert res.returncode == 2
        assert err_path.read_text() == (f"<3>acrn-pydm: error: {missing}: no such VM file; "
                                        "give the path of a .toml VM file\n")
        status = listener.wait_for("STATUS", timeout=5)["STATUS"]
        assert status == f"failed: {missing}: no such VM file; give the path of a .toml VM file"
    finally:
        listener.close()
