"""Real acrn-dm command lines from ACRN's repository, run unchanged (issue 16 item 1).

Every line of tests/data/acrn_launch_lines.toml goes through ``acrn-pydm config
--from-args``, ``acrn-pydm lspci`` and a short ``acrn-pydm --hv sim`` run, in this process,
after the rewriting the data file describes (paths to this test's files, passthrough to the
synthetic host devices, LAPIC ids to this host's). A line acrn-dm at the corpus's commit
accepts must pass all three: ``config`` prints a VM file that parses back to the same VM,
``lspci`` shows every ``-s`` function, and the sim guest reads every function's vendor ID
(a hypervisor-emulated one from the simulated hypervisor) while the VM runs. A line that
needs a device this project leaves out is refused by all three in one line naming the
device; a line acrn-dm itself refuses is refused here too. Nothing may crash.

The summary line ("N lines: A run, R refused as out of scope, 0 crashed") is printed to
the terminal, so CI's log shows it.
"""

from __future__ import annotations

import os
import re
import struct
import tomllib
from pathlib import Path

import pytest
import trio

from devicemodel import cli, logsetup
from devicemodel.config import parse_args
from devicemodel.config.toml import loads
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vm import running
from devicemodel.vmm import mmio_devices
from tests.support.images import make_bzimage
from tests.support.launch import run_main
from tests.support.netns import private_netns

CORPUS = Path(__file__).resolve().parents[1] / "data" / "acrn_launch_lines.toml"
LINES = tomllib.loads(CORPUS.read_text())["line"]

#: lines acrn-dm at the corpus's commit refuses, and the words ours must contain
ACRN_DM_REFUSES = {
    "-m NoneM": "-m NoneM",  # the generator writes it when a scenario gives no memory size
    "using_windows_as_user_vm.rst": "VM name is missing",  # the doc's line lost its '\\'
    "hv-dev-passthrough.rst": "VM name is missing",  # the doc's example ends without one
    "launch_win.sh@v2.7": "-U",  # acrn-dm 3.x dropped -U (usage error)
    "launch_hard_rt_vm.sh@v2.7": "-U",
}
#: lines that need a device this project leaves out, and its name
OUT_OF_SCOPE = {"launch_user_vm.sh@v2.7": "virtio-hyper_dmabuf"}


def _expectation(entry: dict) -> tuple[str, str]:
    text = entry["source"] + " " + " ".join(entry["argv"])
    for needle, words in ACRN_DM_REFUSES.items():
        if needle in text:
            return "acrn-dm refuses", words
    for needle, device in OUT_OF_SCOPE.items():
        if needle in text:
            return "out of scope", device
    return "run", ""


@pytest.fixture
def host(tmp_path, monkeypatch):
    """The files the lines name, a TPM for --acpidev_pt, logs kept in the test's dir."""
    monkeypatch.setenv("ACRN_PYDM_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("ACRN_PYDM_LOG_DIR", str(tmp_path / "log"))
    files = {name: tmp_path / name for name in ("OVMF.fd", "disk.img", "bzImage")}
    files["OVMF.fd"].write_bytes(b"\0" * 0x20000)
    files["disk.img"].write_bytes(b"\0" * 65536)
    files["bzImage"].write_bytes(make_bzimage())
    # a host TPM 2.0 (CRB) at 0xFED40000, for the documentation's --acpidev_pt MSFT0101,00
    iomem = tmp_path / "iomem"
    iomem.write_text("fed40000-fed44fff : MSFT0101:00\n")
    tpm2 = tmp_path / "TPM2"
    tpm2.write_bytes(b"TPM2" + struct.pack("<I", 76) + bytes(28)
                     + struct.pack("<HHQI12sIQ", 0, 0, 0xFED40040, 7, bytes(12), 0, 0))
    monkeypatch.setattr(mmio_devices, "PROC_IOMEM", str(iomem))
    monkeypatch.setattr(mmio_devices, "TPM2_TABLE", str(tpm2))

    class QuietKmsg(logsetup.KmsgHandler):
        def __init__(self, path: str = str(tmp_path / "kmsg")) -> None:
            super().__init__(path)

    monkeypatch.setattr(logsetup, "KmsgHandler", QuietKmsg)
    return {k: str(v) for k, v in files.items()} | {"dir": str(tmp_path)}


def rewrite(argv: list[str], files: dict[str, str]) -> list[str]:
    """The data file's rewriting: what names this host becomes the test's own."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--ovmf", "-k", "-r", "-E", "--cpu_affinity", "-s", "--cmd_monitor"):
            value = next(it, None)
            if value is None:
                out.append(arg)
                break
            out += [arg, _rewrite_value(arg, value, files)]
        else:
            out.append(arg)
    return out


def _rewrite_value(opt: str, value: str, files: dict[str, str]) -> str:
    if opt == "--ovmf":
        return files["OVMF.fd"]
    if opt == "-k":
        return files["bzImage"]
    if opt == "--cpu_affinity":
        return ",".join(str(i) for i in range(len(value.split(","))))
    if opt == "--cmd_monitor":
        return os.path.join(files["dir"], "monitor.sock")
    slot, _, rest = value.partition(",")
    emul, _, opts = rest.partition(",")
    tokens = opts.split(",") if opts else []
    if emul == "virtio-blk" and tokens:
        tokens[0] = files["disk.img"]
    elif emul == "passthru" and tokens:
        tokens[0] = "sim:1:igd" if re.fullmatch(r"0*/0*2/0", tokens[0]) else "sim:1"
    return ",".join([slot, emul, *tokens])


class Outcome:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.counts = {"run": 0, "out of scope": 0, "acrn-dm refuses": 0, "crashed": 0}


def _check_refused(what: str, rc: int, err: str, words: str, label: str, o: Outcome) -> None:
    lines = err.strip().splitlines()
    if rc == 0 or len(lines) != 1 or words not in lines[0]:
        o.problems.append(f"{label}: {what}: expected one line naming {words!r}, got rc {rc}: "
                          f"{err.strip()[:300]}")


async def _short_run(cfg, seen: dict) -> None:
    """The VM on the sim backend: built, started, every function's vendor ID read by the
    guest while it runs, then powered off."""
    sim = SimHypervisor(cfg.vcpus)
    async with running(cfg, sim) as vm:
        guest = sim.guest(0)
        for s in cfg.slots:
            seen[(s.bus, s.dev, s.func)] = await guest.pci_cfg_read(s.bus, s.dev, s.func, 0, 2)
        seen["flags"] = sim.vm_flag
        seen["vdevs"] = sorted(sim.hv_side.vdevs)
        seen["state"] = vm.state
        await trio.sleep(0.02)


def test_every_line_runs_or_is_refused_by_name(host, monkeypatch, capsys):
    o = Outcome()
    seen: dict = {}

    async def short_run(cfg) -> None:
        await _short_run(cfg, seen)

    monkeypatch.setattr(cli, "run_vm", short_run)
    with private_netns():
        for n, entry in enumerate(LINES):
            label = f"line {n + 1} ({entry['source'].split(' ')[0]})"
            expect, words = _expectation(entry)
            args = rewrite(entry["argv"], host)
            try:
                _one_line(args, expect, words, label, o, seen)
            except Exception as e:  # a traceback is a crash, whatever the line
                o.counts["crashed"] += 1
                o.problems.append(f"{label}: crashed: {type(e).__name__}: {e}")
    total = len(LINES)
    c = o.counts
    with capsys.disabled():
        print(f"\n{total} lines: {c['run']} run, {c['out of scope']} refused as out of scope, "
              f"{c['crashed']} crashed ({c['acrn-dm refuses']} more that acrn-dm refuses are "
              "refused here too)")
    assert not o.problems, "\n".join(o.problems)
    assert c["run"] + c["out of scope"] + c["acrn-dm refuses"] == total
    assert total >= 25


def _one_line(args: list[str], expect: str, words: str, label: str, o: Outcome,
              seen: dict) -> None:
    rc_c, toml_text, err_c = run_main(["config", "--from-args", *args])
    rc_l, dump, err_l = run_main(["lspci", *args])
    seen.clear()
    rc_r, _, err_r = run_main(["--hv", "sim", *args])
    for what, err in (("config", err_c), ("lspci", err_l), ("run", err_r)):
        if "Traceback" in err:
            o.counts["crashed"] += 1
            o.problems.append(f"{label}: {what} crashed:\n{err}")
            return
    if expect != "run":
        for what, rc, err in (("config --from-args", rc_c, err_c), ("lspci", rc_l, err_l),
                              ("--hv sim", rc_r, err_r)):
            _check_refused(what, rc, err, words, label, o)
        o.counts[expect] += 1
        return
    if rc_c != 0 or rc_l != 0 or rc_r != 0:
        o.problems.append(f"{label}: refused: config {rc_c} {err_c.strip()[-300:]!r}; "
                          f"lspci {rc_l} {err_l.strip()[-300:]!r}; run {rc_r} "
                          f"{err_r.strip()[-300:]!r}")
        return
    cfg = parse_args(args, check_files=False)
    if loads(toml_text, check_files=False) != cfg:
        o.problems.append(f"{label}: config --from-args printed a different VM")
    shown = set(re.findall(r"^([0-9a-f]{2}):([0-9a-f]{2})\.([0-7]) ", dump, re.M))
    for s in cfg.slots:
        if (f"{s.bus:02x}", f"{s.dev:02x}", f"{s.func:x}") not in shown:
            o.problems.append(f"{label}: lspci does not show -s {s.to_arg()}")
        if seen.get((s.bus, s.dev, s.func)) in (None, 0xFFFF):
            o.problems.append(f"{label}: the sim guest finds nothing at -s {s.to_arg()}")
    if seen.get("state") != "running":
        o.problems.append(f"{label}: the VM did not run ({seen.get('state')})")
    if cfg.rtvm and not seen.get("flags", 0) & (1 << 4):
        o.problems.append(f"{label}: --rtvm did not reach CREATE_VM")
    hv_devices = [s for s in cfg.slots if s.emul == "uart" or
                  (s.emul == "ivshmem" and s.options.startswith("hv:"))]
    if len(seen.get("vdevs", ())) != len(hv_devices):
        o.problems.append(f"{label}: the hypervisor emulates {seen.get('vdevs')}, expected "
                          f"{[s.to_arg() for s in hv_devices]}")
    o.counts["run"] += 1
