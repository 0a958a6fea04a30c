"""Long fuzz runs: ``python -m tests.fuzz <target>... [--examples N] [--engine E]``.

Targets are the files ``tests/fuzz/test_fuzz_<target>.py`` (``all``: every one), run in the
order given; ``-k EXPR`` picks tests inside them. Engines:

* ``random`` (default): each @given test (and each ``one()`` a test drives inside a running
  VM) gets N random byte strings through ``test.hypothesis.fuzz_one_input``, no hypothesis
  engine in the loop; ``atheris``: the same, coverage-guided by libFuzzer
  (``pip install atheris``; ``--instrument`` adds coverage of every loaded module);
* ``hypothesis``: hypothesis' own engine with ``max_examples=N`` (slow, shrinks failures).

Every test runs in its own process, niced with ``--nice``; its PID (and this runner's) is
written to ``--pidfile``. Progress (inputs, inputs per CPU-second) goes to stderr every ten
CPU-seconds and to ``OUT/counts/<test>.txt``, so a stopped run still reports:
``python -m tests.fuzz report`` prints the table. ``--seconds S`` caps each test's CPU time.

A failing input is saved as ``OUT/crashes/<module>--<test>-crash-<hash>.bin`` (``-hang-`` for
an input the watchdog killed; ``<module>--<test>.current`` is left by a hard crash) and
runs again, printing the arguments it decodes to, with::

    python -m tests.fuzz repro OUT/crashes/<file>

Examples::

    nice -n 19 python -m tests.fuzz config pci --examples 1000000 --out /tmp/fuzz
    python -m tests.fuzz virtqueue -k test_rnd --examples 5000 --engine atheris
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def targets() -> list[str]:
    return sorted(p.stem.removeprefix("test_fuzz_") for p in HERE.glob("test_fuzz_*.py"))


def _pytest(args: list[str], env: dict[str, str], nice: int = 0,
            pidfile: str | None = None) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)
    if pidfile:
        Path(pidfile).write_text(f"{os.getpid()}\n{proc.pid}\n")
    try:
        return proc.wait()
    finally:
        if pidfile:
            Path(pidfile).write_text("")


def collect(files: list[str], k: str | None) -> list[str]:
    extra = ["-k", k] if k else []
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *files, *extra], cwd=ROOT,
                         capture_output=True, text=True, check=False).stdout
    return [line.strip() for line in out.splitlines() if "::" in line]


def report(out: Path) -> int:
    """The counts every test wrote (the last line of each file holds the engine's)."""
    rows = sorted((out / "counts").glob("*.txt"))
    for p in rows:
        lines = p.read_text().splitlines()
        engine = [x for x in lines if re.match(r"\S+ inputs=", x)]
        print(engine[-1] if engine else f"{p.stem} {lines[0] if lines else ''}")
    for p in sorted((out / "crashes").glob("*.bin")):
        kind = "flaky (passed again)" if "-flaky-" in p.name else "failure"
        print(f"{kind}: python -m tests.fuzz repro {p}")
    for p in sorted((out / "crashes").glob("*.current")):
        print(f"died on (or was stopped in) this input: python -m tests.fuzz repro {p}")
    return 0


def repro(path: str) -> int:
    from ._engine import nodeid_of

    name = Path(path).name
    stem = re.sub(r"(-(crash|hang|flaky|atheris-.*)-[0-9a-f]+\.bin|\.current)$", "", name)
    env = dict(os.environ, ACRN_PYDM_FUZZ_REPRO=str(Path(path).resolve()))
    return _pytest([nodeid_of(stem), "-x", "--capture=sys"], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["repro"] and len(argv) == 2:
        return repro(argv[1])
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="+", choices=[*targets(), "all", "report"])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--engine", choices=["random", "atheris", "hypothesis"], default="random")
    ap.add_argument("--seconds", type=float, default=None, help="CPU-seconds cap per test")
    ap.add_argument("--out", default="/tmp/fuzz", help="counts/ and crashes/ go here")
    ap.add_argument("--pidfile", default=None)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--instrument", action="store_true", help="atheris: coverage of all code")
    ap.add_argument("-k", default=None, help="pytest -k expression inside the targets")
    args, rest = ap.parse_known_args(argv)  # the rest goes to pytest
    out = Path(args.out)
    if args.target == ["report"]:
        return report(out)
    (out / "counts").mkdir(parents=True, exist_ok=True)
    names = targets() if "all" in args.target else args.target
    files = [f"tests/fuzz/test_fuzz_{t}.py" for t in names]
    env = dict(os.environ, ACRN_PYDM_FUZZ_EXAMPLES=str(args.examples),
               ACRN_PYDM_FUZZ_CRASHES=str(out / "crashes"))
    if args.engine != "hypothesis":
        env["ACRN_PYDM_FUZZ_ENGINE"] = args.engine
    if args.seconds:
        env["ACRN_PYDM_FUZZ_SECONDS"] = str(args.seconds)
    if args.instrument:
        env["ACRN_PYDM_FUZZ_INSTRUMENT"] = "1"
    from ._engine import file_stem

    failed = []
    for nodeid in collect(files, args.k):  # one process each: atheris exits when done
        env["ACRN_PYDM_FUZZ_COUNTS"] = str(out / "counts" / f"{file_stem(nodeid)}.txt")
        print(f"== {nodeid}", file=sys.stderr, flush=True)
        rc = _pytest([nodeid, "--capture=sys", *rest], env, args.nice, args.pidfile)
        if rc not in (0, 5):
            failed.append(f"{nodeid} (exit {rc})")
    report(out)
    for f in failed:
        print(f"FAILED {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
