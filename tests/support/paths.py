"""Where the repository is (tests run programs from it and read its files)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = str(REPO)  # the same, as a str (PYTHONPATH, os.path.join)
