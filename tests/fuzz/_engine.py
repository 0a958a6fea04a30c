"""The fast long mode: feed a hypothesis test raw bytes through ``fuzz_one_input``.

Hypothesis' own engine (generation, shrinking, its database) costs milliseconds per example;
``test.hypothesis.fuzz_one_input(buffer)`` decodes a byte string into the test's arguments
and runs it once, which is all a long campaign needs. The bytes come from an engine:
``random`` (``os.urandom``, always available) or ``atheris`` (coverage-guided libFuzzer,
optional; its ``Fuzz()`` exits the process, so the runner gives each test its own).

Chosen with ``ACRN_PYDM_FUZZ_ENGINE``; ``ACRN_PYDM_FUZZ_EXAMPLES`` inputs per test (default
1,000,000), at most ``ACRN_PYDM_FUZZ_SECONDS`` CPU-seconds per test. A failing input is
saved under ``ACRN_PYDM_FUZZ_CRASHES`` (default ``/tmp/fuzz/crashes``) as
``<module>--<test>-crash-<hash>.bin`` (``-flaky-`` if it passed when run again at
once: a wall-clock timeout while the process was stopped); the input being run is
mirrored in ``<module>--<test>.current`` so a hard crash (SIGSEGV on a guard page, a hang
the watchdog kills) leaves it behind.
``ACRN_PYDM_FUZZ_REPRO=<file>`` runs that one input and shows its arguments.
"""

from __future__ import annotations

import faulthandler
import hashlib
import inspect
import mmap
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import given, settings

BUFFER = 8192  # bytes per input: enough for the longest argument lists drawn here
HANG_CPU_S = 60.0  # one input using this much CPU is a hang
HANG_WALL_S = 600.0  # ... or this much wall time (generous: the lead may SIGSTOP us)


def engine() -> str | None:
    return os.environ.get("ACRN_PYDM_FUZZ_ENGINE") or None


def repro_file() -> str | None:
    return os.environ.get("ACRN_PYDM_FUZZ_REPRO") or None


def active() -> bool:
    """True when tests are fed by this module instead of hypothesis' engine."""
    return engine() is not None or repro_file() is not None


@dataclass
class Stats:
    """What one test's campaign did, kept for the counts file."""

    inputs: int = 0  # inputs that reached the test body
    fed: int = 0  # buffers given (some decode to nothing: too short for the arguments)
    cpu_s: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # origin -> saved file
    flaky: int = 0  # failed once, passed when run again

    def line(self, name: str) -> str:
        rate = self.inputs / self.cpu_s if self.cpu_s else 0.0
        return (f"{name} inputs={self.inputs} fed={self.fed} cpu_s={self.cpu_s:.0f} "
                f"inputs_per_cpu_s={rate:.0f} failures={len(self.failures)} flaky={self.flaky}")


STATS: dict[str, Stats] = {}


def file_stem(nodeid: str) -> str:
    """``tests/fuzz/test_fuzz_pci.py::test_x`` -> ``test_fuzz_pci--test_x``."""
    path, _, test = nodeid.partition("::")
    return f"{Path(path).stem}--{test.split('[')[0]}"


def nodeid_of(stem: str) -> str:
    module, _, test = stem.partition("--")
    return f"tests/fuzz/{module}.py::{test}"


def current_nodeid() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "unknown::unknown").rsplit(" ", 1)[0]


def fuzz_target(test: Callable, fixtures: dict[str, Any],
                show: bool = False) -> Callable[[bytes], bytes | None]:
    """``fuzz_one_input`` of a copy of a @given test with its pytest fixtures bound.

    The copy takes the strategies (``_given_kwargs``) and settings of the original; no
    example database (a long run would grow it without bound). ``show`` prints the
    arguments each input decodes to (for reproducing a saved input)."""
    h = test.hypothesis  # type: ignore[attr-defined]
    inner = h.inner_test
    names = list(h._given_kwargs)

    def body(**kw: Any) -> Any:
        if show:
            print(f"arguments: {kw!r}", file=sys.__stderr__, flush=True)
        return inner(**fixtures, **kw)

    body.__name__ = body.__qualname__ = inner.__name__
    body.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names])
    parent = getattr(test, "_hypothesis_internal_use_settings", None) or settings.default
    wrapped = settings(parent, database=None, deadline=None)(given(**h._given_kwargs)(body))
    return wrapped.hypothesis.fuzz_one_input


def _passes_again(fuzz: Callable[[bytes], bytes | None], data: bytes) -> bool:
    try:
        fuzz(data)
    except Exception:
        return False
    return True


def _origin(e: BaseException) -> str:
    """Where a failure comes from: exception type and the innermost frame, so one bug
    saves one file however many inputs hit it."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
    return f"{type(e).__name__}@{where}"


class _Current:
    """The input being run, mirrored in a small file-backed mmap (a memcpy per input)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, BUFFER + 4)
        self.map = mmap.mmap(fd, BUFFER + 4)
        os.close(fd)

    def set(self, data: bytes) -> None:
        n = min(len(data), BUFFER)
        self.map[0:4] = n.to_bytes(4, "little")
        self.map[4 : 4 + n] = data[:n]

    def close(self) -> None:
        self.map.close()
        self.path.unlink(missing_ok=True)


def read_input(path: str) -> bytes:
    data = Path(path).read_bytes()
    if path.endswith(".current"):
        n = int.from_bytes(data[:4], "little")
        return data[4 : 4 + n]
    return data


class _Watchdog(threading.Thread):
    """Kills the process (after saving the input and every thread's stack) when one
    input runs too long: a hang is a failure, and an engine can only see it from outside."""

    def __init__(self, name: str, crashdir: Path) -> None:
        super().__init__(daemon=True, name="fuzz-watchdog")
        self.fuzz_name, self.crashdir = name, crashdir
        self.started: tuple[float, float] | None = None
        self.data = b""
        self.stopped = threading.Event()

    def begin(self, data: bytes) -> None:
        self.data = data
        self.started = (time.process_time(), time.monotonic())

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            s = self.started
            if s is None:
                continue
            cpu, wall = time.process_time() - s[0], time.monotonic() - s[1]
            if cpu > HANG_CPU_S or wall > HANG_WALL_S:
                path = _save(self.crashdir, self.fuzz_name, "hang", self.data)
                print(f"\nFUZZ HANG in {self.fuzz_name} ({cpu:.0f} CPU-s, {wall:.0f} s): "
                      f"input saved to {path}\n  reproduce: {repro_command(path)}",
                      file=sys.__stderr__, flush=True)
                faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
                _write_counts()
                os._exit(3)


def _save(crashdir: Path, name: str, kind: str, data: bytes) -> Path:
    path = crashdir / f"{file_stem(name)}-{kind}-{hashlib.sha1(data).hexdigest()[:12]}.bin"
    path.write_bytes(data)
    return path


def repro_command(path: Path | str) -> str:
    return f"python -m tests.fuzz repro {path}"


def _write_counts() -> None:
    from ._common import _save as save_counts

    save_counts()


def counts_lines() -> list[str]:
    return [s.line(n) for n, s in STATS.items()]


def _progress(name: str, st: Stats, final: bool = False) -> None:
    print(("done " if final else "") + st.line(name), file=sys.__stderr__, flush=True)
    _write_counts()


#: random buffers fed before a target that decoded none of them is handed back
UNFEEDABLE_AFTER = 2000


class Unfeedable(Exception):  # noqa: N818 - a verdict on the target, not an error in it
    """Random bytes never decode to an input of this target (its strategies reject most
    draws), so this engine cannot fuzz it; the caller runs hypothesis' own engine."""


def run(name: str, fuzz: Callable[[bytes], bytes | None]) -> None:
    """Feed ``fuzz`` (a ``fuzz_one_input``) until the input budget or the CPU budget is
    spent; raise at the end if any input failed (each distinct failure saved once)."""
    from ._common import examples

    repro = repro_file()
    if repro is not None:
        fuzz(read_input(repro))  # raises what the input raised
        print(f"{repro}: passes", file=sys.__stderr__, flush=True)
        return
    budget = examples(1_000_000)
    seconds = float(os.environ.get("ACRN_PYDM_FUZZ_SECONDS", "inf"))
    crashdir = Path(os.environ.get("ACRN_PYDM_FUZZ_CRASHES", "/tmp/fuzz/crashes"))
    crashdir.mkdir(parents=True, exist_ok=True)
    st = STATS.setdefault(name, Stats())
    current = _Current(crashdir / f"{file_stem(name)}.current")
    dog = _Watchdog(name, crashdir)
    dog.start()
    if engine() == "atheris" and os.environ.get("ACRN_PYDM_FUZZ_INSTRUMENT"):
        import atheris

        atheris.instrument_all()  # coverage of every loaded module: slower, but guided
    t0 = time.process_time()
    last = t0

    def one(data: bytes) -> None:
        nonlocal last
        current.set(data)
        dog.begin(data)
        st.fed += 1
        try:
            if fuzz(data) is not None:
                st.inputs += 1
        except Exception as e:
            st.inputs += 1
            origin = _origin(e)
            if _passes_again(fuzz, data):
                # wall-clock timeouts inside a test fire when the process was stopped
                # (SIGSTOP) or starved; kept for a look, not counted as a failure
                st.flaky += 1
                path = _save(crashdir, name, "flaky", data)
                print(f"\nFUZZ FLAKY in {name}: {origin}: {e!r}; passes when run again: "
                      f"{repro_command(path)}", file=sys.__stderr__, flush=True)
            elif origin not in st.failures:
                path = _save(crashdir, name, "crash", data)
                st.failures[origin] = str(path)
                print(f"\nFUZZ FAILURE in {name}: {origin}: {e!r}\n  input saved to {path}\n"
                      f"  reproduce: {repro_command(path)}\n"
                      + "".join(traceback.format_exception(e))[-3000:],
                      file=sys.__stderr__, flush=True)
            if engine() == "atheris" and len(st.failures) >= 20:
                raise
        finally:
            dog.started = None
        now = time.process_time()
        st.cpu_s = now - t0
        if now - last >= 10.0:
            last = now
            _progress(name, st)

    try:
        if engine() == "atheris":
            _atheris(one, name, crashdir, budget, seconds)
        else:
            while st.inputs < budget and st.cpu_s < seconds and len(st.failures) < 20:
                one(os.urandom(BUFFER))
                if st.inputs == 0 and st.fed >= UNFEEDABLE_AFTER:
                    raise Unfeedable(f"{name}: none of {st.fed} random inputs decoded to an "
                                     "input; running hypothesis' own engine instead")
    finally:
        dog.stopped.set()
        current.close()
        _progress(name, st, final=True)
    if st.failures:
        raise AssertionError(f"{name}: {len(st.failures)} distinct failures:\n" + "\n".join(
            f"  {o}: {repro_command(p)}" for o, p in st.failures.items()))


def _atheris(one: Callable[[bytes], None], name: str, crashdir: Path, budget: int,
             seconds: float) -> None:
    """libFuzzer drives ``one``; it exits the process when done (the counts file and the
    progress lines were written on the way)."""
    import atheris  # optional: pip install atheris

    argv = [sys.argv[0], f"-runs={budget}", f"-max_len={BUFFER}", "-len_control=0", "-timeout=0",
            f"-artifact_prefix={crashdir}/{file_stem(name)}-atheris-", "-print_final_stats=1"]
    if seconds != float("inf"):
        argv.append(f"-max_total_time={int(seconds)}")
    atheris.Setup(argv, one)
    atheris.Fuzz()
