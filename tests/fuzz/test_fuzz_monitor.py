"""The command monitor's JSON: whole request lines, and raw byte streams cut anywhere.

Every line gets exactly one reply that is a strict JSON object (no NaN or Infinity, even
for a request that carried one); malformed input gets
``"ok": false`` with a message (or acrn-dm's ``{"ack": -1}``); no command reaches the
monitor's catch-all for crashing commands (logged with a traceback: that is a bug); the
connection loop never raises and never hangs. The VM behind it is a sim VM with a
virtio-blk device (for ``blkrescan``); whole lines go to ``handle_line``, so ``poweroff``'s
action is not run, while the connection loop runs it (the rest of the stream then meets a
stopped VM).

Inputs come from one seed each, expanded in plain Python (``request_lines``,
``byte_stream``) into what the strategies drew, and run on one VM per process
(``VmHost``: a running VM in a trio loop on its own thread, brought back to a fresh VM's
state between inputs), not a VM built and a trio.run per input.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import random
import struct
import tempfile
import threading
import traceback

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.monitor import Monitor
from devicemodel.vm import Vm, running

from ._common import count, fuzz_settings

_TMP = tempfile.mkdtemp(prefix="acrn-fuzz-mon-")
IMAGE = os.path.join(_TMP, "disk.img")
OTHER = os.path.join(_TMP, "other.img")
for _p in (IMAGE, OTHER):
    with open(_p, "wb") as _f:
        _f.truncate(1 << 20)

ARGS = ["-m", "128M", "-s", "0:0,hostbridge", "-s", f"3,virtio-blk,{IMAGE}", "-s", "4,dummy",
        "--shutdown_timeout", "0", "vm1"]

CMDS = ["help", "status", "pause", "resume", "poweroff", "reset", "blkrescan", "devices", "nope",
        ""]
ACRN_COMMANDS = ["destroy", "blkrescan", "x"]
SPECIAL_STRINGS = ["3", "4", "0:3:0", "99", "", IMAGE, OTHER, "/nonexistent", _TMP, "3," + OTHER,
                   "status", "blkrescan", "destroy"]
FIXED_LINES = [b"{", b"}", b"[]", b"null", b'"x"', b"1e999", b"[" * 3000 + b"]" * 3000,
               b'{"cmd": "status"', b"\xff\xfe", b'{"cmd":"status"}{"cmd":"help"}']
KEYS = ("arguments", "id", "slot", "path", "force", "x")
_PUNCT = '"\\/{}[]:,\n\t '
_FLOATS = [0.0, -0.0, math.inf, -math.inf, 1.0, -1.0, 0.5, 1.5, 5e-324, 2.2250738585072014e-308,
           1.7976931348623157e308, 1e16, 3.0, 2.0**53, -(2.0**63)]
_EDGES = [e for k in (7, 8, 15, 16, 31, 32, 53, 63, 64, 69, 70) for e in (2**k - 1, 2**k)]

# What the strategies drew, drawn in plain Python from one seed: hypothesis decoding the
# nested st.recursive/st.one_of values cost several milliseconds per input, more than the
# monitor itself. Same shapes and biases: the special strings, the command names, keys
# present or not, values nested up to eight leaves, raw bytes, the fixed malformed lines.


#: the common characters, weighted: printable ASCII, JSON's punctuation, control characters
_COMMON = [chr(c) for c in range(0x20, 0x7F)] + list(_PUNCT) * 6 + \
    [chr(c) for c in range(0x20)] + ["\x7f", "\x00"] * 4


def _rare(rnd: random.Random) -> str:
    """Beyond ASCII: any BMP character, any astral one, and lone surrogates (a client
    can send ``"\\ud800"``, which json.loads accepts; st.text never draws them)."""
    r = rnd.random()
    if r < 0.5:
        c = rnd.randrange(0x80, 0x10000)
        return chr(c) if not 0xD800 <= c < 0xE000 else "\ufffd"
    if r < 0.85:
        return chr(rnd.randrange(0x10000, 0x110000))
    return chr(rnd.randrange(0xD800, 0xE000))


def _text(rnd: random.Random, max_size: int) -> str:
    """st.text(max_size=...): mostly ASCII, every other string with a rarer character."""
    r = rnd.random()
    n = 0 if r < 0.2 else 1 if r < 0.3 else max_size if r < 0.4 else \
        int(rnd.random() * (max_size + 1))
    chars = rnd.choices(_COMMON, k=n)
    r = rnd.random()
    if n and r < 0.5:  # one rare character, or up to all of them
        for _ in range(1 if r < 0.35 else n):
            chars[int(rnd.random() * n)] = _rare(rnd)
    return "".join(chars)


def _int(rnd: random.Random) -> int:
    """st.integers(-2**70, 2**70): small values, powers of two and their neighbours, any."""
    r = rnd.random()
    if r < 0.35:
        return rnd.randint(-10, 10)
    if r < 0.6:
        return rnd.choice(_EDGES) * rnd.choice([1, -1])
    if r < 0.8:
        return rnd.getrandbits(rnd.choice([8, 16, 32, 64])) * rnd.choice([1, -1])
    return rnd.randint(-(2**70), 2**70)


def _float(rnd: random.Random) -> float:
    """st.floats(allow_nan=False): the special values, short decimals, any bit pattern."""
    r = rnd.random()
    if r < 0.4:
        return rnd.choice(_FLOATS)
    if r < 0.7:
        return round(rnd.uniform(-1000, 1000), rnd.randrange(4))
    x = struct.unpack("<d", rnd.randbytes(8))[0]
    return x if x == x else math.inf


def _scalar(rnd: random.Random) -> object:
    which = rnd.randrange(6)
    if which == 0:
        return None
    if which == 1:
        return rnd.random() < 0.5
    if which == 2:
        return _int(rnd)
    if which == 3:
        return _float(rnd)
    if which == 4:
        return _text(rnd, 12)
    return rnd.choice(SPECIAL_STRINGS)


def _value(rnd: random.Random, leaves: list[int] | None = None) -> object:
    """st.recursive(scalars, lists/dicts of up to 3, max_leaves=8)."""
    leaves = [8] if leaves is None else leaves
    if leaves[0] <= 1 or rnd.random() < 0.5:
        leaves[0] -= 1
        return _scalar(rnd)
    n = rnd.randrange(4)
    if rnd.random() < 0.5:
        return [_value(rnd, leaves) for _ in range(n) if leaves[0] > 0]
    return {_text(rnd, 6): _value(rnd, leaves) for _ in range(n) if leaves[0] > 0}


def _request(rnd: random.Random) -> dict:
    """st.fixed_dictionaries with every key optional: "cmd" a command name or any value,
    "command" an acrn-dm command name or any value, the other keys any value."""
    req: dict = {}
    if rnd.random() < 0.5:
        req["cmd"] = rnd.choice(CMDS) if rnd.random() < 0.5 else _value(rnd)
    if rnd.random() < 0.5:
        req["command"] = rnd.choice(ACRN_COMMANDS) if rnd.random() < 0.5 else _value(rnd)
    for key in KEYS:
        if rnd.random() < 0.5:
            req[key] = _value(rnd)
    return req


def _line(rnd: random.Random) -> bytes:
    """A JSON request, up to 64 random bytes, or one of the fixed malformed lines."""
    which = rnd.randrange(3)
    if which == 0:
        return json.dumps(_request(rnd)).encode()
    if which == 1:
        return rnd.randbytes(rnd.choice([0, rnd.randint(0, 64), rnd.randint(0, 64), 64]))
    return rnd.choice(FIXED_LINES)


def request_lines(seed: int) -> list[bytes]:
    """One to eight lines."""
    rnd = random.Random(seed)
    return [_line(rnd) for _ in range(rnd.randint(1, 8))]


def byte_stream(seed: int) -> tuple[list[bytes], bool]:
    """One to ten chunks (a line, up to 8 random bytes, a newline, 5000 bytes with no
    newline), and whether each chunk is followed by a newline."""
    rnd = random.Random(seed)
    chunks = []
    for _ in range(rnd.randint(1, 10)):
        which = rnd.randrange(4)
        if which == 0:
            chunks.append(_line(rnd))
        elif which == 1:
            chunks.append(rnd.randbytes(rnd.randint(0, 8)))
        elif which == 2:
            chunks.append(b"\n")
        else:
            chunks.append(b"x" * 5000)
    return chunks, rnd.random() < 0.5


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append("".join(traceback.format_exception(*record.exc_info)))


class VmHost:
    """A running sim VM in a trio loop on a thread of its own, serving input after input.

    Building and starting a VM (and a trio.run) per input cost ten times what the
    monitor does with it. Each input instead gets a new Monitor with a new Lifecycle
    (so paused, shutdown_requested and their events start fresh) and its own timeout
    (and lifecycle task, see ``run``), and, afterwards, the VM back to plain running: a
    reset the input requested is let finish, a pause is resumed, and a VM the input
    powered off is replaced by a new one before the next input.
    ``test_reused_vm_answers_as_a_fresh_one`` checks the equivalence."""

    def __init__(self) -> None:
        self.tracebacks = _Tracebacks()
        self.vm: Vm | None = None
        # work goes in through a queue and an eventfd the loop's own task waits on: half
        # the cost of trio.from_thread.run, which spawns a system task per call
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._ended: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fuzz-monitor-vm")
        self._thread.start()
        self._ready.wait()

    def _loop(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # a VM task crashed: the caller reports it
            self._ended = e
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            while True:
                await trio.lowlevel.wait_readable(self._wake)
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    continue
                while not self._work.empty():
                    afn = self._work.get_nowait()
                    if afn is None:
                        nursery.cancel_scope.cancel()
                        return
                    try:
                        await afn()
                    except trio.Cancelled:  # a VM task crashed: the loop ends
                        self._results.put(RuntimeError("the VM's trio loop was cancelled"))
                        raise
                    except BaseException as e:  # noqa: BLE001 - goes to the caller
                        self._results.put(e)
                    else:
                        self._results.put(None)

    def _call(self, afn) -> None:  # noqa: ANN001 - async () -> None
        self._work.put(afn)
        os.eventfd_write(self._wake, 1)
        while True:
            try:
                error = self._results.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the VM's trio loop ended") from self._ended
        if error is not None:
            raise error

    async def _vm_task(self, done: trio.Event, *,
                       task_status: trio.TaskStatus[Vm] = trio.TASK_STATUS_IGNORED) -> None:
        async with running(ARGS, hypervisor=SimHypervisor()) as vm:
            task_status.started(vm)
            await done.wait()

    async def _fresh_vm(self) -> Vm:
        if self.vm is not None:
            if self.vm.state == "running":
                return self.vm
            with trio.fail_after(30):
                await self.vm.wait_stopped()
            self._done.set()
        self._done = trio.Event()
        self.vm = await self._nursery.start(self._vm_task, self._done)
        return self.vm

    async def _one(self, body, actions: bool) -> None:  # noqa: ANN001 - see run
        vm = await self._fresh_vm()
        vm.lifecycle = None
        with trio.fail_after(30):
            mon = Monitor(vm, os.path.join(_TMP, "unused.sock"))
            assert mon._owns_lifecycle
            if actions:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(mon.lifecycle.run)
                    await body(mon)
                    nursery.cancel_scope.cancel()
            else:
                await body(mon)
                # what the lifecycle task would have acted on: nothing
                assert mon.lifecycle.shutdown_requested is None
            await self._settle(vm, mon)

    async def _settle(self, vm: Vm, mon: Monitor) -> None:
        """The VM as the next input expects it: running, not paused, no reset pending."""
        power = vm.guest_power
        assert power is not None
        while power.resetting and vm.state == "running":
            await trio.sleep(0)
        if vm.state != "running":
            return  # powered off: _fresh_vm replaces it
        if mon.lifecycle.paused:
            mon.lifecycle.resume()
        for record in ("calls", "irqline_events"):  # the sim's logs: bounded memory
            getattr(vm.hv, record).clear()

    def run(self, body, *, actions: bool = True) -> None:  # noqa: ANN001 - async (Monitor)
        """Run ``body(monitor)`` on the VM; no command may have crashed. ``actions``: the
        body runs the actions replies carry (the connection loop does), so the
        lifecycle task that carries out a power-off runs beside it; without, nothing
        can ask it for anything, and it is not started (a task costs a sixth of an
        input)."""
        self.tracebacks.seen.clear()
        self._call(lambda: self._one(body, actions))
        assert not self.tracebacks.seen, "a monitor command crashed:\n" + "".join(
            self.tracebacks.seen)

    def close(self) -> None:
        self._work.put(None)
        os.eventfd_write(self._wake, 1)
        self._thread.join(30)
        os.close(self._wake)


@pytest.fixture(scope="module")
def vm_host():
    mlog = logging.getLogger("devicemodel.monitor")
    host = VmHost()
    mlog.addHandler(host.tracebacks)
    try:
        yield host
    finally:
        mlog.removeHandler(host.tracebacks)
        host.close()


def _check_reply(reply: dict) -> None:
    assert isinstance(reply, dict)
    if "ack" in reply:
        assert reply["ack"] in (0, -1)
    else:
        assert reply["ok"] in (True, False)
        if not reply["ok"]:
            assert isinstance(reply["error"], str) and reply["error"]
    json.dumps({k: v for k, v in reply.items() if not k.startswith("_")}, allow_nan=False)


async def _lines_body(mon: Monitor, reqs: list[bytes]) -> None:
    for line in reqs:
        _check_reply(await mon.handle_line(line))


@fuzz_settings(40)
@given(seed=st.integers(0, 2**64 - 1))
def test_request_lines(vm_host, seed):
    """``request_lines(seed)``, each line through ``handle_line``: one good reply each."""
    count("monitor.lines")
    reqs = request_lines(seed)
    vm_host.run(lambda mon: _lines_body(mon, reqs), actions=False)


def _not_json(name: str) -> None:
    raise AssertionError(f"a reply carries {name}, which is not JSON")


async def _stream_body(mon: Monitor, chunks: list[bytes], newline: bool) -> list[dict]:
    ours, theirs = trio.testing.memory_stream_pair()

    async def serve() -> None:
        await mon._lines(ours)  # returns at EOF
        await ours.aclose()

    data = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        for c in chunks:
            await theirs.send_all(c + (b"\n" if newline else b""))
        await theirs.send_stream.aclose()
        while got := await theirs.receive_some(65536):
            data += got
    replies = []
    for line in data.split(b"\n"):
        if line:
            replies.append(json.loads(line, parse_constant=_not_json))
            _check_reply(replies[-1])
    return replies


@fuzz_settings(30)
@given(seed=st.integers(0, 2**64 - 1))
def test_byte_stream(vm_host, seed):
    """``byte_stream(seed)`` sent over a stream to the connection loop, which runs the
    commands' actions too (poweroff and destroy stop the VM: the rest of the stream then
    meets a stopped VM, and the next input a new one)."""
    count("monitor.stream")
    chunks, newline = byte_stream(seed)
    vm_host.run(lambda mon: _stream_body(mon, chunks, newline))


def _answers(replies: list[dict]) -> list[dict]:
    """Replies without what differs between any two VMs (the uptime, the actions)."""
    def clean(x: object) -> object:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in ("uptime_s", "_after")}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return [clean(r) for r in replies]  # type: ignore[misc]


def _on_fresh_vm(reqs: list[bytes]) -> list[dict]:
    """The original harness: a VM built and run for this one input."""
    out: list[dict] = []

    async def main() -> None:
        with trio.fail_after(30):
            async with running(ARGS, hypervisor=SimHypervisor()) as vm:
                mon = Monitor(vm, os.path.join(_TMP, "unused.sock"))
                async with trio.open_nursery() as nursery:
                    if mon._owns_lifecycle:
                        nursery.start_soon(mon.lifecycle.run)
                    out.extend([await mon.handle_line(line) for line in reqs])
                    nursery.cancel_scope.cancel()

    trio.run(main)
    return out


def _on(vm_host: VmHost, reqs: list[bytes]) -> list[dict]:
    out: list[dict] = []

    async def body(mon: Monitor) -> None:
        out.extend([await mon.handle_line(line) for line in reqs])

    vm_host.run(body)
    return out


def test_reused_vm_answers_as_a_fresh_one(vm_host):
    """Whatever an input did to the VM (paused it, asked for a reset, powered it off
    through the connection loop), the next input gets the answers a fresh VM gives."""
    status, pause = b'{"cmd": "status"}', b'{"cmd": "pause"}'
    probes = [[status, b'{"cmd": "resume"}', pause, b'{"cmd": "reset"}', b'{"cmd": "poweroff"}'],
              [b'{"cmd": "reset"}', status, b'{"command": "destroy"}', status],
              *(request_lines(seed) for seed in range(8))]
    befores: list[tuple[list[bytes], bool]] = [
        ([pause, status], False), ([b'{"cmd": "reset"}', pause], False),
        ([b'{"cmd": "poweroff"}', status], True), ([b'{"command": "destroy"}'], True),
        ([b'{"cmd": "reset"}', status, b'{"cmd": "reset"}'], True)]
    for i, probe in enumerate(probes):
        before, stream = befores[i % len(befores)]
        if stream:
            vm_host.run(lambda mon, before=before: _stream_body(mon, before, True))
        else:
            _on(vm_host, before)
        assert _answers(_on(vm_host, probe)) == _answers(_on_fresh_vm(probe)), (before, probe)
        assert vm_host.vm is not None and vm_host.vm.hv.state == "running"  # not paused
    status_reply = _on(vm_host, [status])[0]
    assert status_reply["result"]["state"] == "running"
