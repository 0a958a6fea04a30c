"""The command line (acrn-dm syntax), the device option strings and the TOML VM file.

A bad command line or VM file must end in ``ConfigError`` (whose message names the
problem), never in another exception; ``--help``/``--version`` raise their requests. A
command line that parses survives a round trip through ``VmConfig.to_args`` and through
TOML (``dumps`` → ``loads``) unchanged.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from devicemodel.config import ConfigError, HelpRequested, VersionRequested, parse_args
from devicemodel.config import toml as tomlconfig
from devicemodel.config.acrn_args import _LONG, _SHORT
from devicemodel.config.rt_options import (
    parse_acpidev_pt,
    parse_intr_monitor,
    parse_mmiodev_pt,
)
from devicemodel.passthru.device import PassthruOptions
from devicemodel.passthru.host import parse_sim_spec
from devicemodel.pci.ivshmem import parse_ivshmem_options
from devicemodel.pci.vuart import parse_uart_options
from devicemodel.virtio.blk import parse_blk_options
from devicemodel.virtio.console import parse_console_options
from devicemodel.virtio.net import parse_net_options
from devicemodel.virtio.pci import split_transport_options
from devicemodel.virtio.rnd import parse_rnd_options
from devicemodel.vmcheck import check_vm

from ._common import count, fuzz_settings

_TMP = tempfile.mkdtemp(prefix="acrn-fuzz-cfg-")
KERNEL = os.path.join(_TMP, "bzImage")
open(KERNEL, "wb").close()

OPTIONS = sorted(_LONG) + [f"-{c}" for c in _SHORT] + ["--", "-", "--mem", "--virtio"]
VALUES = [
    "1G", "128M", "2048M", "0", "-1", "99999999999999G", "4k", "", " ", "vm1", "a" * 40,
    "0:0,hostbridge", "3,virtio-blk,/nonexistent.img", "3,virtio-blk", "31,lpc", "2,dummy",
    "3,virtio-rnd", "0:3:7,virtio-net,tap=t0", "255:31:7,dummy", "32,dummy", "1:2:3:4,dummy",
    "3,virtio-console,@stdio:p0", "3,passthru,0/1/2", "com1,stdio", "com2,/dev/null", "com9,x",
    "bootrom", "code=/x,vars=/y", "1,2,3", "0-3", "3-1", "10000", "ns", "1000ns", "sim",
    "kvm", "acrn", "nope", "console=ttyS0", "enable_bar,log_level=6", "1.5", "nan", "inf",
    KERNEL, "\x00", "é", "3,virtio-blk,,,", ",,,", "3,", ":,", "0x10,dummy",
    "²", "٣", "1²", "3,virtio-blk,/x,range=٣/1", "console,level=²",  # non-ASCII digits
    # issue 16: real-time and platform-passthrough values, the hypervisor's devices
    "10000,10,1,100", "1,0,1,1", "٣,1,1,1", "0xfed40000,0x5000", "0xFED40000,0x00005000",
    "fed40000,1000", "0x1,0x1", "MSFT0101", "MSFT0101,00", "MSFT0101,zz", "INT3F0D",
    "8,ivshmem,hv:/shm_region_0,2,0", "8,ivshmem,dm:/r,2", "8,ivshmem,dm:/a/b,2",
    "8,ivshmem,hv:/x,3", "16,uart,vuart_idx:1", "16,uart,vuart_idx:²", "31,igd-lpc",
    "4,virtio-net,tap0", "2,passthru,sim:1:igd,gpu", "2,passthru,0/2/0,enable_ptm,dsdt=/x",
    "kmsg,level=6", "kmsg,level=4294967296", "uart,allow_trigger_s5", "ioc",
]
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
token = st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES), text,
                  st.builds(lambda o, v: f"{o}={v}", st.sampled_from(sorted(_LONG)),
                            st.sampled_from(VALUES)),
                  st.builds(lambda o, v: o + v, st.sampled_from([f"-{c}" for c in _SHORT]),
                            st.sampled_from(VALUES)))
argvs = st.lists(token, max_size=14)

CLEAN = (ConfigError, HelpRequested, VersionRequested)


@fuzz_settings(150)
# found by this target: -E '' was accepted (and a VM file could not say it); non-ASCII
# digits passed str.isdigit() and crashed int() with ValueError
@example(argv=["1G", "-E", ""], check=False)
@example(argv=["--virtio_poll", "²"], check=False)
@example(argv=["-s", "²,dummy", "v"], check=False)
@example(argv=["--cpu_affinity", "²", "v"], check=False)
@example(argv=["--logger_setting", "console,level=²", "v"], check=False)
@given(argv=argvs, check=st.booleans())
def test_command_line(argv, check):
    count("config.cmdline")
    try:
        cfg = parse_args(argv, check_files=check)
    except CLEAN as e:
        assert str(e) or isinstance(e, HelpRequested | VersionRequested)
        return
    again = parse_args(cfg.to_args(), check_files=False)
    assert again.to_args() == cfg.to_args()
    try:
        text_ = tomlconfig.dumps(cfg)
    except ConfigError:
        return  # something the TOML schema cannot say; the message names it
    back = tomlconfig.loads(text_, check_files=False)
    assert back.to_args() == cfg.to_args()


PARSERS = {
    "blk": parse_blk_options,
    "net": parse_net_options,
    "console": parse_console_options,
    "rnd": parse_rnd_options,
    "transport": lambda t: split_transport_options("virtio-x", t),
    "passthru": lambda t: PassthruOptions(t, "3"),
    "passthru-sim": lambda t: parse_sim_spec(t, 0xFE00),
    "ivshmem": parse_ivshmem_options,
    "uart": parse_uart_options,
    "intr_monitor": parse_intr_monitor,
    "mmiodev_pt": parse_mmiodev_pt,
    "acpidev_pt": parse_acpidev_pt,
}
opt_words = st.sampled_from([
    "/nonexistent", "ro", "writethru", "writeback", "discard", "nocache", "range=1/2/3",
    "logic_sector_size=512", "physical_sector_size=4096", "iothread=1", "tap=t0", "vhost",
    "mac=00:16:3e:00:00:01", "mac=zz", "mac_seed=x", "mtu=1500", "mtu=-1", "mq=2",
    "@stdio:p0", "@pty:p1", "file:p2=/tmp/x", "tty:p3=/dev/x", "socket:p4=/s:server", "@",
    "legacy", "modern", "transitional", "pio_notify", "no_ioeventfd", "no_irqfd", "kernel",
    "=", ":", "@file:", "sectors=1", "readonly", "", "sim:4", "sim:²", "0/1f/6", "1:2:3",
    "vmsix_on_msi", "²", "irq=²", "irq=5", "enable_ptm", "gpu", "sim",
    "hv:/shm_region_0", "dm:/r", "dm:/", "2", "512", "1024", "3", "vuart_idx:1", "vuart_idx",
    "0xfed40000", "0x5000", "MSFT0101", "romfile=/x.rom", "dsdt=/x", "tap0", "vmnet1",
    "sim:1:igd", "10000",
])
opt_text = st.one_of(text, st.lists(st.one_of(opt_words, text), max_size=6).map(",".join))


@fuzz_settings(150)
@example(which="passthru", options="sim:4,vmsix_on_msi,²")
@example(which="passthru", options="sim:4,irq=²")
@example(which="passthru-sim", options="sim:²")
@given(which=st.sampled_from(sorted(PARSERS)), options=opt_text)
def test_device_option_strings(which, options):
    count("config.device_options")
    try:
        PARSERS[which](options)
    except ConfigError as e:
        assert str(e)


toml_scalar = st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=20), st.booleans(),
                        st.floats(allow_nan=True), st.sampled_from(VALUES))
toml_value = st.recursive(
    toml_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(
                                ["slot", "emul", "options", "bus", "dev", "func", "size",
                                 "path", "x"]), inner, max_size=4)),
    max_leaves=12)
KEYS = ["name", "memory", "memsize", "kernel", "bootargs", "ramdisk", "elf", "ovmf", "hv",
        "cpu_affinity", "virtio_poll", "cmd_monitor", "shutdown_timeout", "debugexit",
        "windows", "virtio_msi", "devices", "device", "lpc", "logger", "vcpus", "x", "rtvm",
        "lapic_pt", "intr_monitor", "mmiodev_pt", "acpidev_pt"]
toml_docs = st.dictionaries(st.sampled_from(KEYS), toml_value, max_size=8)


@fuzz_settings(150)
@given(doc=toml_docs)
def test_toml_documents(doc):
    count("config.toml_dict")
    try:
        tomlconfig.from_dict(doc, check_files=False)
    except ConfigError as e:
        assert str(e)


@fuzz_settings(100)
@given(raw=st.one_of(text, st.lists(st.sampled_from(
    ['name = "vm1"', "[[devices]]", 'emul = "dummy"', "slot = 3", 'memory = "1G"', "[x]",
     "memory = 1", "= 1", '"', "[[lpc]]", "a.b.c = 1", "[devices]", "slot = '3'",
     # hostile shapes: nesting past tomllib's recursion, deep dotted keys, huge sizes
     "x = " + "[" * 600 + "]" * 600, "y = " + "{a=" * 600 + "1" + "}" * 600,
     "[" + ".".join("k" * 200) + "]", "z" + ".z" * 129 + " = 1", "pci_slot = " + "[" * 20,
     'memsize = "99999999999999999999G"', 'memsize = "4096G"', "[[pci_slot]]",
     'options = "' + "a," * 200 + '"', "emul = 'virtio-blkk'"]),
    max_size=8).map("\n".join)))
def test_toml_text(raw):
    count("config.toml_text")
    try:
        tomlconfig.loads(raw, check_files=False)
    except ConfigError as e:
        assert str(e)


@fuzz_settings(150)
@example(argv=["-s", "9,virtio-blkk", "v"])
@example(argv=["-s", "1,lpc", "-s", "2:0:0,lpc", "v"])
@given(argv=argvs)
def test_vm_check(argv):
    """The validator every front door shares: a parsed line passes or is one ConfigError."""
    count("config.vm_check")
    try:
        cfg = parse_args(argv, check_files=False)
    except CLEAN:
        return
    try:
        check_vm(cfg)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


@pytest.fixture(autouse=True)
def _in_tmp(monkeypatch):
    monkeypatch.chdir(_TMP)  # option parsers that touch relative paths touch only here
