"""acrn-dm's command line: the typical generated launch line, getopt's forms, every error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.config import (
    ConfigError,
    HelpRequested,
    LpcConfig,
    OvmfConfig,
    SlotConfig,
    VersionRequested,
    VmConfig,
    parse_args,
)
from devicemodel.config.acrn_args import LAPIC_PT_ALONE
from devicemodel.memory import GiB, MiB
from tests.support.launch import typical_line
from tests.support.paths import ROOT


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "devicemodel", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd or ROOT, timeout=60)


def test_typical_acrn_launch_line(images):
    cfg = parse_args(typical_line(images))
    assert cfg.name == "POST_STD_VM1"
    assert cfg.windows is True
    assert cfg.cpu_affinity == [0, 2]
    assert cfg.vcpus == 2 and cfg.cpu_affinity_mask == 0b101
    assert cfg.memsize == 4 * GiB
    assert cfg.ovmf == OvmfConfig(images["ovmf"], None, False)
    assert cfg.slots == [
        SlotConfig(0, 1, 0, "lpc"),
        SlotConfig(0, 0, 0, "hostbridge"),
        SlotConfig(0, 3, 0, "virtio-console", "@stdio:stdio_port"),
        SlotConfig(0, 4, 0, "virtio-net",
                   "tap=WaaG,mac_seed=00:11:22:33:44:55-POST_STD_VM1"),
        SlotConfig(0, 5, 0, "virtio-blk", images["disk"]),
        SlotConfig(0, 2, 0, "passthru", "0/2/0"),
    ]
    assert cfg.logger_setting == "console,level=4;kmsg,level=3;disk,level=5"
    assert cfg.kernel is None and cfg.elf is None and cfg.debugexit is False
    assert cfg.warnings == []
    # the description prints back to a line that parses to the same VM
    assert parse_args(cfg.to_args()) == cfg


def test_slot_forms_match_acrn_dm():
    cfg = parse_args(["-s", "0:3:1,virtio-rnd", "-s", "7,virtio-rnd", "-s", "8:2,virtio-rnd",
                      "-s", "1:4:0,virtio-rnd,x", "-s", "9.1,virtio-rnd",
                      "-s", "10,virtio-blk,b,disk.img", "vm"], check_files=False)
    assert [(s.bus, s.dev, s.func) for s in cfg.slots] == [
        (0, 3, 1), (0, 7, 0), (0, 8, 2), (1, 4, 0), (0, 9, 1), (0, 10, 0)]
    assert cfg.slots[3].options == "x"
    boot = cfg.slots[5]
    assert boot.boot is True and boot.options == "disk.img"
    # "b" alone (no comma after it) is an option, not the boot marker, as in acrn-dm
    assert parse_args(["-s", "3,virtio-blk,b", "vm"]).slots[0] == \
        SlotConfig(0, 3, 0, "virtio-blk", "b", False)


def test_getopt_forms():
    cfg = parse_args(["-m2G", "--memsize=1024M", "--cpu_aff=1,3", "vm2", "--debugexit",
                      "-l", "com1,stdio", "-l", "COM2,tcp:server,port=1",
                      "--lpc=com5,stdio,0x2f8,3"])
    assert cfg.memsize == 1024 * MiB  # the last -m wins
    assert cfg.cpu_affinity == [1, 3]
    assert cfg.name == "vm2" and cfg.debugexit
    assert cfg.lpc == [LpcConfig("com1", "stdio"), LpcConfig("com2", "tcp:server,port=1"),
                       LpcConfig("com5", "stdio", ("0x2f8", "3"))]
    # a value that looks like an option is still the value, as with getopt
    assert parse_args(["-B", "-v", "-k", "k", "vm"], check_files=False).bootargs == "-v"
    # "--" ends the options: a VM may even be called like a subcommand
    assert parse_args(["-m", "256M", "--", "run"]).name == "run"


def test_help_and_version_anywhere():
    with pytest.raises(HelpRequested):
        parse_args(["-m", "1G", "vm", "--help"])
    with pytest.raises(VersionRequested):
        parse_args(["-Av"])  # clustered short options


def test_obsolete_options_are_ignored_with_a_warning():
    cfg = parse_args(["-A", "-Y", "-G", "x", "-i", "y", "--vsbl", "z", "--part_info", "p",
                      "--mac_seed", "s", "--pm_by_vuart", "pty", "--iasl", "/usr/bin/iasl",
                      "-s", "3,npk", "vm"])
    assert cfg == VmConfig(name="vm")
    assert len(cfg.warnings) == 10
    assert all("ignored" in w for w in cfg.warnings)


UNSUPPORTED = [
    (["--enable_trusty"], "--enable_trusty", "trusty"),
    (["--vtpm2", "sock_path=/run/swtpm"], "--vtpm2", "vtpm2"),
    (["--ssram", "1"], "--ssram", "vSSRAM"),
    (["-U", "uuid"], "-U", "UUID"),
    (["--enable_t"], "--enable_trusty", "trusty"),  # abbreviations resolve first
]


@pytest.mark.parametrize(("args", "name", "why"), UNSUPPORTED)
def test_unsupported_options_refused_by_name(args, name, why):
    with pytest.raises(ConfigError) as e:
        parse_args([*args, "vm"])
    assert str(e.value).startswith(f"not supported by acrn-pydm: {name} (")
    assert why in str(e.value)


def test_real_time_and_platform_passthrough_options():
    """What acrn-dm does with them (main.c, vmmapi.c's vm_create): --rtvm implies the
    LAPIC passthrough, --lapic_pt alone is ignored with a warning."""
    cfg = parse_args(["--rtvm", "--intr_monitor", "10000,10,1,100",
                      "--mmiodev_pt", "0xFED40000,0x5000", "--acpidev_pt", "MSFT0101,00", "vm"])
    assert cfg.rtvm and cfg.vm_flag == (1 << 1) | (1 << 2) | (1 << 4) | (1 << 11)
    assert (cfg.intr_monitor.threshold, cfg.intr_monitor.period) == (10000, 10)
    assert cfg.mmiodev_pt[0].base == 0xFED40000 and cfg.acpidev_pt[0].hid == "MSFT0101"
    assert parse_args(cfg.to_args()) == cfg
    alone = parse_args(["--lapic_pt", "vm"])
    assert alone.vm_flag == 0 and alone.warnings == [LAPIC_PT_ALONE]
    assert parse_args(["--rtv", "vm"]).rtvm  # abbreviations resolve
    pm = parse_args(["--pm_notify_channel", "uart,allow_trigger_s5", "vm"])
    assert pm.warnings == ["--pm_notify_channel is obsolete and ignored"]
    assert parse_args(["--logger_setting", "console,level=5;kmsg,level=6", "vm"]).logger_setting


# Each bad command line, and a word its one-line message must contain.
ERRORS = [
    (["vm"] * 2, "expected one VM name"),
    (["-m", "1G"], "VM name is missing"),
    (["-m", "100M", "vm"], "minimum of 128"),
    (["-m", "129M", "vm"], "2 MiB"),
    (["-m", "lots", "vm"], "suffix"),
    (["-m"], "needs a value"),
    (["--memsize"], "needs a value"),
    (["-s", "3", "vm"], "missing the emulation"),
    (["-s", "3,", "vm"], "missing the emulation name"),
    (["-s", "x,virtio-blk", "vm"], "decimal"),
    (["-s", "32,virtio-blk", "vm"], "slot 0..31"),
    (["-s", "0:3:8,virtio-blk", "vm"], "function 0..7"),
    (["-s", "1:2:3:4,virtio-blk", "vm"], "decimal"),
    (["-s", "3,virtio-rnd", "-s", "3:0,virtio-rnd", "vm"], "already used"),
    (["-l", "com9,stdio", "vm"], "unknown LPC device"),
    (["-l", "com5,stdio", "vm"], "com5,<backend>,<port>,<irq>"),
    (["-l", "com5,stdio,port,3", "vm"], "not a number"),
    (["-l", "com1,stdio", "-l", "com1,pty", "vm"], "given twice"),
    (["--ovmf", "code=a", "vm"], "vars="),
    (["--ovmf", "bogus=a", "vm"], "code=<path>"),
    (["--ovmf", "/nonexistent/OVMF.fd", "vm"], "does not exist"),
    (["-k", "/nonexistent/bzImage", "vm"], "does not exist"),
    (["-k", "/", "vm"], "not a regular file"),
    (["-r", "/etc/hostname", "vm"], "needs a kernel"),
    (["-k", "/etc/hostname", "-E", "/etc/hostname", "vm"], "exclude each other"),
    (["--cpu_affinity", "a,b", "vm"], "comma-separated"),
    (["--cpu_affinity", "1,1", "vm"], "listed twice"),
    (["--cpu_affinity", "256", "vm"], "0..255"),
    (["--cpu_affinity", ",".join(map(str, range(17))), "vm"], "at most 16"),
    (["--virtio_poll", "10", "vm"], "1000..10000000"),
    (["--virtio_poll", "fast", "vm"], "nanoseconds"),
    (["--logger_setting", "console,level=x", "vm"], "N a number"),
    (["--logger_setting", "kmsg,level=4294967296", "vm"], "N a number"),
    (["--intr_monitor", "10000,10,1", "vm"], "10000,10,1,100"),
    (["--intr_monitor", "10000,0,1,100", "vm"], "at least 1"),
    (["--mmiodev_pt", "fed40000", "vm"], "<base>,<size> in hex"),
    (["--mmiodev_pt", "0xfed40010,0x1000", "vm"], "4 KiB pages"),
    (["--acpidev_pt", "INT3F0D", "vm"], "unsupported ACPI device"),
    (["--mmiodev_pt", "0x1000,0x1000", "--mmiodev_pt", "0x2000,0x1000",
      "--acpidev_pt", "MSFT0101", "vm"], "at most 2"),
    (["--pm_notify_channel", "bogus", "vm"], "--pm_notify_channel bogus"),
    (["--logger_setting", "syslog,level=3", "vm"], "unknown logger"),
    (["--hv", "xen", "vm"], "unknown backend"),
    (["--shutdown_timeout", "-1", "vm"], "0..3600"),
    (["--debugexit=yes", "vm"], "takes no value"),
    (["--bogus", "vm"], "unknown option --bogus"),
    (["-Z", "vm"], "unknown option -Z"),
    (["--v", "vm"], "ambiguous"),
    (["a" * 16], "1 to 15"),
    (["-m", "1G", "-Ax"], "unknown option -x"),
    (["--", "bad/name"], "may not contain"),
    (["--cmd_monitor", "", "vm"], "socket path"),
    (["-B", "x" * 2048, "-k", "/etc/hostname", "vm"], "2047"),
]


@pytest.mark.parametrize(("args", "needle"), ERRORS)
def test_error_messages_in_process(args, needle):
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_every_error_path_exits_2_with_one_line(tmp_path):
    """The real program: one line on stderr naming problem and fix, exit status 2."""
    cases = ERRORS[::3] + [(a, n) for a, n, _ in UNSUPPORTED[:3]] + \
        [(["-s", "3,virtio-gpu", "vm"], "not supported")]
    # one interpreter per case is slow on a shared machine: batch them through a helper
    script = (
        "import sys, io, contextlib\n"
        "from devicemodel.cli import main\n"
        "import json\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main(args)\n"
        "    out.append([rc, err.getvalue()])\n"
        "print(json.dumps(out))\n"
    )
    import json

    env = dict(os.environ, PYTHONPATH=ROOT, ACRN_PYDM_RUNTIME_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", script, json.dumps([c[0] for c in cases])],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    for (args, needle), (rc, err) in zip(cases, json.loads(res.stdout), strict=True):
        assert rc == 2, (args, err)
        lines = err.splitlines()
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith("acrn-pydm: error: ") and needle in lines[0], (args, err)


def test_subprocess_exit_codes():
    bad = run_cli("-m", "100M", "vm1")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "acrn-pydm: error: -m 100M: memory size 100 MiB is below the minimum of 128 MiB; "
        "give at least 128M in 2M steps"]
    refused = run_cli("--vtpm2", "sock_path=/x", "vm1")
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith(
        "acrn-pydm: error: not supported by acrn-pydm: --vtpm2 (")
    ok = run_cli("--help")
    assert ok.returncode == 0 and "usage: acrn-pydm" in ok.stdout
    ver = run_cli("-v")
    assert ver.returncode == 0 and ver.stdout.startswith("acrn-pydm ")
    none = run_cli()
    assert none.returncode == 2 and "usage" in none.stderr


_token = st.one_of(
    st.sampled_from(["-s", "-m", "-l", "-k", "-B", "-A", "-v", "--ovmf", "--cpu_affinity",
                     "--virtio_poll", "--logger_setting", "--hv", "--lpc=", "--pci_slot=",
                     "--", "-", "--x", "vm", "3,virtio-blk", "0:0,hostbridge", "com1,stdio",
                     "1G", "0,1", "w,code=a,vars=b", "console,level=4", "-m4G", "-sx"]),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_token, max_size=8))
def test_any_argv_gives_a_config_or_a_clean_error(argv):
    try:
        cfg = parse_args(argv, check_files=False)
    except (ConfigError, HelpRequested, VersionRequested) as e:
        assert "\n" not in str(e)
    else:
        assert parse_args(cfg.to_args(), check_files=False) == cfg


def test_cpu_affinity_takes_lapic_ids_as_acrn_dm(monkeypatch):
    """acrn-dm HEAD maps each LAPIC id to its pCPU through the host MADT (lapic_to_pcpu)."""
    import devicemodel.config.model as model

    cfg = parse_args(["--cpu_affinity", "2,6", "vm"])
    monkeypatch.setattr(model, "host_lapic_ids", lambda: [0, 2, 4, 6])  # SMT siblings hidden
    assert cfg.pcpus == [1, 3] and cfg.cpu_affinity_mask == 0b1010
    monkeypatch.setattr(model, "host_lapic_ids", lambda: [])  # no MADT: ids are pCPUs
    assert cfg.pcpus == [2, 6] and cfg.cpu_affinity_mask == (1 << 2) | (1 << 6)
    wide = parse_args(["--cpu_affinity", "200", "vm"])
    with pytest.raises(ConfigError, match="beyond the 64"):
        _ = wide.cpu_affinity_mask
