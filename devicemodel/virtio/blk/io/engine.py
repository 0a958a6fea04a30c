"""The block I/O engine interface: reads, writes, flushes, discards and write-zeroes on
guest-memory views, awaited for their result, whatever thread does the work.

A device (virtio-blk, a SATA disk) parses its own request format, checks the range with
``DiskImage.in_range`` and awaits one of these; an OSError is the host's I/O error for
that request. The implementations differ only in where the blocking call runs:

- :class:`ThreadIo` hands each call to a runner the device chooses, e.g. its bounded
  thread pool (many in flight) or its one ordered I/O thread (cheaper per call). The
  runner owns the reset rule: a call in a thread cannot be interrupted, so the caller
  waits for it, and a device reset drops its result.
- :class:`DirectIo` makes the call right here, for a data-plane thread that serves a
  whole ring with blocking I/O; its coroutines never suspend, so :func:`run_now` runs
  them from plain (non-async) code.
- The event loop's non-blocking fast path is nowait.py: it is tried first, outside this
  interface, and falls back to a ``ThreadIo``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from .image import DiskImage, Write

T = TypeVar("T")
#: ``await run(fn, *args)``: ``fn(*args)`` off the event loop, its result or exception.
Runner = Callable[..., Awaitable[Any]]


class BlockIo(Protocol):
    """What a device submits to an image (offsets and lengths in bytes, checked by the
    device; ``sync``: durable before the result, as in writethrough mode or FUA)."""

    async def read(self, views: list[memoryview], offset: int) -> None: ...

    async def write(self, views: list[memoryview], offset: int, sync: bool) -> None: ...

    async def write_batch(self, writes: Sequence[Write], sync: bool
                          ) -> tuple[list[bool], OSError | None]: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int, sync: bool) -> None: ...

    async def write_zeroes(self, offset: int, length: int, unmap: bool,
                           sync: bool) -> None: ...


class ThreadIo:
    """:class:`BlockIo` through ``run`` (a thread pool or an I/O thread)."""

    def __init__(self, image: DiskImage, run: Runner) -> None:
        self.image = image
        self.run = run

    async def read(self, views: list[memoryview], offset: int) -> None:
        await self.run(self.image.read, views, offset)

    async def write(self, views: list[memoryview], offset: int, sync: bool) -> None:
        await self.run(self.image.write, views, offset, sync)

    async def write_batch(self, writes: Sequence[Write], sync: bool
                          ) -> tuple[list[bool], OSError | None]:
        """Every write of a batch in one hand-off (see ``DiskImage.write_batch``)."""
        result: tuple[list[bool], OSError | None] = await self.run(
            self.image.write_batch, writes, sync)
        return result

    async def flush(self) -> None:
        await self.run(self.image.flush)

    async def discard(self, offset: int, length: int, sync: bool) -> None:
        await self.run(self.image.discard, offset, length, sync)

    async def write_zeroes(self, offset: int, length: int, unmap: bool, sync: bool) -> None:
        await self.run(self.image.write_zeroes, offset, length, unmap, sync)


class DirectIo:
    """:class:`BlockIo` on the calling thread (a data-plane thread): never suspends."""

    def __init__(self, image: DiskImage) -> None:
        self.image = image

    async def read(self, views: list[memoryview], offset: int) -> None:
        self.image.read(views, offset)

    async def write(self, views: list[memoryview], offset: int, sync: bool) -> None:
        self.image.write(views, offset, sync)

    async def write_batch(self, writes: Sequence[Write], sync: bool
                          ) -> tuple[list[bool], OSError | None]:
        return self.image.write_batch(writes, sync)

    async def flush(self) -> None:
        self.image.flush()

    async def discard(self, offset: int, length: int, sync: bool) -> None:
        self.image.discard(offset, length, sync)

    async def write_zeroes(self, offset: int, length: int, unmap: bool, sync: bool) -> None:
        self.image.write_zeroes(offset, length, unmap, sync)


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its I/O is a :class:`DirectIo`) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a request on a data-plane thread suspended")
