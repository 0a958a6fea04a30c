"""Collects real acrn-dm command lines from ACRN's repository into
tests/data/acrn_launch_lines.toml (issue 16). Run by hand, not by the tests:

    python -m tests.support.acrn_corpus --repo <acrn-hypervisor git dir> \\
        --python <a python with lxml and defusedxml> > tests/data/acrn_launch_lines.toml

Three kinds of source, all read at one commit of projectacrn/acrn-hypervisor:

- ACRN's launch script generator (misc/config_tools/launch_config/launch_cfg_gen.py) run
  on every board XML and scenario XML of misc/config_tools/data/, as a user of the ACRN
  configurator gets them;
- the committed sample launch scripts (misc/config_tools/data/*/sample_launch_scripts/);
- command lines in ACRN's documentation and in the sample scripts of release v2.7 (the
  older forms: ``-A``, ``virtio-net,tap0``), listed in ``HAND_PICKED`` with the values
  their shell variables have in the same file.

The generated scripts build the command line with shell helpers (``add_cpus``,
``add_virtual_device`` ...); ``expand_dm_params`` does what those helpers print, so each
entry is the argv acrn-dm gets. Entries are deduplicated on that argv; ``also`` lists the
other places a line came from.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

GENERATOR = "misc/config_tools/launch_config"
DATA = "misc/config_tools/data"
#: what the generated scripts read from the Service VM at run time
SERVICE_VM_MAC = "52:54:00:12:34:56"

# (ref, path, first line of the command, {shell variable: value}, why it is interesting)
HAND_PICKED: list[tuple[str, str, int, dict[str, str]]] = [
    ("HEAD", "doc/developer-guides/hld/hld-devicemodel.rst", 108, {}),
    ("HEAD", "doc/developer-guides/hld/hld-devicemodel.rst", 771, {}),
    ("HEAD", "doc/tutorials/using_windows_as_user_vm.rst", 106,
     {"mem_size": "4096M", "vm_name": "WaaG"}),
    ("HEAD", "doc/tutorials/acrn_on_qemu.rst", 285,
     {"mem_size": "1024M", "vm_name": "vm1",
      "logger_setting": "--logger_setting console,level=5;kmsg,level=6;disk,level=5"}),
    ("HEAD", "doc/developer-guides/hld/hv-dev-passthrough.rst", 437,
     {"mem_size": "1024M"}),
    ("v2.7", "misc/config_tools/data/sample_launch_scripts/launch_ubuntu.sh", 22,
     {"mem_size": "1000M", "vm_name": "vm1",
      "logger_setting": "--logger_setting console,level=4;kmsg,level=3"}),
    ("v2.7", "misc/config_tools/data/sample_launch_scripts/nuc/launch_zephyr.sh", 20,
     {"mem_size": "128M", "vm_name": "zephyr_vm1"}),
    ("v2.7", "misc/config_tools/data/sample_launch_scripts/nuc/launch_vxworks.sh", 32,
     {"mem_size": "2048M", "vm_name": "vxworks_vm1"}),
    ("v2.7", "misc/config_tools/data/sample_launch_scripts/nuc/launch_user_vm.sh", 93,
     {"mem_size": "2048M", "vm_name": "vm1", "mac_seed": "vm1",
      "logger_setting": "--logger_setting console,level=4;kmsg,level=3", "2": "64"}),
    ("v2.7", "misc/config_tools/data/sample_launch_scripts/nuc/launch_win.sh", 90,
     {"mem_size": "4096M", "vm_name": "WaaG", "logger_setting": "",
      "intr_storm_monitor": "--intr_monitor 10000,10,1,100", "boot_audio_option": ""}),
    ("v2.7", "misc/config_tools/data/sample_launch_scripts/nuc/launch_hard_rt_vm.sh", 43,
     {"mem_size": "1024M"}),
]


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", repo, *args], check=True,
                          capture_output=True, text=True).stdout


# --- what the generated scripts' helpers print -------------------------------------------
def _helper(words: list[str]) -> list[str]:
    name, args = words[0], words[1:]
    if name == "add_cpus":
        return ["--cpu_affinity", ",".join(args)]
    if name == "add_interrupt_storm_monitor":
        return ["--intr_monitor", ",".join(args)]
    if name == "add_logger_settings":
        loggers = [f"{c.rpartition('=')[0]},level={c.rpartition('=')[2]}" for c in args]
        return ["--logger_setting", ";".join(loggers)]
    if name == "add_virtual_device":
        slot, kind, options = args[0], args[1], args[2] if len(args) > 2 else ""
        if kind == "virtio-input" and "event" not in " ".join(args[2:]):
            return []  # the script finds no such input device on the Service VM: no -s
        return ["-s", f"{slot},{kind}" + (f",{options}" if options else "")]
    if name == "add_passthrough_device":
        slot, bdf, options = args[0], args[1], args[2] if len(args) > 2 else ""
        m = re.fullmatch(r"[0-9a-f]{4}:([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])", bdf)
        assert m, bdf
        b, d, f = (int(x, 16) for x in m.groups())
        return ["-s", f"{slot},passthru,{b:x}/{d:x}/{f:x}" + (f",{options}" if options else "")]
    raise ValueError(f"unknown helper {name}")


def expand_dm_params(lines: list[str], variables: dict[str, str]) -> list[str]:
    """The argv of the ``dm_params=( ... )`` block of a generated launch script."""
    argv: list[str] = []
    for raw in lines:
        line = raw.strip()
        line = line.replace("${mac:0:17}", SERVICE_VM_MAC)
        for name, value in variables.items():
            line = line.replace("${" + name + "}", value)
        if line.startswith("`") and line.endswith("`"):
            argv += _helper(line[1:-1].split())
        elif line:
            argv += shlex.split(line)
    return argv


def dm_params_block(text: str) -> tuple[int, list[str]]:
    lines = text.splitlines()
    start = lines.index("dm_params=(")
    end = lines.index(")", start)
    return start + 1, lines[start + 1:end]


def script_variables(text: str) -> dict[str, str]:
    """``dir_x=`mount_partition /dev/...``` → the mount point the script would use."""
    out = {}
    for m in re.finditer(r"^(dir_\w+)=`mount_partition (\S+)`", text, re.M):
        out[m.group(1)] = f"/tmp/mnt-{os.path.basename(m.group(2))}"
    return out


# --- the sources ---------------------------------------------------------------------------
def generated(repo: str, commit: str, python: str) -> list[dict]:
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        archive = subprocess.run(["git", "--git-dir", repo, "archive", commit, GENERATOR, DATA],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        data = tree / DATA
        for board_dir in sorted(p for p in data.iterdir() if p.is_dir()):
            board = board_dir / f"{board_dir.name}.xml"
            if not board.exists():
                continue
            for scenario in sorted(board_dir.glob("*.xml")):
                if scenario == board:
                    continue
                out = Path(tmp) / "out" / board_dir.name / scenario.stem
                out.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run([python, str(tree / GENERATOR / "launch_cfg_gen.py"),
                                "--board", str(board), "--scenario", str(scenario),
                                "--out", str(out)], capture_output=True)
                if not out.is_dir():
                    continue
                xml = scenario.read_text()
                for script in sorted(out.glob("*.sh")):
                    text = script.read_text()
                    _, block = dm_params_block(text)
                    argv = expand_dm_params(block, script_variables(text))
                    vm = argv[-1]
                    line = _line_of(xml, f"<name>{vm}</name>")
                    rel = scenario.relative_to(tree)
                    entries.append(dict(
                        source=f"{rel}@{commit[:9]}:{line} (VM {vm}; launch_cfg_gen.py "
                               f"--board {board.relative_to(tree)} -> {script.name})",
                        argv=argv))
    return entries


def _line_of(text: str, needle: str) -> int:
    pos = text.find(needle)
    return text.count("\n", 0, pos) + 1 if pos >= 0 else 0


def committed_samples(repo: str, commit: str) -> list[dict]:
    entries = []
    for path in git(repo, "ls-tree", "-r", "--name-only", commit, DATA).split():
        if "/sample_launch_scripts/" not in path or not path.endswith(".sh"):
            continue
        text = git(repo, "show", f"{commit}:{path}")
        if "dm_params=(" not in text:
            continue
        start, block = dm_params_block(text)
        entries.append(dict(source=f"{path}@{commit[:9]}:{start}",
                            argv=expand_dm_params(block, script_variables(text))))
    return entries


def hand_picked(repo: str) -> list[dict]:
    entries = []
    for ref, path, first, variables in HAND_PICKED:
        commit = git(repo, "rev-parse", ref).strip()
        lines = git(repo, "show", f"{commit}:{path}").splitlines()[first - 1:]
        text = ""
        for line in lines:
            text += line.rstrip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                break
        text = text.strip().removeprefix("$ ").strip()
        for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(f"${name}", value)
        argv = shlex.split(text)
        assert argv[0].endswith("acrn-dm"), (path, argv)
        label = ref if ref != "HEAD" else commit[:9]
        entries.append(dict(source=f"{path}@{label}:{first}", argv=argv[1:]))
    return entries


def render(entries: list[dict], commit: str) -> str:
    seen: dict[tuple[str, ...], dict] = {}
    for e in entries:
        key = tuple(e["argv"])
        if key in seen:
            seen[key].setdefault("also", []).append(e["source"])
        else:
            seen[key] = dict(e)
    out = [HEADER.format(commit=commit, mac=SERVICE_VM_MAC).rstrip() + "\n"]
    for e in seen.values():
        out.append("\n[[line]]")
        out.append(f"source = {_q(e['source'])}")
        if e.get("also"):
            out.append("also = [" + ", ".join(_q(s) for s in e["also"]) + "]")
        out.append("argv = [" + ", ".join(_q(a) for a in e["argv"]) + "]")
    return "\n".join(out) + "\n"


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


HEADER = """\
# Real acrn-dm command lines from ACRN's repository (projectacrn/acrn-hypervisor at
# {commit}), collected by tests/support/acrn_corpus.py (its docstring says how).
#
# source: where the line comes from, path@commit:line. For generated lines the path is
#   the scenario XML and the line is its VM's <name> element; the generator
#   (misc/config_tools/launch_config/launch_cfg_gen.py) ran on the board XML named.
# also:   other places the same line came from.
# argv:   what acrn-dm gets: the generated scripts' helpers expanded as they print them
#   (add_cpus -> --cpu_affinity, add_virtual_device -> -s, ...), the Service VM's MAC the
#   scripts read from /sys/class/net/e*/address taken as {mac}, a virtio-input device the
#   script does not find on the Service VM left out (as the script does), shell
#   variables of the documentation's and v2.7's scripts given the values set beside them.
#
# tests/component/test_acrn_corpus.py runs each line through `config --from-args`,
# `lspci` and a short `--hv sim` run, after rewriting what names this host:
#   image and firmware paths (-k, -r, -E, --ovmf, the virtio-blk image, ahci images)
#     -> files of the test's own;
#   --cpu_affinity LAPIC ids of the board -> 0..n-1 (as many, on this host);
#   passthru <b>/<d>/<f> -> the synthetic host device of the same kind
#     (0/2/0 -> sim:1:igd, an Intel integrated GPU; others -> sim:1);
#   virtio-console socket/file paths and --cmd_monitor -> the test's directory;
#   taps keep their names, in a private network namespace.
# Whether acrn-dm at {commit} accepts a line, and what the test expects of it, is the
# test's table (EXPECTED), not this file's.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="the acrn-hypervisor git directory")
    ap.add_argument("--commit", default="HEAD")
    ap.add_argument("--python", default=sys.executable,
                    help="a python that has lxml and defusedxml (for the generator)")
    args = ap.parse_args()
    commit = git(args.repo, "rev-parse", args.commit).strip()
    entries = generated(args.repo, commit, args.python) + \
        committed_samples(args.repo, commit) + hand_picked(args.repo)
    sys.stdout.write(render(entries, commit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
