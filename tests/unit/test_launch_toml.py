"""TOML VM files: same VmConfig as the command line, errors naming key/value/fix, round trip."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.config import ConfigError, parse_args
from devicemodel.config import toml as tomlconfig
from tests.support.launch import typical_line
from tests.support.paths import ROOT

DOC = os.path.join(ROOT, "docs", "vm-toml.md")


def test_toml_file_builds_the_same_vm_as_the_command_line(images, tmp_path):
    path = tmp_path / "POST_STD_VM1.toml"
    path.write_text(f"""
windows = true
cpu_affinity = [0, 2]
memsize = "4096M"
logger = {{ console = 4, kmsg = 3, disk = 5 }}

[ovmf]
code = "{images['ovmf']}"

[[pci_slot]]
slot = "1:0"
emul = "lpc"

[[pci_slot]]
slot = "0:0"
emul = "hostbridge"

[[pci_slot]]
slot = 3
emul = "virtio-console"
options = "@stdio:stdio_port"

[[pci_slot]]
slot = "4"
emul = "virtio-net"
options = ["tap=WaaG", "mac_seed=00:11:22:33:44:55-POST_STD_VM1"]

[[pci_slot]]
slot = "0:5:0"
emul = "virtio-blk"
options = "{images['disk']}"

[[pci_slot]]
slot = "2"
emul = "passthru"
options = "0/2/0"
""")
    # the name comes from the file name, as /etc/acrn-pydm/%i.toml wants
    assert tomlconfig.load(str(path)) == parse_args(typical_line(images))


def test_round_trip_args_toml_config(images):
    lines = [
        typical_line(images),
        ["--hv", "sim", "-k", images["kernel"], "-B", 'console=ttyS0 quiet "x"\\y', "-m", "3000M",
         "--debugexit", "--virtio_msi", "--virtio_poll", "1000000", "--cmd_monitor",
         "/run/acrn-pydm/vm2.sock", "-l", "com1,stdio", "-l", "com5,pty,0x3e8,5",
         "--shutdown_timeout", "2.5", "-s", "1:7:3,virtio-blk,b,disk.img,ro", "vm2"],
        ["--ovmf", f"w,code={images['ovmf']},vars={images['disk']}", "-E", images["kernel"],
         "--cpu_affinity", "3", "ünï"],
    ]
    for args in lines:
        cfg = parse_args(args)
        text = tomlconfig.dumps(cfg)
        tomllib.loads(text)  # valid TOML for any TOML reader, not only ours
        assert tomlconfig.loads(text) == cfg, text


def test_config_from_args_subprocess(images, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "devicemodel", "config", "--from-args",
                          *typical_line(images)], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    toml_file = tmp_path / "POST_STD_VM1.toml"
    toml_file.write_text(res.stdout)
    assert tomlconfig.load(str(toml_file)) == parse_args(typical_line(images))
    # and back: the file as an acrn-dm command line
    back = subprocess.run([sys.executable, "-m", "devicemodel", "config", "--to-args",
                           str(toml_file)], capture_output=True, text=True, env=env, timeout=60)
    assert back.returncode == 0, back.stderr
    import shlex

    argv = shlex.split(back.stdout)
    assert argv[0] == "acrn-pydm"
    assert parse_args(argv[1:]) == parse_args(typical_line(images))
    check = subprocess.run([sys.executable, "-m", "devicemodel", "config", "--check",
                            str(toml_file)], capture_output=True, text=True, env=env, timeout=60)
    assert check.returncode == 0 and "OK" in check.stdout


# (TOML text, things the one-line message must name: key, value, fix)
BAD = [
    ('memsize = 4096', ["memsize = 4096", "expected a size", 'memsize = "2048M"']),
    ('memsize = "100M"', ['memsize = "100M"', "minimum of 128 MiB", "give at least 128M"]),
    ('memsize = "lots"', ['memsize = "lots"', "K, M or G"]),
    ('cpu_affinity = "0,1"', ['cpu_affinity = "0,1"', "cpu_affinity = [1, 2]"]),
    ('cpu_affinity = [1, 1]', ["cpu_affinity = [1, 1]", "listed twice"]),
    ('cpu_affinity = [true]', ["cpu_affinity = [true]", "list of CPU (LAPIC) ids"]),
    ('hv = "xen"', ['hv = "xen"', "acrn, kvm, sim"]),
    ('windows = "yes"', ['windows = "yes"', "true or false"]),
    ('virtio_poll = 5', ["virtio_poll = 5", "1000..10000000"]),
    ('virtio_poll = "5"', ['virtio_poll = "5"', "virtio_poll = 1000000"]),
    ('shutdown_timeout = -3', ["shutdown_timeout = -3", "0..3600"]),
    ('shutdown_timeout = nan', ["shutdown_timeout = nan", "0..3600"]),
    ('kernel = ""', ['kernel = ""', "give a path"]),
    ('kernel = "/nonexistent"', ["/nonexistent", "does not exist", "bzImage"]),
    ('memory = "1G"', ['memory = "1G"', "unknown key", "memsize"]),
    ('logger_setting = "console,level=x"', ["logger_setting", "N a number"]),
    ('logger = { console = 9 }', ["logger.console = 9", "0..5"]),
    ('logger = { syslog = 3 }', ["logger.syslog = 3", "unknown key", "console, disk, kmsg"]),
    ('logger = { console = 4 }\nlogger_setting = "console,level=4"', ["keep one"]),
    ('name = 5', ["name = 5", "a string"]),
    ('name = "a/b"', ["'a/b'", "may not contain"]),
    ('ovmf = 3', ["ovmf = 3", "expected a table"]),
    ('[ovmf]\nvars = "v"', ["ovmf = ", "code is missing"]),
    ('[ovmf]\ncode = "c"\nsize = 1', ["ovmf.size = 1", "unknown key", "code, vars, writeback"]),
    ('[ovmf]\ncode = "c"\nwriteback = 1', ["ovmf.writeback = 1", "true or false"]),
    ('pci_slot = 3', ["pci_slot = 3", "[[pci_slot]]"]),
    ('[[pci_slot]]\nemul = "virtio-rnd"', ["pci_slot[0]", "slot is missing"]),
    ('[[pci_slot]]\nslot = "40"\nemul = "virtio-rnd"', ['pci_slot[0].slot = "40"', "0..31"]),
    ('[[pci_slot]]\nslot = "x"\nemul = "virtio-rnd"', ['pci_slot[0].slot = "x"', "e.g. 3"]),
    ('[[pci_slot]]\nslot = 1.5\nemul = "virtio-rnd"', ["pci_slot[0].slot = 1.5", 'slot = "3"']),
    ('[[pci_slot]]\nslot = 3', ["pci_slot[0].emul", "virtio-blk"]),
    ('[[pci_slot]]\nslot = 3\nemul = "npk"', ['emul = "npk"', "obsolete"]),
    ('[[pci_slot]]\nslot = 3\nemul = "virtio-rnd"\noptions = 3', ["options = 3", "disk.img"]),
    ('[[pci_slot]]\nslot = 3\nemul = "virtio-rnd"\nbus = 1', ["pci_slot[0].bus = 1",
                                                             "unknown key"]),
    ('[[pci_slot]]\nslot = 3\nemul = "a"\n[[pci_slot]]\nslot = "3:0"\nemul = "b"',
     ["already used", "own slot"]),
    ('[[lpc]]\ndevice = "com7"', ['lpc[0].device = "com7"', 'device = "com1"']),
    ('[[lpc]]\ndevice = "com5"\nbackend = "stdio"', ["lpc[0].port", "port = 0x2f8"]),
    ('[[lpc]]\ndevice = "com1"\nport = 1', ["lpc[0].port = 1", "only com5"]),
    ('[[lpc]]\ndevice = "com5"\nbackend = "stdio"\nport = "x"\nirq = 3', ["not a number"]),
    ('name = "x" name = "y"', ["not valid TOML", "fix the syntax"]),
]


@pytest.mark.parametrize(("text", "needles"), BAD)
def test_validation_errors_name_key_value_and_fix(text, needles):
    with pytest.raises(ConfigError) as e:
        tomlconfig.loads('name = "vm1"\n' + text if not text.startswith("name") else text,
                         source="vm1.toml")
    msg = str(e.value)
    assert msg.startswith("vm1.toml: "), msg
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_run_subcommand_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, ACRN_PYDM_RUNTIME_DIR=str(tmp_path))
    bad = tmp_path / "vm1.toml"
    bad.write_text('memsize = "100M"\n')
    for args, needle in ((["run", str(bad)], 'memsize = "100M"'),
                         (["run", str(tmp_path / "none.toml")], "no such VM file"),
                         (["run"], "give exactly one VM file"),
                         (["config", "--bogus"], "unknown mode")):
        res = subprocess.run([sys.executable, "-m", "devicemodel", *args], capture_output=True,
                             text=True, env=env, timeout=60)
        assert res.returncode == 2
        assert len(res.stderr.splitlines()) == 1 and needle in res.stderr, res.stderr


def test_doc_examples_are_valid(tmp_path):
    """Every ```toml block in docs/vm-toml.md loads (paths need not exist)."""
    text = pathlib.Path(DOC).read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```toml\n")[1:]]
    assert len(blocks) >= 2
    for block in blocks:
        cfg = tomlconfig.loads(block, source="docs/vm-toml.md", check_files=False)
        assert cfg.name
    # every key the loader knows is documented
    for key in tomlconfig.TOP_KEYS:
        assert f"`{key}`" in text, key


_values = st.recursive(
    st.one_of(st.booleans(), st.integers(-2, 2**40), st.floats(allow_nan=True),
              st.text(max_size=8), st.sampled_from(["1G", "com1", "3", "virtio-rnd", "0:0"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["slot", "emul", "options", "boot", "device", "backend", "port", "irq",
                         "code", "vars", "writeback", "console", "x"]), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*tomlconfig.TOP_KEYS, "bogus"]), _values, max_size=6))
def test_any_document_gives_a_config_or_a_clean_error(doc):
    doc.setdefault("name", "vm")
    try:
        cfg = tomlconfig.from_dict(doc, check_files=False)
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert tomlconfig.loads(tomlconfig.dumps(cfg), check_files=False) == cfg
