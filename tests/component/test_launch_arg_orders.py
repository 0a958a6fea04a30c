"""No traceback from any subcommand on any argument order (issue 16 item 5).

Valid and invalid pieces of each command line, shuffled, sometimes cut short, with odd
text mixed in, go to the entry point in this process. Every outcome is exit 0, or a
non-zero exit with exactly one error line on stderr (after the warnings a launch logs
first, e.g. for obsolete options); an exception escaping ``main`` fails the
test. A line that would start a VM builds it on the sim backend and releases it
(``run_vm`` is replaced), and vhost-user's server is replaced likewise, so nothing runs on.
"""

from __future__ import annotations

import contextlib
import os
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devicemodel import cli
from devicemodel.config import parse_args
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vhost_user import server as vhost_server
from devicemodel.vm import Vm
from tests.support.launch import run_main

HUGE = "99999999999999999999G"
ODD = st.text(max_size=12)

#: pieces of an acrn-dm line that belong together; the last valid one is the VM name
VALID = [["--hv", "sim"], ["-m", "128M"], ["-s", "0:0,hostbridge"], ["-s", "3,virtio-rnd"],
         ["-s", "4,virtio-blk,@img@"], ["-s", "1,lpc"], ["-l", "com1"], ["--cpu_affinity", "0"],
         ["--debugexit"], ["--virtio_poll", "1000000"], ["-A"], ["--mac_seed", "x"],
         ["-s", "7,passthru,sim:4,vmsix_on_msi"], ["--shutdown_timeout", "0"], ["-m256M"],
         ["--lpc=com2,file:@dir@/com2.log"], ["-s", "5,virtio-console,file:p0=@dir@/con"],
         # issue 16: real-time VMs, hypervisor devices, the older and lenient forms
         ["--rtvm"], ["--lapic_pt"], ["--intr_monitor", "10000,10,1,100"],
         ["--mmiodev_pt", "0xfed40000,0x1000"], ["-s", "8,ivshmem,hv:/shm_region_0,2,0"],
         ["-s", "9,ivshmem,dm:/@shm@,2,1"], ["-s", "16,uart,vuart_idx:1"],
         ["--logger_setting", "console,level=4;kmsg,level=6"], ["--pm_notify_channel", "uart"],
         ["-s", "2,passthru,sim:1:igd,gpu"], ["-s", "6,passthru,sim:2,enable_ptm,dsdt=/x"]]
INVALID = [["-h"], ["--help"], ["-v"], ["--version"], ["--bogus"], ["-Z"], ["-Ax"],
           ["-s", "9,virtio-blkk"], ["-m"], ["-m", "1T"], ["-m", HUGE], ["-s"], ["-s", "3"],
           ["--hv", "xen"], ["-k", "/nonexistent"], ["--enable_trusty"], ["vm2"], ["--"], ["-"],
           ["-s", "7,passthru,sim:3"], ["--logger_setting", "console,level=9"],
           ["--cpu_affinity", "1,1"], ["-s", "3,virtio-blk,@img@,bogus"], ["-l", "com9"],
           ["-s", "1:1:0,lpc"], ["--ovmf", "code=a"], ["a" * 16], ["--debugexit=1"],
           ["-B", "x" * 3000], ["--cmd_monitor", ""], ["--virtio"], ["-E", ""],
           # argv carries undecodable bytes as lone surrogates
           ["vm\udcff"], ["-s", "4,virtio-blk,/x\udcff"], ["--hv", "\udcff"],
           ["--intr_monitor", "1,0,1,1"], ["--intr_monitor"], ["--mmiodev_pt", "x,1"],
           ["--acpidev_pt", "MSFT0101,00"], ["--acpidev_pt", "FOO"], ["-s", "3,ahci,hd:/x"],
           ["-s", "8,ivshmem,hv:/x,3"], ["-s", "16,uart,vuart_idx"], ["--vtpm2", "x"],
           ["-s", "31,igd-lpc"], ["--pm_notify_channel", "ioc2"], ["-U", "u"],
           ["--logger_setting", "kmsg,level=-1"], ["-s", "5,passthru,sim:1,romfile="]]


def _pieces(valid: list[list[str]], invalid: list[list[str]], *,
            required: list[list[list[str]]] = ()) -> st.SearchStrategy[list[str]]:
    """A line from pieces, shuffled and flattened: one piece from each ``required`` choice
    and some ``valid`` ones; half the time also invalid pieces or odd text, or the last
    token cut off (an option left without its value)."""

    def line(picked: tuple) -> st.SearchStrategy[list[str]]:
        musts, extras, bad, odd, cut = picked
        pieces = [*musts, *extras, *bad, *odd]
        return st.permutations(pieces).map(
            lambda p: [t for piece in p for t in piece][: -1 if cut and p else None])

    extras = st.lists(st.sampled_from(valid), max_size=6, unique_by=tuple) if valid \
        else st.just([])
    clean = st.tuples(st.tuples(*[st.sampled_from(r) for r in required]), extras,
                      st.just([]), st.just([]), st.just(False))
    dirty = st.tuples(st.tuples(*[st.sampled_from(r) for r in required]),
                      extras, st.lists(st.sampled_from(invalid), max_size=2),
                      st.lists(ODD.map(lambda t: [t]), max_size=1), st.booleans())
    return st.one_of(clean, dirty).flatmap(line)


def _command() -> st.SearchStrategy[list[str]]:
    acrn = _pieces(VALID, INVALID, required=[[["vm1"]]])
    run = _pieces([["--hv", "sim"], ["--hv=sim"]],
                  [["-h"], ["--help"], ["--hv"], ["--hv", "xen"], ["--bogus"], ["--"],
                   ["@dir@/missing.toml"], ["@dir@"], ["/dev/null"], ["@bad_toml@"]],
                  required=[[["@toml@"]]])
    files = _pieces([], [["-h"], ["--"], ["--bogus"], ["@bad_toml@"], ["@dir@"]],
                    required=[[["@toml@"]]])
    vhost = _pieces([["--verbose"]],
                    [["-h"], ["-v"], ["--fd", "-1"], ["--fd", HUGE], ["--fd"], ["virtio-gpu"],
                     ["--socket-path"], ["--socket-path", "@dir@/a\0b"], ["--bogus"],
                     ["virtio-blk,/nonexistent"], ["virtio-net,tap=" + "t" * 20],
                     ["--fd", "@file_fd@"], ["--fd", "@sock_fd@"], ["virtio-rnd"]],
                    required=[[["virtio-rnd"], ["virtio-blk,@img@"],
                               ["virtio-console,file:c=@dir@/con.log"]],
                              [["--socket-path", "@dir@/v.sock"], ["--fd", "@sock_fd@"],
                               ["--print-capabilities"]]])
    return st.one_of(
        acrn,
        acrn.map(lambda a: ["lspci", *a]),
        acrn.map(lambda a: ["config", "--from-args", *a]),
        st.tuples(st.sampled_from(["--to-args", "--check", "--frob", "-h"]), files)
        .map(lambda t: ["config", t[0], *t[1]]),
        run.map(lambda a: ["run", *a]),
        vhost.map(lambda a: ["vhost-user", *a]),
    )


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Files the lines name, and stand-ins for the two things that would run on."""
    import socket

    monkeypatch.setenv("ACRN_PYDM_RUNTIME_DIR", str(tmp_path / "run"))
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 65536)
    toml = tmp_path / "vm1.toml"
    toml.write_text('hv = "sim"\nmemsize = "128M"\n[[pci_slot]]\nslot = 0\n'
                    'emul = "hostbridge"\n[[pci_slot]]\nslot = 3\nemul = "virtio-rnd"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pci_slot]]\nslot = 3\nemul = "virtio-blk"\noptions = "x,bogus"\n')

    async def build_and_release(cfg):
        vm = Vm(parse_args(cfg.to_args()), SimHypervisor(cfg.vcpus))
        vm.build()
        vm._release()

    async def serve_nothing(device, *, socket_path=None, fd=None, task_status=None):
        device.close()

    monkeypatch.setattr(cli, "run_vm", build_and_release)
    shm = f"pydm-orders-{os.getpid()}"
    monkeypatch.setattr(vhost_server, "serve", serve_nothing)
    a, b = socket.socketpair()
    plain = open(tmp_path / "plain", "w")  # noqa: SIM115 - closed below
    yield {"img": str(img), "dir": str(tmp_path), "toml": str(toml), "bad_toml": str(bad),
           "sock_fd": str(a.fileno()), "file_fd": str(plain.fileno()), "shm": shm}
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/{shm}")
    a.close()
    b.close()
    plain.close()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(line=_command())
def test_any_order_exits_cleanly(world, line):
    args = []
    for token in line:
        for key, value in world.items():
            token = token.replace(f"@{key}@", value)
        args.append(token)
    rc, _, err = run_main(args)
    kind = args[0] if args and args[0] in ("lspci", "config", "run", "vhost-user") else "main"
    event(f"{kind}: exit {rc}")
    assert "Traceback" not in err, (args, err)
    if rc != 0:  # one error line; warnings logged before it (obsolete options) may stand
        errors = [ln for ln in err.splitlines() if not re.match(r"acrn-pydm\[[\w.]+\] WARN", ln)]
        assert len(errors) == 1, (args, rc, err)
