"""Monitor clients that hold seats without using them (issue 18): silent ones, ones that
trickle bytes that never make a request, ones that send requests and never read a reply,
ones that read slowly, ones that hang up at once, and honest ones arriving at any moment.

The monitor's own connection handling (``Monitor._client``: seats, idle deadline, reply
timeout) runs on lockstep streams (a send completes only as the other side reads, so
"never reads" is exact), many clients at once, under a mock clock (the idle timeout
takes no wall time). Each input is one 64-bit seed expanded into the schedule.

Checks: every honest client (which retries every 50 ms while it is told "too many
clients") gets every answer, in strict JSON, no later than 2 idle timeouts after the
last hostile client arrived (a hostile client can hold a seat for one idle timeout
silent, then one more with a reply it never reads); the monitor hangs up on every
hostile client within 2 idle timeouts of its arrival (a seat is free again); every
seat is free at the end; nothing crashes.
"""

from __future__ import annotations

import json
import random
import types

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.config import parse_args
from devicemodel.monitor import MAX_CLIENTS, Monitor

from ._common import count, fuzz_settings

IDLE = 1.0
SLACK = 0.5
KINDS = ("silent", "trickle", "deaf", "slow-reader", "hangup", "partial-then-silent",
         "honest")


def _stub_vm() -> object:
    hv = types.SimpleNamespace(name="stub", pause_vm=lambda: None, start_vm=lambda: None)
    cfg = parse_args(["-m", "128M", "vm"])
    return types.SimpleNamespace(
        config=cfg, hv=hv, state="running", vcpu_num=1, devices={}, server=None,
        irq=types.SimpleNamespace(msi_count=0), lifecycle=None, power_button=None,
        guest_power=None, poweroff=lambda: None,
        device=lambda slot: (_ for _ in ()).throw(KeyError(slot)))


def schedule(seed: int) -> list[tuple[float, str, int]]:
    """(arrival time, kind, a per-client seed): up to 14 clients, at least one honest."""
    rnd = random.Random(seed)
    n = rnd.randint(1, 14)
    clients = [(round(rnd.random() * 3 * IDLE, 3), rnd.choice(KINDS), rnd.getrandbits(32))
               for _ in range(n)]
    if not any(k == "honest" for _, k, _ in clients):
        clients.append((round(rnd.random() * 3 * IDLE, 3), "honest", rnd.getrandbits(32)))
    return sorted(clients)


def _strict(line: bytes) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"reply is not strict JSON ({name}): {line!r}")

    reply = json.loads(line, parse_constant=refuse)
    assert isinstance(reply, dict) and reply.get("ok") in (True, False), reply
    return reply


class _Reader:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""

    async def line(self) -> bytes | None:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(4096)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line


async def _honest(stream: trio.abc.Stream, rnd: random.Random, connect, done: list) -> None:
    """Asks for status (and help) a few times; reconnects when told there is no seat."""
    arrived = trio.current_time()
    asked = 0
    want = rnd.randint(1, 3)
    while asked < want:
        r = _Reader(stream)
        try:
            await stream.send_all(json.dumps({"cmd": rnd.choice(["status", "help"]),
                                              "id": asked}).encode() + b"\n")
            line = await r.line()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            line = None
        if line is not None and b"too many clients" not in line:
            reply = _strict(line)
            assert reply["ok"] is True and reply["id"] == asked, reply
            asked += 1
            continue
        if line is not None:
            _strict(line)
        await stream.aclose()
        await trio.sleep(0.05)
        stream = await connect()
    done.append((arrived, trio.current_time()))
    await stream.aclose()


async def _hostile(kind: str, stream: trio.abc.Stream, rnd: random.Random) -> None:
    """Plays ``kind`` until the monitor hangs up (or the session ends)."""
    try:
        if kind == "hangup":
            await stream.aclose()
        elif kind == "silent":
            await _wait_closed(stream)
        elif kind == "partial-then-silent":
            await stream.send_all(b'{"cmd": "sta')
            await _wait_closed(stream)
        elif kind == "trickle":
            while True:
                await stream.send_all(bytes([rnd.choice(b' {"x')]))
                await trio.sleep(rnd.choice([0.01, 0.1, 0.3]))
        elif kind == "deaf":  # requests, never a read: its first reply never goes out
            while True:
                await stream.send_all(b'{"cmd": "help"}\n')
                await trio.sleep(rnd.choice([0.0, 0.05, 0.5]))
        elif kind == "slow-reader":  # reads a byte now and then
            await stream.send_all(b'{"cmd": "help"}\n' * rnd.randint(1, 4))
            while await stream.receive_some(1):
                await trio.sleep(rnd.choice([0.01, 0.2, 0.6]))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _wait_closed(stream: trio.abc.Stream) -> None:
    r = _Reader(stream)
    while (line := await r.line()) is not None:
        _strict(line)


async def _session(plan: list[tuple[float, str, int]]) -> None:
    mon = Monitor(_stub_vm(), "/nonexistent", idle_timeout=IDLE)  # type: ignore[arg-type]
    honest_done: list[tuple[float, float]] = []
    hostile: list[tuple[float, list[float]]] = []
    async with trio.open_nursery() as nursery:

        async def serve(theirs: trio.abc.Stream, ended: list[float]) -> None:
            await mon._client(theirs)
            ended.append(trio.current_time())  # the seat is free again

        async def connect(ended: list[float] | None = None) -> trio.abc.Stream:
            ours, theirs = trio.testing.lockstep_stream_pair()
            nursery.start_soon(serve, theirs, [] if ended is None else ended)
            return ours

        honest = 0
        for at, kind, seed in plan:
            await trio.sleep_until(at)
            rnd = random.Random(seed)
            if kind == "honest":
                honest += 1
                nursery.start_soon(_honest, await connect(), rnd, connect, honest_done)
            else:
                ended: list[float] = []
                hostile.append((trio.current_time(), ended))
                nursery.start_soon(_hostile, kind, await connect(ended), rnd)
        last_hostile = max((t for t, _ in hostile), default=0.0)
        with trio.fail_after(last_hostile + 2 * IDLE + 10):
            while len(honest_done) < honest or any(not c for _, c in hostile):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    limit = 2 * IDLE + SLACK
    for arrived, done in honest_done:
        assert done - max(arrived, last_hostile) <= limit, (plan, arrived, done)
    for t, closed in hostile:
        assert closed[0] - t <= limit, (plan, t, closed)
    assert mon.clients == 0


@fuzz_settings(60)
@given(seed=st.integers(0, 2**64 - 1))
def test_clients(seed):
    count("monitor_clients.sessions")
    plan = schedule(seed)
    trio.run(_session, plan, clock=trio.testing.MockClock(autojump_threshold=0))


def test_eight_silent_clients_cannot_lock_out_an_honest_one():
    """The issue's case, exactly: eight seats held by silent clients, then an honest one."""
    plan = [(0.0, "silent", i) for i in range(MAX_CLIENTS)] + [(0.1, "honest", 1)]
    trio.run(_session, plan, clock=trio.testing.MockClock(autojump_threshold=0))
