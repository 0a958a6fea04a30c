"""Print how many inputs every fuzz target ran (visible with -s or in the summary), and in
the fast long mode (``_engine.py``) run each @given test through its ``fuzz_one_input``."""

from __future__ import annotations

import sys

import pytest

from . import _engine
from ._common import COUNTS, logs_formatted_and_dropped, long_run


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest hook
    if COUNTS:
        terminalreporter.write_line("fuzz inputs: " + ", ".join(
            f"{k}={v}" for k, v in sorted(COUNTS.items())))
    for line in _engine.counts_lines():
        terminalreporter.write_line("fuzz engine: " + line)


@pytest.fixture(autouse=True, scope="module")
def _long_runs_keep_no_log_records():  # noqa: ANN202 - a fixture
    if long_run():
        with logs_formatted_and_dropped():
            yield
    else:
        yield


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Fast long mode: feed the test bytes instead of letting hypothesis run it. Its
    fixtures come from pytest as usual; tests without @given (those that build a VM and
    call ``drive(one)``) run normally."""
    test = pyfuncitem.obj
    if not _engine.active() or not getattr(test, "is_hypothesis_test", False):
        return None
    given = test.hypothesis._given_kwargs
    fixtures = {k: pyfuncitem.funcargs[k] for k in pyfuncitem._fixtureinfo.argnames
                if k not in given}
    try:
        _engine.run(pyfuncitem.nodeid, _engine.fuzz_target(
            test, fixtures, show=_engine.repro_file() is not None))
    except _engine.Unfeedable as e:
        print(f"fuzz engine: {e}", file=sys.__stderr__, flush=True)
        return None  # pytest calls the test: hypothesis draws its budget of examples
    return True
