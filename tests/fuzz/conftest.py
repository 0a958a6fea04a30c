"""Print how many inputs every fuzz target ran (visible with -s or in the summary)."""

from __future__ import annotations

from ._common import COUNTS


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest hook
    if COUNTS:
        terminalreporter.write_line("fuzz inputs: " + ", ".join(
            f"{k}={v}" for k, v in sorted(COUNTS.items())))
