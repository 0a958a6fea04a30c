"""``python -m tests.fuzz <target> [--examples N]``: run one target's long mode.

Targets are the files ``tests/fuzz/test_fuzz_<target>.py``; ``all`` runs every one.
Prints the number of inputs each test ran; other arguments go to pytest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).parent


def targets() -> list[str]:
    return sorted(p.stem.removeprefix("test_fuzz_") for p in HERE.glob("test_fuzz_*.py"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("target", choices=[*targets(), "all"])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("-k", default=None, help="pytest -k expression inside the target")
    args, rest = ap.parse_known_args(argv)  # the rest goes to pytest
    os.environ["ACRN_PYDM_FUZZ_EXAMPLES"] = str(args.examples)
    import pytest

    files = [str(HERE / f"test_fuzz_{t}.py") for t in
             (targets() if args.target == "all" else [args.target])]
    extra = ["-k", args.k] if args.k else []
    return pytest.main([*files, "-q", "-x", "-p", "no:cacheprovider", *extra, *rest])


if __name__ == "__main__":
    sys.exit(main())
