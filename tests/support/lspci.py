"""``acrn-pydm lspci`` decoded by the real ``lspci -F`` (pciutils)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def decode(tmp_path: Path, *args: str) -> dict[str, str]:
    """Run our subcommand in a child process (as a user would), then lspci -F -vvv on it;
    returns lspci's text per function."""
    dump = subprocess.run([sys.executable, "-m", "devicemodel", "lspci", *args],
                          capture_output=True, text=True, check=True).stdout
    path = tmp_path / "dump.txt"
    path.write_text(dump)
    out = subprocess.run(["lspci", "-F", str(path), "-vvv", "-nn"], capture_output=True,
                         text=True, check=True).stdout
    blocks = {}
    for block in out.strip().split("\n\n"):
        blocks[block.split(" ", 1)[0]] = block
    return blocks
