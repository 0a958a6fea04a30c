"""The device I/O thread: calls run in submission order, off the event loop, and a
cancelled caller still waits for its call (the call owns guest memory)."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from devicemodel.virtio.iothread import IoThread


async def test_calls_run_in_order_on_one_other_thread() -> None:
    io = IoThread("test-io")
    seen: list[tuple[int, str]] = []

    def job(i: int) -> int:
        time.sleep(0.002 * (5 - i))  # earlier jobs are slower: order must still hold
        seen.append((i, threading.current_thread().name))
        return i * 10

    results: dict[int, int] = {}

    async def submit(i: int) -> None:
        results[i] = await io.run(job, i)

    async with trio.open_nursery() as n:
        for i in range(5):
            n.start_soon(submit, i)
            await trio.sleep(0)  # submission order = i
    io.close()
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"test-io"}
    assert results == {i: i * 10 for i in range(5)}


async def test_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    io = IoThread("test-io")

    def boom() -> None:
        raise OSError(5, "I/O error")

    with pytest.raises(OSError, match="I/O error"):
        await io.run(boom)
    assert await io.run(lambda: 7) == 7
    io.close()


async def test_cancelled_caller_waits_for_the_call_to_finish() -> None:
    io = IoThread("test-io")
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.2)
        finished.set()
        return "done"

    got: list[str] = []

    async def caller() -> None:
        got.append(await io.run(slow))

    with trio.move_on_after(0.01):
        await caller()
    assert finished.is_set(), "the cancelled caller returned before its call finished"
    assert got == ["done"]  # the result still arrives; the device checks cancellation after
    io.close()


async def test_close_finishes_queued_work_and_ends_the_thread() -> None:
    io = IoThread("test-io-close")
    assert await io.run(lambda: 1) == 1
    io.close()
    assert not any(t.name == "test-io-close" for t in threading.enumerate())
    io.close()  # twice is harmless
    assert await io.run(lambda: 2) == 2  # and it starts again on demand
    io.close()
