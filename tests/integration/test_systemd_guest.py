"""acrn-pydm@.service under a real systemd: a Debian 13 guest (QEMU TCG) whose PID 1 is
systemd runs acrn-pydm, installed from a wheel of this checkout, as a user would (issue 19).

One boot does everything (devicemodel/guestkit/systemd_guest.py, checks in
systemd_guest/checks.sh); each test below judges one point from what systemd, the journal
and /proc showed inside the guest. The VMs run on the sim backend (no KVM inside TCG).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from devicemodel.guestkit import systemd_guest
from devicemodel.guestkit.qemu import REPO, fetch_kernel
from devicemodel.guestkit.systemd_guest import NIC_MAC, Section, SystemdRun

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent / "systemd_guest"
BOOT_TIMEOUT_S = 1200
WATCHDOG_SEC = 20  # the unit's WatchdogSec=
EXPOSURE_TODAY = 3.0  # systemd-analyze security of the unit before issue 19 (systemd 252)


def vm_file(name: str, *, image: str | None = None, tap: str | None = None,
            extra: str = "") -> str:
    image = image or f"/var/lib/acrn-pydm/{name}.img"
    tap = tap or f"acrn_tap_{name}"
    return f"""# {name}: one VM of the integration test, on the sim backend inside the guest
hv = "sim"
memsize = "128M"
cmd_monitor = "/run/acrn-pydm/{name}.sock"
shutdown_timeout = 3
{extra}
[[lpc]]
device = "com1"
backend = "pty"

[[pci_slot]]
slot = "0:0"
emul = "hostbridge"

[[pci_slot]]
slot = "1:0"
emul = "lpc"

[[pci_slot]]
slot = 3
emul = "virtio-blk"
options = "{image}"

[[pci_slot]]
slot = 4
emul = "virtio-net"
options = "tap={tap},mac_seed={NIC_MAC}-{name}"

[[pci_slot]]
slot = 5
emul = "virtio-console"
options = "@socket:con0=/run/acrn-pydm/{name}-con.sock"
"""


def payload(wheel: Path, vmlinuz: Path) -> dict[str, Path | bytes]:
    files: dict[str, Path | bytes] = {
        wheel.name: wheel,
        "vmlinuz": vmlinuz,
        "launch_user_vm.sh": REPO / "scripts/launch_user_vm.sh",
        "monitor.py": HERE / "monitor.py",
        "probe.py": HERE / "probe.py",
        # vm1 uses the tap networkd creates (50-acrn_tap0.netdev), vm2 one of its own
        "vm1.toml": vm_file("vm1", tap="acrn_tap0").encode(),
        # vm2 asks for acrn-dm's disk and kmsg loggers too
        "vm2.toml": vm_file("vm2", extra='logger_setting = "console,level=4;disk,level=4;'
                                          'kmsg,level=3"').encode(),
        "vm1-missing-image.toml": vm_file(
            "vm1", tap="acrn_tap0", image="/var/lib/acrn-pydm/missing.img").encode(),
        "vm1-busy-tap.toml": vm_file("vm1", tap="acrn_tap_vm2").encode(),
        "vm1-bad.toml": vm_file("vm1", tap="acrn_tap0", extra='memsise = "1G"').encode(),
    }
    for unit in sorted((REPO / "systemd").rglob("*")):
        if unit.is_file():
            files[str(unit.relative_to(REPO))] = unit
    return files


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> SystemdRun:
    why = systemd_guest.why_not()
    if why:
        pytest.skip(why)
    kernel = fetch_kernel()
    try:
        image = systemd_guest.ensure_image(kernel)
    except systemd_guest.RootUnavailable as e:
        pytest.skip(str(e))
    work = tmp_path_factory.mktemp("systemd-guest")
    wheel = systemd_guest.build_wheel(REPO, work / "wheel")
    initrd = systemd_guest.boot_initramfs(kernel, (HERE / "checks.sh").read_text(),
                                          payload(wheel, kernel.vmlinuz), work / "boot.cpio.gz")
    run = systemd_guest.run_guest(image, initrd, work, BOOT_TIMEOUT_S)
    (work / "console.log").write_text(run.console)
    print(f"guest packages: {image.versions}")
    return run


def test_guest_script_is_shellcheck_clean(tmp_path):
    """The checks run where nobody watches them: at least they must be sound shell."""
    import shutil
    import subprocess

    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck, in scripts/test.sh)")
    script = tmp_path / "checks.sh"
    script.write_text("#!/bin/bash\n" + systemd_guest.PRELUDE + (HERE / "checks.sh").read_text())
    res = subprocess.run([sc, "--severity=warning", str(script)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout


def test_sections_read_back_what_the_prelude_prints():
    """The framing the guest script uses, run by bash here, parses back to the same facts."""
    import subprocess

    script = systemd_guest.PRELUDE + (
        "section one echo hello\n"
        "section two sh -c 'echo out; echo err >&2; exit 3'\n"
        "section three true\n"
        "echo '@@ BEGIN cut'; echo half\n")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         timeout=60).stdout
    sections = systemd_guest.parse_sections(out.replace("\n", "\r\n"))  # a serial line
    assert sections == {"one": Section(0, "hello"), "two": Section(3, "out\nerr"),
                        "three": Section(0, ""), "cut": Section(-1, "half")}


def show(section: Section) -> dict[str, str]:
    """``systemctl show`` output as a dict."""
    return dict(line.split("=", 1) for line in section.text.splitlines() if "=" in line)


def replies(section: Section) -> list[dict]:
    return [json.loads(line) for line in section.text.splitlines() if line.startswith("{")]


def check(guest: SystemdRun, name: str, rc: int = 0) -> Section:
    sec = guest.section(name)
    assert sec.rc == rc, f"{name}: rc {sec.rc}, expected {rc}:\n{sec.text}\n{guest.report()}"
    return sec


def test_installed_as_a_user_would(guest):
    versions = check(guest, "versions").text
    assert "systemd 25" in versions or "systemd 26" in versions, versions
    install = check(guest, "install").text
    assert "Successfully installed acrn-pydm" in install, install
    which = check(guest, "which").text.splitlines()
    # pip puts console scripts in /usr/local/bin; the unit finds it by name (ExecStart=)
    assert which[0] == "/usr/local/bin/acrn-pydm" and which[1].startswith("acrn-pydm ")
    links = check(guest, "networkd").text
    # networkd made the bridge and the persistent tap, and enslaved the wired port
    assert re.search(r"acrn_tap0: .* master acrn-br0", links), links
    assert re.search(r"\d+: e\w+: .* master acrn-br0", links), links


def test_1_active_only_after_ready_and_status_shown(guest):
    states = check(guest, "start-states").text.split()[1:]
    # activating while Python starts and the VM is built, active only on READY=1
    assert states[-1] == "active" and "activating" in states, states
    times = show(check(guest, "start-time"))
    ready_after = (int(times["ActiveEnterTimestampMonotonic"])
                   - int(times["ExecMainStartTimestampMonotonic"])) / 1e6
    assert ready_after > 0.2, times
    props = show(check(guest, "start-show"))
    assert props["ActiveState"] == "active" and props["SubState"] == "running"
    assert props["StatusText"] == "VM vm1 running: 1 vCPU(s), 128M RAM, hypervisor sim", props
    status = check(guest, "start-status").text
    assert 'Status: "VM vm1 running: 1 vCPU(s), 128M RAM, hypervisor sim"' in status, status
    # the VM does everything it must under the sandbox: monitor, console socket, tap, image
    status_reply, devices_reply = replies(check(guest, "start-monitor"))
    assert status_reply["ok"] and status_reply["result"]["state"] == "running"
    assert status_reply["result"]["pid"] == int(props["MainPID"])
    emuls = {d["emul"] for d in devices_reply["result"]["devices"]}
    assert {"virtio-blk", "virtio-net", "virtio-console"} <= emuls, devices_reply
    assert check(guest, "start-console").text.strip() == \
        "connected /run/acrn-pydm/vm1-con.sock"
    fds = check(guest, "start-fds").text
    assert "/var/lib/acrn-pydm/vm1.img" in fds and "iff:\tacrn_tap0" in fds, fds
    assert re.search(r"acrn_tap0: .* master acrn-br0", check(guest, "start-links").text)
    journal = check(guest, "start-journal").text.splitlines()
    # systemd says "Started" only after the VM was built and running (READY=1)
    started = journal.index("Started acrn-pydm@vm1.service - ACRN user VM vm1 (acrn-pydm).")
    running = [i for i, line in enumerate(journal)
               if line.endswith(": VM vm1 running with 1 vCPU(s)")]
    assert running and running[0] < started, journal


def test_4_sandbox_applied_to_the_running_service(guest):
    status = dict(line.split(":", 1) for line in check(guest, "sandbox-status").text.splitlines())
    status = {k: v.strip() for k, v in status.items()}
    assert status["Seccomp"] == "2" and int(status["Seccomp_filters"]) >= 1, status  # filter
    assert status["NoNewPrivs"] == "1"
    # CAP_NET_ADMIN (12), CAP_IPC_LOCK (14), CAP_SYS_ADMIN (21) and nothing else
    wanted = (1 << 12) | (1 << 14) | (1 << 21)
    assert int(status["CapEff"], 16) == wanted and int(status["CapBnd"], 16) == wanted, status
    ns = check(guest, "sandbox-mntns").text.split()
    assert len(ns) == 2 and ns[0] != ns[1], "the service has its own mount namespace"
    mounts = {}
    for line in check(guest, "sandbox-mountinfo").text.splitlines():
        fields = line.split()
        mounts[fields[4]] = (fields[3], fields[5].split(","))
    assert "ro" in mounts["/"][1], "ProtectSystem=strict: / is read-only"
    assert "rw" in mounts["/var/lib/acrn-pydm"][1], "ReadWritePaths= for the images"
    assert "rw" in mounts["/run/acrn-pydm"][1] and "rw" in mounts["/var/log/acrn-dm"][1]
    assert "systemd-private" in mounts["/tmp"][0], "PrivateTmp="
    assert "inaccessible" in mounts["/dev/kmsg"][0], "ProtectKernelLogs= hides /dev/kmsg"


def test_4_sandbox_bites_with_the_units_own_settings(guest):
    """The unit with a probe as its program: what the sandbox lets a process do."""
    check(guest, "probe-start")
    lines = check(guest, "probe-output").text.splitlines()
    got = dict(line.split(" ", 1) for line in lines if " " in line)
    expected = {
        "mount": "EPERM",  # CAP_SYS_ADMIN is there: only SystemCallFilter=~@mount stops it
        "chown": "EPERM",  # needs no capability here: only ~@privileged stops it
        "af_packet": "EAFNOSUPPORT", "af_unix": "ok", "af_inet": "ok",
        "dev_net_tun": "ok", "dev_ptmx": "ok",
        "dev_vda": "EPERM", "dev_mem": "EPERM",  # DevicePolicy=closed
        "dev_kmsg_write": "EACCES", "dev_kmsg_read": "EACCES",  # ProtectKernelLogs=
        "write_etc": "EROFS", "write_usr": "EROFS", "write_root_home": "EROFS",
        "write_var_lib": "ok", "write_run": "ok", "write_tmp": "ok",
        "memfd": "ok", "read_vm_file": "ok",
    }
    assert {k: got.get(k) for k in expected} == expected, "\n".join(lines)
    # PrivateTmp=: what the probe wrote to its /tmp is not in the system's
    tmp = check(guest, "probe-tmp").text
    assert "No such file" in tmp and "probe" in tmp.splitlines()[1:], tmp


def test_4_exposure_score_no_worse(guest):
    text = check(guest, "sandbox-security").text
    m = re.search(r"Overall exposure level for acrn-pydm@vm1.service: (\d+\.\d+)", text)
    assert m, text[-2000:]
    score = float(m.group(1))
    print(f"systemd-analyze security acrn-pydm@vm1 in the guest: {score}")
    assert score <= EXPOSURE_TODAY


def test_2_watchdog_kills_a_stopped_service_and_restarts_it(guest):
    timing = check(guest, "watchdog-time").text
    killed, again = (float(x) for x in re.findall(r"elapsed (\d+\.\d+)", timing))
    # pings every WatchdogSec/2: the last one came 0-10 s before SIGSTOP
    assert WATCHDOG_SEC / 2 - 1 <= killed <= WATCHDOG_SEC + 10, timing
    assert again < killed + 5 + 90, timing  # RestartSec=5, then a start
    journal = check(guest, "watchdog-journal").text
    assert f"Watchdog timeout (limit {WATCHDOG_SEC}s)!" in journal, journal
    assert "with signal SIGABRT" in journal and "Failed with result 'watchdog'" in journal
    assert "restart counter is at 1" in journal
    props = show(check(guest, "watchdog-show"))
    assert props["ActiveState"] == "active" and props["NRestarts"] == "1", props
    after_restart(check(guest, "watchdog-after"))


def after_restart(sec: Section) -> None:
    """The new instance got everything the old one held: lock, tap, monitor, console."""
    lines = sec.text.splitlines()
    pid = lines[0].split()[1]
    assert lines[1] == f"lock {pid}", sec.text
    assert "iff:\tacrn_tap0" in lines, sec.text
    (reply,) = [json.loads(x) for x in lines if x.startswith("{")]
    assert reply["result"]["pid"] == int(pid) and reply["result"]["state"] == "running"
    assert "connected /run/acrn-pydm/vm1-con.sock" in lines


def test_2_a_crash_restarts_and_nothing_blocks_the_new_instance(guest):
    journal = check(guest, "crash-journal").text
    assert "code=killed, status=9/KILL" in journal and "Failed with result 'signal'" in journal
    assert "restart counter is at 2" in journal
    props = show(check(guest, "crash-show"))
    assert props["ActiveState"] == "active" and props["NRestarts"] == "2", props
    after_restart(check(guest, "crash-after"))


def test_3_second_instance_refuses_with_one_line(guest):
    lines = check(guest, "duplicate", rc=2).text.splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(r"acrn-pydm: error: VM 'vm1' is already running \(pid \d+\): "
                        r"/run/acrn-pydm/vm1.lock is locked; .*", lines[0]), lines


def test_3_two_vms_side_by_side_with_different_macs(guest):
    props = show(check(guest, "vm2-show"))
    assert props["ActiveState"] == "active", props
    macs = {}
    for reply in replies(check(guest, "macs")):
        (net,) = [d for d in reply["result"]["devices"] if d["emul"] == "virtio-net"]
        macs[net["counters"]["tap"]] = net["counters"]["mac"]
    assert set(macs) == {"acrn_tap0", "acrn_tap_vm2"}, macs
    assert macs["acrn_tap0"] != macs["acrn_tap_vm2"], macs
    assert all(m.startswith("00:16:3e:") for m in macs.values()), macs  # acrn-dm's prefix
    ports = check(guest, "bridge-ports").text
    assert "acrn_tap0:" in ports and "acrn_tap_vm2:" in ports, ports
    # vm2's loggers: the disk log under LogsDirectory=, kmsg refused in one warning line
    assert check(guest, "vm2-disk-log").text.splitlines() == ["vm2.log", "1"]
    journal = check(guest, "vm2-journal").text
    kmsg = [ln for ln in journal.splitlines() if "kmsg" in ln]
    assert kmsg == ["devicemodel: kmsg logger disabled: /dev/kmsg: Permission denied"], journal


def test_3_stop_is_clean_and_quick(guest):
    check(guest, "stop")
    took = float(check(guest, "stop-time").text.split()[1])
    assert took < 90, took  # TimeoutStopSec=90; the VM file gives the guest 3 s
    props = show(check(guest, "stop-show"))
    assert (props["ActiveState"], props["Result"], props["ExecMainStatus"]) == \
        ("inactive", "success", "0"), props
    journal = check(guest, "stop-journal").text
    # the sim guest never enables ACPI: it cannot hear the power button, so the stop does
    # not wait the VM file's 3 s grace (tests/component/test_launch_systemd.py covers the
    # grace time with a guest that can hear it)
    assert "destroying the VM now (the guest never enabled ACPI" in journal, journal
    assert "Deactivated successfully." in journal and "SIGKILL" not in journal


@pytest.mark.parametrize("case,words", [
    ("image", "virtio-blk: cannot open /var/lib/acrn-pydm/missing.img: No such file"),
    ("tap", "virtio-net: tap=acrn_tap_vm2: Device or resource busy"),
    ("file", 'memsise = "1G": unknown key'),
    ("nofile", "/etc/acrn-pydm/vm1.toml: no such VM file"),
])
def test_6_start_errors_are_one_journal_line_and_the_unit_fails(guest, case, words):
    text = check(guest, f"error-{case}").text
    first = text.splitlines()
    rc_line = next(ln for ln in first if ln.startswith("start rc="))
    took = float(rc_line.split("elapsed ")[1])
    assert rc_line.startswith("start rc=1 ") and took < 100, text  # fails, does not hang
    props = show(Section(0, text.split("--- service")[0]))
    assert (props["ActiveState"], props["Result"], props["ExecMainStatus"],
            props["NRestarts"]) == ("failed", "exit-code", "2", "0"), props  # not restarted
    assert props["StatusText"].startswith("failed: ") and words in props["StatusText"], props
    service = text.split("--- service")[1].split("--- err")[0].strip().splitlines()
    errors = [ln for ln in service if "error" in ln.lower()]
    assert len(errors) == 1 and words in errors[0], service
    # at error priority: journalctl -p err shows exactly that line
    assert text.split("--- err")[1].strip().splitlines() == errors, text


def test_5_launch_script_dry_run_and_real_run(guest):
    dry = check(guest, "launch-dry").text
    line = next(ln for ln in dry.splitlines() if ln.startswith("acrn-pydm "))
    assert "--hv sim" in line, line
    # the seed is the Service VM's wired port MAC and the VM name, as ACRN's scripts do
    assert f"tap=acrn_tap_vm3\\,mac_seed={NIC_MAC}-vm3" in line, line
    assert "dry-run: ip tuntap add dev acrn_tap_vm3 mode tap" in dry
    status, devices = replies(check(guest, "launch-running"))
    assert status["result"]["state"] == "running" and status["result"]["hv"] == "sim"
    (net,) = [d for d in devices["result"]["devices"] if d["emul"] == "virtio-net"]
    assert net["options"] == f"tap=acrn_tap_vm3,mac_seed={NIC_MAC}-vm3"
    assert "acrn_tap_vm3: " in check(guest, "launch-running").text  # the script made it
    (off,) = replies(check(guest, "launch-poweroff"))
    assert off["result"]["action"] == "destroying the VM now"
    out = guest.section("launch-exit").text
    assert "script rc=0" in out, out
    assert 'Device "acrn_tap_vm3" does not exist.' in out, out  # it removed its tap
    assert "VM vm3 stopped" in out
