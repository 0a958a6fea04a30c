"""The loop gate: a lock the trio loop thread holds whenever it runs, and lets go of
only while it sleeps in its I/O wait.

Device state belongs to the event loop: handlers, buses and tasks all run on its thread,
so they need no locks among themselves. A request thread (a KVM vCPU thread, the ACRN
waiter thread) that wants an answer at once can still run a handler itself: it takes the
gate without waiting, which succeeds only while the loop sleeps, and for that moment it
*is* the loop as far as device state is concerned. If the loop is busy the thread hands
the request over as before, so nothing ever waits for the gate but the loop itself
(which waits at most for the one request a thread is serving).

What may run behind the gate: handlers that never call trio directly (a trio call from
another thread corrupts the run) and never block. They mark themselves ``vcpu_safe``
(see ``bus.py``); everything else is served on the loop. A handler that must wake a task
(a UART's writer, the RTC's timer) does it with ``on_loop(fn)``: at once on the loop
thread, else queued for the loop (trio's ``run_sync_soon``), which runs it when it wakes.

The gate is a trio instrument (``before_io_wait`` / ``after_io_wait``): trio runs every
task between those two hooks, so no task runs while a thread holds the gate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import trio

#: (thread id, token) of the loop that installed a gate last: where ``on_loop`` sends
_loop: tuple[int, trio.lowlevel.TrioToken] | None = None


def on_loop(fn: Callable[[], object]) -> None:
    """Run ``fn`` (a trio call: ``event.set``) on the event loop: now when called there
    (or when no gated loop runs), else as soon as the loop wakes (queued once however
    often it is asked for before then)."""
    call_on(_loop, fn)


def call_on(loop: tuple[int, trio.lowlevel.TrioToken] | None, fn: Callable[[], object]) -> None:
    """Run ``fn`` on ``loop`` (its thread id and token): now when called on that thread or
    when there is no loop, else queued once for its next wake."""
    if loop is None or threading.get_ident() == loop[0]:
        fn()
        return
    try:
        loop[1].run_sync_soon(fn, idempotent=True)
    except trio.RunFinishedError:
        pass  # that loop has ended: nobody is left to wake


class LoopGate:
    """Held by the loop thread while it runs; ``try_enter`` from any other thread.

    Closed (not installed, or removed) it stays held, so ``try_enter`` is one
    non-blocking lock acquire on the hot path and fails whenever no loop gates it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # closed
        self._open = False
        #: a request thread's side: ``try_enter()`` is True when the loop sleeps and stays
        #: asleep until ``leave()``; False: it runs now (or nothing gates), hand the work
        #: over instead. (Bound C methods: one non-blocking acquire on the hot path.)
        self.try_enter: Callable[[], bool] = partial(self._lock.acquire, False)
        self.leave: Callable[[], None] = self._lock.release

    # --- the loop's side (a trio instrument) ----------------------------------------------
    def install(self) -> None:
        """Start gating (call on the loop thread, inside trio.run): the loop holds the
        gate from now on except while it waits for I/O."""
        global _loop
        if not self._open:
            try:
                trio.lowlevel.add_instrument(self)
            except RuntimeError:
                return  # not inside trio.run (a test stepping serve()): it stays closed
            self._open = True
            _loop = (threading.get_ident(), trio.lowlevel.current_trio_token())

    def remove(self) -> None:
        """Stop gating (call on the loop thread, which holds the gate while it runs): the
        gate stays held, so ``try_enter`` fails from now on."""
        if self._open:
            self._open = False
            try:
                trio.lowlevel.remove_instrument(self)
            except (KeyError, RuntimeError):
                pass  # trio dropped it already (it does so if a hook ever raises)

    def before_io_wait(self, timeout: float) -> None:
        self._lock.release()

    def after_io_wait(self, timeout: float) -> None:
        self._lock.acquire()


__all__ = ["LoopGate"]
