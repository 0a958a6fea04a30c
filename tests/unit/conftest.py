"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def images(tmp_path):
    """The files ACRN's sample launch line names (OVMF, a disk, a kernel), as empty stand-ins
    (tests/support/launch.py's ``typical_line`` takes them)."""
    ovmf = tmp_path / "OVMF.fd"
    ovmf.write_bytes(b"\0" * 4096)
    disk = tmp_path / "win10-ltsc.img"
    disk.write_bytes(b"\0" * 4096)
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"\0" * 4096)
    return {"ovmf": str(ovmf), "disk": str(disk), "kernel": str(kernel)}
