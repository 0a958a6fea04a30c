"""One validator for every front door: what ``run`` refuses, ``config --from-args``,
``config --check`` and ``lspci`` refuse, in the same words (issue 16 item 5).

Each bad line below is refused by all of them with one identical line; and building the VM
on the sim backend without the validator fails too, with the device's own message inside
that line, so the validator is never stricter than the devices and speaks their words.
"""

from __future__ import annotations

import pytest

from devicemodel import cli
from devicemodel.config import ConfigError, parse_args
from devicemodel.config import toml as vmtoml
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.platform.uart_backend import open_backend
from devicemodel.vm import Vm
from devicemodel.vmcheck import check_uart_backend
from tests.support.launch import one_error_line, run_main

BASE = ["--hv", "sim", "-m", "128M", "-s", "0:0,hostbridge"]

# (extra acrn-dm options, whether the device's own build message is the validator's words)
BAD = [
    (["-s", "9,virtio-blkk"], False),  # the registry's words name no slot; ours do
    (["-s", "3,virtio-gpu"], False),
    (["-s", "3,virtio-blk,{img},bogus"], True),
    (["-s", "3,virtio-blk"], True),
    (["-s", "3,virtio-blk,{img},range=1"], True),
    (["-s", "3,virtio-blk,{img},legacy,modern"], True),
    (["-s", "3,virtio-blk,{img},pio_notify"], True),
    (["-s", "4,virtio-net"], True),
    (["-s", "4,virtio-net,tap=t0,mac=zz"], True),
    (["-s", "4,virtio-net,tap=t0,frob"], True),
    (["-s", "5,virtio-console,bogus"], True),
    (["-s", "5,virtio-console,@stdio:a,@stdio:b"], True),
    (["-s", "6,virtio-rnd,bogus"], True),
    (["-s", "7,passthru"], True),
    (["-s", "7,passthru,zz/1/0"], True),
    (["-s", "7,passthru,sim:4,enable_ptm,bogus"], True),
    (["-s", "8,ivshmem,xx:/a,2"], True),
    (["-s", "8,ivshmem,hv:/a,3"], True),
    (["-s", "8,ivshmem,dm:/a/b,2"], True),
    (["-s", "9,uart,stdio"], True),
    (["-s", "9,uart,vuart_idx:x"], True),
    (["-s", "3,ahci,hd:/x.img"], False),
    (["-s", "3,xhci,1-1"], False),
    (["-s", "7,passthru,sim:3"], True),
    (["-s", "7,passthru,sim:4,frob"], True),
    (["-s", "7,passthru,sim:x"], True),
    (["-s", "7,passthru,sim:4,vmsix_on_msi,9"], True),
    (["-s", "8,dummy,msix=0"], True),
    (["-s", "8,dummy,what"], True),
    (["-s", "1:1:0,lpc"], True),
    (["-s", "1,lpc", "-s", "2,lpc"], True),
    (["-s", "1,lpc", "-l", "com5,stdio,0x10000,3"], True),
    (["-s", "1,lpc", "-l", "com1,bogus"], True),
    (["-s", "1,lpc", "-l", "com2,tcp:0"], True),
    (["-s", "1,lpc", "-l", "com3,file:"], True),
]

GOOD = [
    ["-s", "3,virtio-blk,{img},ro"],
    ["-s", "3,virtio-blk,{img},modern,pio_notify"],
    ["-s", "6,virtio-rnd"],
    ["-s", "7,passthru,sim:4,vmsix_on_msi"],
    ["-s", "7,passthru,sim:4,enable_ptm,gpu,dsdt=/x.asl,romfile=/x.rom"],
    ["-s", "8,ivshmem,hv:/shm_region_0,2,0", "-s", "9,uart,vuart_idx:1"],
    ["--rtvm", "--intr_monitor", "10000,10,1,100", "--mmiodev_pt", "0xfed40000,0x1000"],
    ["-s", "8,dummy,msix=4,intx"],
    ["-s", "1,lpc", "-l", "com1", "-l", "com2,file:{log}", "-l", "com5,file:{log}.5,0x2e8,5"],
    ["-l", "com1,bogus"],  # no LPC bridge: -l is ignored with a warning, as in acrn-dm
]


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("ACRN_PYDM_RUNTIME_DIR", str(tmp_path / "run"))
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 65536)
    return {"img": str(img), "log": str(tmp_path / "com2.log"), "dir": tmp_path}


def _fill(args: list[str], files: dict) -> list[str]:
    return [a.format(**files) for a in args]


def _build_without_checks(args: list[str]) -> None:
    cfg = parse_args(args)
    vm = Vm(cfg, SimHypervisor(cfg.vcpus))
    vm.build()
    vm._release()


@pytest.mark.parametrize(("extra", "same_words"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_every_front_door_refuses_alike(files, extra, same_words):
    args = [*BASE, *_fill(extra, files), "vm1"]
    line = one_error_line(*run_main(args)[::2])
    assert one_error_line(*run_main(["config", "--from-args", *args])[::2]) == line
    assert one_error_line(*run_main(["lspci", *args])[::2]) == line
    # the devices themselves refuse it too, in the words the line carries
    with pytest.raises(ConfigError) as built:
        _build_without_checks(args)
    if same_words:
        assert str(built.value) in line
    # and the same description as a VM file: run and config --check say the same
    path = files["dir"] / "vm1.toml"
    path.write_text(vmtoml.dumps(parse_args(args)))
    from_file = one_error_line(*run_main(["run", str(path)])[::2])
    assert one_error_line(*run_main(["config", "--check", str(path)])[::2]) == from_file
    assert one_error_line(*run_main(["config", "--to-args", str(path)])[::2]) == from_file
    assert from_file.startswith(f"acrn-pydm: error: {path}: ")
    if same_words:
        assert str(built.value) in from_file


@pytest.mark.parametrize("extra", GOOD, ids=[" ".join(g) for g in GOOD])
def test_every_front_door_accepts_alike(files, extra, monkeypatch):
    args = [*BASE, *_fill(extra, files), "vm1"]
    rc, toml_text, err = run_main(["config", "--from-args", *args])
    assert rc == 0, err
    path = files["dir"] / "vm1.toml"
    path.write_text(toml_text)
    rc, out, err = run_main(["config", "--check", str(path)])
    assert rc == 0 and out == f"{path}: VM vm1 OK\n", err
    rc, out, err = run_main(["lspci", *args])
    assert rc == 0 and out.startswith("00:00.0 hostbridge"), err
    _build_without_checks(args)

    async def built_and_released(cfg):  # run as far as the VM is built
        _build_without_checks(cfg.to_args())

    monkeypatch.setattr(cli, "run_vm", built_and_released)
    for command in (args, ["run", str(path)]):
        rc, _, err = run_main(command)
        assert rc == 0, err


BAD_UART_SPECS = ["bogus", "file:", "socket:", "tcp:", "tcp:0", "tcp:65536", "tcp:x", "x:y",
                  "FILE:x", "stdio2"]


@pytest.mark.parametrize("spec", BAD_UART_SPECS)
def test_uart_backend_syntax_matches_open_backend(spec):
    """The validator and open_backend refuse a bad -l backend in the same words."""
    with pytest.raises(ConfigError) as opened:
        open_backend(spec)
    with pytest.raises(ConfigError) as checked:
        check_uart_backend(spec)
    assert str(checked.value) == str(opened.value)


def test_the_issue_line_from_args_is_refused():
    """`config --from-args` used to print a VM file for a device type run then refused."""
    rc, out, err = run_main(["config", "--from-args", "-s", "9,virtio-blkk", "vm1"])
    line = one_error_line(rc, err)
    assert out == "" and line.startswith(
        "acrn-pydm: error: -s 9,virtio-blkk: unknown emulation 'virtio-blkk'; known: ")
    assert "virtio-blk, " in line
