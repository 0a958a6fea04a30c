"""Sizes and files from the user are range-checked before use (issue 18 item 5): each ends
in one line and a non-zero exit, never a traceback, a hang, or a VM the host cannot hold."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from devicemodel.config import parse_args
from devicemodel.config import toml as vmtoml
from devicemodel.errors import ConfigError
from devicemodel.hostinfo import host_mem_total
from devicemodel.memory import HIGHMEM_BASE, LOWMEM_LIMIT, MAX_MEMSIZE, GiB, MiB
from devicemodel.pci.bus import MEM64_BASE
from tests.support.launch import one_error_line, run_main
from tests.support.paths import ROOT

HUGE = "99999999999999999999G"


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ACRN_PYDM_RUNTIME_DIR", str(tmp_path / "run"))


def vm_file(tmp_path, text: str, name: str = "vm1.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_memory_ceiling_keeps_ram_below_the_64bit_pci_window():
    assert HIGHMEM_BASE + (MAX_MEMSIZE - LOWMEM_LIMIT) == MEM64_BASE
    assert parse_args(["-m", "254G", "vm"]).memsize == 254 * GiB


@pytest.mark.parametrize("front", [[], ["config", "--from-args"]])
@pytest.mark.parametrize("size", [HUGE, "4096G", "255G", "9" * 40 + "M"])
def test_memory_beyond_any_guest_is_one_line(front, size):
    line = one_error_line(*run_main([*front, "--hv", "sim", "-m", size, "vm1"])[::2])
    assert line.startswith(f"acrn-pydm: error: -m {size}: ")
    assert "more than the 254 GiB a guest can have" in line and "at most 254G" in line


@pytest.mark.parametrize("mode", [["run", "--hv", "sim"], ["config", "--check"]])
def test_memory_beyond_any_guest_in_a_vm_file(tmp_path, mode):
    path = vm_file(tmp_path, f'memsize = "{HUGE}"\n')
    line = one_error_line(*run_main([*mode, path])[::2])
    assert f'memsize = "{HUGE}"' in line and "at most 254G" in line


def _above_host_memory() -> int:
    total = host_mem_total()
    if total is None:
        pytest.skip("no MemTotal in /proc/meminfo")
    size = (total // (2 * MiB) + 1) * 2 * MiB
    if size > MAX_MEMSIZE:
        pytest.skip("this host has more RAM than any guest may have")
    return size


def test_memory_above_the_host_is_refused_by_run_only(tmp_path):
    size = _above_host_memory()
    args = ["--hv", "sim", "-m", f"{size // MiB}M", "-s", "0:0,hostbridge", "vm1"]
    line = one_error_line(*run_main(args)[::2])
    assert "MemTotal" in line and line.startswith(f"acrn-pydm: error: -m {size // MiB}M: ")
    # a host check: converting the line on another machine is fine
    rc, toml_text, err = run_main(["config", "--from-args", *args])
    assert rc == 0, err
    path = vm_file(tmp_path, toml_text)
    assert run_main(["config", "--check", path])[0] == 0
    line = one_error_line(*run_main(["run", path])[::2])
    assert line.startswith(f"acrn-pydm: error: {path}: memsize = ") and "MemTotal" in line


@pytest.mark.parametrize("nest", [
    "x = " + "[" * 3000 + "]" * 3000,
    "x = " + "{a = " * 3000 + "1" + "}" * 3000,
    "pci_slot = " + "[" * 400 + "]" * 400,
])
@pytest.mark.parametrize("mode", [["run", "--hv", "sim"], ["config", "--check"],
                                  ["config", "--to-args"]])
def test_deep_nesting_is_one_line(tmp_path, nest, mode):
    path = vm_file(tmp_path, nest + "\n")
    line = one_error_line(*run_main([*mode, path])[::2])
    assert "nested" in line and path in line


def test_a_deep_dotted_key_is_refused_before_the_toml_reader_spends_minutes(tmp_path):
    """tomllib's cost grows with the square of a key's depth: 200,000 parts took minutes."""
    path = vm_file(tmp_path, "a" + ".b" * 200_000 + " = 1\n")
    res = subprocess.run([sys.executable, "-m", "devicemodel", "config", "--check", path],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    line = one_error_line(res.returncode, res.stderr)
    assert "line 1 has 200000 dots" in line


def test_dotted_keys_of_real_files_still_read():
    cfg = vmtoml.loads('name = "vm1"\nlogger.console = 4\nbootargs = "a.b.c ip=10.0.0.2"\n')
    assert cfg.logger_setting == "console,level=4"


@pytest.mark.parametrize("path,kind", [("/dev/zero", "a character device"),
                                       ("/", "a directory"), ("/dev/null", "a character device")])
def test_run_refuses_what_is_not_a_regular_file(path, kind):
    for mode in (["run"], ["config", "--check"], ["config", "--to-args"]):
        line = one_error_line(*run_main([*mode, path])[::2])
        assert line == (f"acrn-pydm: error: {path}: {kind}, not a regular file; give the path "
                        "of a .toml VM file")


def test_run_refuses_a_fifo_without_waiting_for_a_writer(tmp_path):
    """Opened for reading, a FIFO without a writer blocks; we never open it that way."""
    fifo = tmp_path / "vm1.toml"
    os.mkfifo(fifo)
    res = subprocess.run([sys.executable, "-m", "devicemodel", "run", str(fifo)],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=ROOT,
                                  ACRN_PYDM_RUNTIME_DIR=str(tmp_path / "run")))
    assert one_error_line(res.returncode, res.stderr).endswith(
        "vm1.toml: a FIFO, not a regular file; give the path of a .toml VM file")


def test_run_refuses_a_socket(tmp_path):
    path = str(tmp_path / "vm1.toml")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        line = one_error_line(*run_main(["run", path])[::2])
    assert "a socket, not a regular file" in line


def test_run_refuses_a_file_too_large_to_be_a_vm_file(tmp_path):
    path = tmp_path / "vm1.toml"
    with open(path, "wb") as f:
        f.write(b'name = "vm1"\n')
        f.truncate(vmtoml.MAX_FILE_SIZE + 1)
    line = one_error_line(*run_main(["run", str(path)])[::2])
    assert f"{vmtoml.MAX_FILE_SIZE + 1} bytes is not a VM file (at most 1 MiB)" in line


def test_unreadable_and_odd_vm_files_are_one_line(tmp_path):
    bad_utf8 = tmp_path / "latin1.toml"
    bad_utf8.write_bytes(b'name = "caf\xe9"\n')
    line = one_error_line(*run_main(["run", str(bad_utf8)])[::2])
    assert "byte 11 is not UTF-8" in line
    for path in (str(tmp_path / "missing.toml"), "nul\0.toml", ""):
        one_error_line(*run_main(["config", "--check", path])[::2])


PEER_COMMANDS = {"vhost-user": "the connected socket the front end passed us",
                 "vfio-user": "the listening or connected UNIX socket handed to this process"}


@pytest.mark.parametrize("command", PEER_COMMANDS)
@pytest.mark.parametrize("fd", ["-1", "99999999999999999999", "2147483648", "3x", "", "³"])
def test_peer_server_fd_numbers_are_range_checked(command, fd):
    line = one_error_line(*run_main([command, "virtio-rnd", "--fd", fd])[::2])
    assert line == (f"acrn-pydm {command}: error: --fd {fd}: not a file descriptor number; "
                    f"give the number of {PEER_COMMANDS[command]}, e.g. --fd 3")


@pytest.mark.parametrize("command", PEER_COMMANDS)
def test_peer_server_fd_must_be_an_open_socket(tmp_path, command):
    closed = os.open(os.devnull, os.O_RDONLY)
    os.close(closed)
    line = one_error_line(*run_main([command, "virtio-rnd", "--fd", str(closed)])[::2])
    assert f"--fd {closed}: not an open file descriptor" in line
    with open(tmp_path / "f", "w") as f:
        line = one_error_line(*run_main([command, "virtio-rnd", "--fd",
                                         str(f.fileno())])[::2])
    assert "not a socket" in line


@pytest.mark.parametrize("command", PEER_COMMANDS)
def test_peer_server_socket_path_must_be_usable(command):
    line = one_error_line(*run_main([command, "virtio-rnd", "--socket-path", ""])[::2])
    assert "--socket-path '': not a usable path" in line


@pytest.mark.parametrize("text", [
    '[[pci_slot]]\nslot = 3\nemul = "virtio-blk"\noptions = "disk\\u0000.img"\n',
    'kernel = "/boot/vmlinuz\\u0000"\n',
    'name = "vm\\u00001"\n',
])
def test_a_nul_in_a_vm_file_is_one_line(tmp_path, text):
    """TOML can spell a NUL; no command line can, and os.open() raises ValueError on it."""
    path = vm_file(tmp_path, text)
    for mode in (["run", "--hv", "sim"], ["config", "--check"]):
        line = one_error_line(*run_main([*mode, path])[::2])
        assert "a string holds a NUL character" in line


@pytest.mark.parametrize("argv", [["-B", "\0"], ["-s", "3,virtio-blk,a\0b"], ["vm\0"]])
def test_a_nul_in_an_argument_list_is_refused_like_in_a_vm_file(argv):
    """parse_args is called with lists too (config fuzzing, launch helpers): the VM file it
    would write must not be one the TOML reader then refuses."""
    with pytest.raises(ConfigError, match="NUL character"):
        parse_args(["-m", "64M", *argv])
