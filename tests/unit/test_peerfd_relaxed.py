"""peerfd.relax_guard: a data-plane thread's signals skip disarming the guard timer, and
must still never block for long, and the one late no-op signal must not break the
thread's own waits (Python restarts them)."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

from devicemodel import peerfd

EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE


def _on_thread(fn: Callable[[], object]) -> object:
    """Run ``fn`` on a fresh thread (relax_guard is per thread) and return its result."""
    out: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the test's thread
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the relaxed thread is stuck"
    if errors:
        raise errors[0]
    return out[0]


def test_relaxed_signals_are_delivered_and_a_full_fd_is_pending() -> None:
    e = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        def run() -> list[peerfd.Sent]:
            peerfd.relax_guard()
            sent = [peerfd.signal_fd(e) for _ in range(1000)]
            os.eventfd_write(e, EVENTFD_MAX - 1000)
            return [*sent[-1:], peerfd.signal_fd(e)]
        assert _on_thread(run) == [peerfd.Sent.SENT, peerfd.Sent.PENDING]
        assert os.eventfd_read(e) == EVENTFD_MAX
    finally:
        os.close(e)


def test_a_relaxed_write_the_peer_made_blocking_still_ends() -> None:
    """The peer clears O_NONBLOCK of a saturated eventfd: every write ends, BLOCKED, within
    the guard's bound, whether the timer was just armed, still armed or long expired."""
    e = os.eventfd(0)
    os.eventfd_write(e, EVENTFD_MAX)
    try:
        def run() -> list[tuple[peerfd.Sent, float]]:
            peerfd.relax_guard()
            out = []
            for pause in (0, 0, peerfd.WRITE_LIMIT_S * 0.6, peerfd.WRITE_LIMIT_S * 3):
                time.sleep(pause)
                t0 = time.monotonic()
                out.append((peerfd.signal_fd(e), time.monotonic() - t0))
            return out
        fired = peerfd.guard_fired()
        results = _on_thread(run)
        assert [s for s, _ in results] == [peerfd.Sent.BLOCKED] * 4
        assert max(t for _, t in results) < peerfd.WRITE_LIMIT_S * 4
        assert peerfd.guard_fired() == fired + 4
    finally:
        os.close(e)


def test_the_late_timer_signal_does_not_break_a_wait() -> None:
    """After its last signal the thread gets one no-op timer signal; a poll it sits in
    then restarts instead of failing or returning early."""
    e = os.eventfd(0, os.EFD_NONBLOCK)
    quiet = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        def run() -> tuple[list[tuple[int, int]], float]:
            peerfd.relax_guard()
            peerfd.signal_fd(e)  # arms the timer, which fires in the poll below
            poller = select.poll()
            poller.register(quiet, select.POLLIN)
            t0 = time.monotonic()
            events = poller.poll(int(peerfd.WRITE_LIMIT_S * 4 * 1000))
            return events, time.monotonic() - t0
        events, waited = _on_thread(run)
        assert events == []
        assert waited >= peerfd.WRITE_LIMIT_S * 3.5  # not cut short by the signal
    finally:
        os.close(e)
        os.close(quiet)


def test_other_threads_keep_the_strict_guard() -> None:
    """relax_guard is per thread: a thread that did not ask still disarms after each write
    (no late signal can reach it)."""
    e = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        _on_thread(peerfd.relax_guard)

        def run() -> bool:
            peerfd.signal_fd(e)
            return getattr(peerfd._GUARD.local, "relaxed", None) is None
        assert _on_thread(run)
    finally:
        os.close(e)
