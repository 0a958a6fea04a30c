"""The guest harness's verdicts: a failed or missing step fails with the serial log."""

from __future__ import annotations

import pytest

from devicemodel.guestkit.qemu import MARK, GuestRun

LOG = f"""booting...
{MARK} BOOTED
{MARK} PASS blk
{MARK} FAIL net-ping: no reply
{MARK} INFO rng 00ff
{MARK} DONE rc=0
"""


def test_markers_are_parsed() -> None:
    run = GuestRun.parse(LOG, 0, False)
    assert run.passed == {"blk"} and run.failed == {"net-ping": "no reply"}
    assert run.info == ["rng 00ff"] and run.done
    run.check("blk")


@pytest.mark.parametrize("step,why", [("net-ping", "net-ping: no reply"),
                                      ("rng", "rng: no result")])
def test_failed_or_missing_step_carries_the_serial_log(step: str, why: str) -> None:
    run = GuestRun.parse(LOG, 0, False)
    with pytest.raises(AssertionError) as e:
        run.check("blk", step)
    assert why in str(e.value) and "booting..." in str(e.value)


def test_timeout_is_reported() -> None:
    run = GuestRun.parse("stuck in the bootloader\n", None, True)
    assert not run.done
    with pytest.raises(AssertionError, match="timed out"):
        run.check("blk")
