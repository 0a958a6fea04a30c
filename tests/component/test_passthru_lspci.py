"""What a guest's lspci shows for a vMSI-X device: the real ``lspci -F`` decodes our dump."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("lspci") is None, reason="needs lspci (pciutils)")


def decode(*slot_args: str) -> str:
    dump = subprocess.run(
        [sys.executable, "-m", "devicemodel", "lspci", "-s", "0:0,hostbridge",
         *[a for s in slot_args for a in ("-s", s)], "vm1"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return subprocess.run(["lspci", "-F", "/dev/stdin", "-vvv", "-s", "00:05.0"], input=dump,
                          check=True, capture_output=True, text=True, timeout=60).stdout


def test_lspci_decodes_the_vmsix_capability():
    out = decode("5,passthru,sim:4,vmsix_on_msi")
    assert "Capabilities: [50] MSI-X: Enable- Count=4 Masked-" in out
    assert "Vector table: BAR=1 offset=00000000" in out
    assert "PBA: BAR=1 offset=00000800" in out
    assert "MSI:" not in out
    assert "Capabilities: [68] Vendor Specific" in out  # the chain goes on after it
    assert "Region 1: Memory at 80001000 (32-bit, non-prefetchable)" in out


def test_lspci_without_vmsix_shows_plain_msi_with_its_messages():
    out = decode("5,passthru,sim:8")
    assert "MSI: Enable- Count=1/8 Maskable+ 64bit+" in out
    assert "MSI-X" not in out
