"""Settings shared by every fuzz target: how many examples, and a count of what ran.

Short mode (CI): each test runs ``short`` examples, a few seconds at most. Long mode:
``ACRN_PYDM_FUZZ_LONG=1`` runs 1,000,000 per test, ``ACRN_PYDM_FUZZ_EXAMPLES=N`` runs N.
Each target bumps ``COUNTS[name]`` once per input, so the runner can report how many
inputs really ran (hypothesis stops early when it has exhausted a small input space).
The fast long mode (``_engine.py``) feeds the same tests raw bytes instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator

from hypothesis import HealthCheck, settings

from . import _engine

LONG_EXAMPLES = 1_000_000
COUNTS: Counter[str] = Counter()


def examples(short: int) -> int:
    n = os.environ.get("ACRN_PYDM_FUZZ_EXAMPLES")
    if n:
        return int(n)
    if os.environ.get("ACRN_PYDM_FUZZ_LONG"):
        return LONG_EXAMPLES
    return short


def is_long() -> bool:
    return examples(0) > 0


def fuzz_settings(short: int = 50) -> settings:
    """Hypothesis settings for one target; no example database in long mode (it would
    grow without bound), and no health checks (targets build VMs in fixtures)."""
    return settings(
        max_examples=examples(short),
        deadline=None,
        database=None if is_long() else settings.default.database,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def count(name: str) -> None:
    COUNTS[name] += 1
    if COUNTS[name] % 1000 == 0:
        _save()


def _save() -> None:
    """Long runs: keep the counts in ``$ACRN_PYDM_FUZZ_COUNTS`` too, so a run stopped
    early still says how far it got."""
    path = os.environ.get("ACRN_PYDM_FUZZ_COUNTS")
    if path:
        with open(path, "w") as f:
            f.write(" ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())) + "\n")
            f.writelines(line + "\n" for line in _engine.counts_lines())


def drive(one) -> None:  # noqa: ANN001 - a hypothesis test
    """Run ``one``, a @given test defined inside a test that built a running VM: by
    hypothesis (short mode, hypothesis long mode), or fed by the fast engine."""
    if _engine.active():
        try:
            _engine.run(_engine.current_nodeid(),
                        _engine.fuzz_target(one, {}, show=_engine.repro_file() is not None))
            return
        except _engine.Unfeedable as e:
            print(f"fuzz engine: {e}", file=sys.__stderr__, flush=True)
    one()


class _FormatOnly(logging.Handler):
    """Formats each record (a broken log call still fails the input) and keeps nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


@contextlib.contextmanager
def logs_formatted_and_dropped() -> Iterator[None]:
    """Long runs: pytest's log capture would keep every warning of a million inputs
    (about 300 MB per million for the monitor targets, and a tenth of the CPU); the
    device model's records stop at a handler of our own instead. Handlers a test puts on
    a child logger (to collect tracebacks) still see them."""
    logger = logging.getLogger("devicemodel")
    handler = _FormatOnly()
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.propagate = propagate
        logger.removeHandler(handler)


def long_run() -> bool:
    """A campaign (fast engine or hypothesis long mode), not CI's short mode or a repro."""
    return _engine.engine() is not None or (is_long() and _engine.repro_file() is None)
