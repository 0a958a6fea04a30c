"""scripts/launch_user_vm.sh: shellcheck-clean, the command line it builds, its cleanup."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from devicemodel.config import SlotConfig, parse_args
from devicemodel.virtio.net import parse_net_options
from tests.support.paths import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "launch_user_vm.sh")


def test_shellcheck_clean():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck, in scripts/test.sh)")
    res = subprocess.run([sc, "--severity=style", SCRIPT], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout


def dry_run(**env: str) -> tuple[list[str], str]:
    full = {"PATH": os.environ["PATH"], **env}
    res = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True,
                         env=full, timeout=60)
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout)
    return argv, res.stderr


def test_dry_run_line_is_a_valid_acrn_dm_line():
    argv, log = dry_run(VM_NAME="linux1", VM_MEM="1024M", VM_CPUS="2 4", VM_KERNEL="/k",
                        VM_INITRD="/i", VM_BOOTARGS="console=ttyS0 quiet",
                        VM_DISK="/var/lib/acrn-pydm/l1.img", VM_TAP="acrn_tap_l1",
                        VM_PT="0000:03:00.1 0000:00:1f.3", PT_DRIVER="vfio-pci",
                        VM_LOGGER="console=4 disk=5")
    assert argv[0] == "acrn-pydm"
    cfg = parse_args(argv[1:], check_files=False)
    assert cfg.name == "linux1" and cfg.memsize == 1024 << 20
    assert cfg.cpu_affinity == [2, 4]
    assert (cfg.kernel, cfg.ramdisk, cfg.bootargs) == ("/k", "/i", "console=ttyS0 quiet")
    assert cfg.logger_setting == "console,level=4;disk,level=5"
    assert cfg.cmd_monitor == "/run/acrn-pydm/linux1.sock"
    assert [lp.device for lp in cfg.lpc] == ["com1"]
    slots = {(s.dev, s.func): s for s in cfg.slots}
    assert slots[(3, 0)] == SlotConfig(0, 3, 0, "virtio-blk", "/var/lib/acrn-pydm/l1.img")
    # ACRN's generated scripts' seed: the first wired port's MAC, then the VM name
    assert re.fullmatch(r"tap=acrn_tap_l1,mac_seed=([0-9a-f]{2}:){5}[0-9a-f]{2}-linux1|"
                        r"tap=acrn_tap_l1,mac_seed=linux1", slots[(4, 0)].options)
    # host BDFs become acrn-dm's hex bus/dev/func
    assert slots[(6, 0)] == SlotConfig(0, 6, 0, "passthru", "3/0/1")
    assert slots[(7, 0)] == SlotConfig(0, 7, 0, "passthru", "0/1f/3")
    # what it would have done, and undone on exit
    assert "dry-run: ip tuntap add dev acrn_tap_l1 mode tap" in log
    assert "dry-run: sh -c echo vfio-pci > /sys/bus/pci/devices/0000:03:00.1/driver_override" \
        in log
    assert "dry-run: ip link delete acrn_tap_l1" in log
    assert log.index("tuntap add") < log.index("link delete")


def test_every_vm_gets_its_own_mac():
    """Two VMs on one Service VM (same slot, same wired port) must not share a MAC."""
    macs = {}
    for name in ("vm1", "vm2"):
        argv, _ = dry_run(VM_NAME=name, VM_KERNEL="/k", VM_MAC_SEED=f"52:54:00:12:34:56-{name}")
        net = next(s for s in parse_args(argv[1:], check_files=False).slots
                   if s.emul == "virtio-net")
        assert net.options == f"tap=acrn_tap_{name},mac_seed=52:54:00:12:34:56-{name}"
        macs[name] = parse_net_options(net.options, net.dev, net.func).mac
    assert macs["vm1"] != macs["vm2"]
    # VM_HV picks acrn-pydm's backend (left to the device model when empty)
    argv, _ = dry_run(VM_NAME="vm1", VM_KERNEL="/k", VM_HV="sim")
    assert parse_args(argv[1:], check_files=False).hv == "sim"
    assert "--hv" not in dry_run(VM_KERNEL="/k")[0]
    # without VM_MAC_SEED the seed still ends in the VM name
    argv, _ = dry_run(VM_NAME="vm7", VM_KERNEL="/k")
    assert "-vm7 " in " ".join(argv) or ",mac_seed=vm7 " in " ".join(argv)


def test_dry_run_defaults_to_ovmf_and_pci_stub_under_acrn():
    argv, _ = dry_run(VM_TAP="", PT_DRIVER="pci-stub", VM_PT="0000:00:02.0")
    cfg = parse_args(argv[1:], check_files=False)
    assert cfg.ovmf is not None and cfg.ovmf.code == "/usr/share/acrn/bios/OVMF.fd"
    assert not any(s.emul == "virtio-net" for s in cfg.slots)
    assert any(s.options == "0/2/0" for s in cfg.slots)


FAKE_DM = """#!/bin/bash
# stands in for the device model: records its arguments and how it was stopped
out=$(dirname "$0")
printf '%s\\n' "$@" > "$out/args"
ip -o link show "$TAP" > "$out/tap_during" 2>&1
trap 'echo TERM > "$out/signal"; exit 0' TERM
touch "$out/started"
while :; do sleep 0.05; done
"""

DRIVER = """
set -u
ip link add acrn-br0 type bridge
VM_TAP=$TAP bash "$SCRIPT" > "$OUT/script.log" 2>&1 &
pid=$!
for _ in $(seq 200); do [ -e "$OUT/started" ] && break; sleep 0.05; done
kill -TERM "$pid"
wait "$pid"
echo "$?" > "$OUT/script_status"
ip link show "$TAP" > "$OUT/tap_after" 2>&1
echo done
"""


def test_tap_made_on_the_bridge_and_removed_on_sigterm(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip (iproute2) for a private network namespace")
    dm = tmp_path / "fake-dm"
    dm.write_text(FAKE_DM)
    dm.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "SCRIPT": SCRIPT, "OUT": str(tmp_path),
           "TAP": "acrn_tap_t1", "ACRN_DM": str(dm), "VM_NAME": "t1", "VM_CPUS": "1",
           "VM_KERNEL": "/k"}
    res = subprocess.run(["unshare", "-n", "bash", "-c", DRIVER], capture_output=True,
                         text=True, env=env, timeout=60)
    if res.returncode != 0 and "unshare" in res.stderr:
        pytest.skip(f"no network namespace here: {res.stderr.strip()}")
    assert res.stdout.strip() == "done", res.stderr
    assert (tmp_path / "signal").read_text().strip() == "TERM"  # forwarded to the DM
    assert (tmp_path / "script_status").read_text().strip() == "0"
    during = (tmp_path / "tap_during").read_text()
    assert "acrn_tap_t1" in during and "master acrn-br0" in during
    assert "does not exist" in (tmp_path / "tap_after").read_text()  # we made it, we removed it
    args = (tmp_path / "args").read_text().splitlines()
    assert parse_args(args, check_files=False).slots[-1].options.startswith(
        "tap=acrn_tap_t1,mac_seed=")


def test_existing_tap_is_kept(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip (iproute2) for a private network namespace")
    dm = tmp_path / "fake-dm"
    dm.write_text(FAKE_DM)
    dm.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "SCRIPT": SCRIPT, "OUT": str(tmp_path),
           "TAP": "acrn_tap_t2", "ACRN_DM": str(dm), "VM_NAME": "t2", "VM_CPUS": "1",
           "VM_KERNEL": "/k"}
    driver = "ip tuntap add dev acrn_tap_t2 mode tap\n" + DRIVER
    res = subprocess.run(["unshare", "-n", "bash", "-c", driver], capture_output=True,
                         text=True, env=env, timeout=60)
    if res.returncode != 0 and "unshare" in res.stderr:
        pytest.skip(f"no network namespace here: {res.stderr.strip()}")
    assert res.stdout.strip() == "done", res.stderr
    assert "acrn_tap_t2" in (tmp_path / "tap_after").read_text()  # not ours: left alone
