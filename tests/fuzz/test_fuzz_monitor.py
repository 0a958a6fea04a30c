"""The command monitor's JSON: whole request lines, and raw byte streams cut anywhere.

Every line gets exactly one reply that is a JSON object; malformed input gets
``"ok": false`` with a message (or acrn-dm's ``{"ack": -1}``); no command reaches the
monitor's catch-all for crashing commands (logged with a traceback: that is a bug); the
connection loop never raises and never hangs. The VM behind it is a sim VM with a
virtio-blk device (for ``blkrescan``); ``poweroff``'s action is not run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import traceback

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from devicemodel.hsm.sim import SimHypervisor
from devicemodel.monitor import Monitor
from devicemodel.vm import running

from ._common import count, fuzz_settings

_TMP = tempfile.mkdtemp(prefix="acrn-fuzz-mon-")
IMAGE = os.path.join(_TMP, "disk.img")
OTHER = os.path.join(_TMP, "other.img")
for _p in (IMAGE, OTHER):
    with open(_p, "wb") as _f:
        _f.truncate(1 << 20)

ARGS = ["-m", "128M", "-s", "0:0,hostbridge", "-s", f"3,virtio-blk,{IMAGE}", "-s", "4,dummy",
        "--shutdown_timeout", "0", "vm1"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False), st.text(max_size=12),
                    st.sampled_from(["3", "4", "0:3:0", "99", "", IMAGE, OTHER, "/nonexistent",
                                     _TMP, "3," + OTHER, "status", "blkrescan", "destroy"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
requests = st.fixed_dictionaries(
    {},
    optional={
        "cmd": st.one_of(st.sampled_from(["help", "status", "pause", "resume", "poweroff",
                                          "reset", "blkrescan", "devices", "nope", ""]), values),
        "command": st.one_of(st.sampled_from(["destroy", "blkrescan", "x"]), values),
        "arguments": values, "id": values, "slot": values, "path": values,
        "force": values, "x": values,
    })
lines = st.one_of(
    requests.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"{", b"}", b"[]", b"null", b'"x"', b"1e999", b"[" * 3000 + b"]" * 3000,
                     b'{"cmd": "status"', b"\xff\xfe", b'{"cmd":"status"}{"cmd":"help"}']),
)


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append("".join(traceback.format_exception(*record.exc_info)))


def _with_monitor(body) -> None:
    tb = _Tracebacks()
    mlog = logging.getLogger("devicemodel.monitor")
    mlog.addHandler(tb)

    async def main() -> None:
        with trio.fail_after(30):
            async with running(ARGS, hypervisor=SimHypervisor()) as vm:
                mon = Monitor(vm, os.path.join(_TMP, "unused.sock"))
                async with trio.open_nursery() as nursery:
                    if mon._owns_lifecycle:
                        nursery.start_soon(mon.lifecycle.run)
                    await body(mon)
                    nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        mlog.removeHandler(tb)
    assert not tb.seen, "a monitor command crashed:\n" + "".join(tb.seen)


def _check_reply(reply: dict) -> None:
    assert isinstance(reply, dict)
    if "ack" in reply:
        assert reply["ack"] in (0, -1)
    else:
        assert reply["ok"] in (True, False)
        if not reply["ok"]:
            assert isinstance(reply["error"], str) and reply["error"]
    json.dumps({k: v for k, v in reply.items() if not k.startswith("_")})


@fuzz_settings(40)
@given(reqs=st.lists(lines, min_size=1, max_size=8))
def test_request_lines(reqs):
    count("monitor.lines")

    async def body(mon: Monitor) -> None:
        for line in reqs:
            _check_reply(await mon.handle_line(line))

    _with_monitor(body)


@fuzz_settings(30)
@given(chunks=st.lists(st.one_of(lines, st.binary(max_size=8), st.just(b"\n"),
                                 st.just(b"x" * 5000)), min_size=1, max_size=10),
       newline=st.booleans())
def test_byte_stream(chunks, newline):
    count("monitor.stream")

    async def body(mon: Monitor) -> None:
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
        for line in data.split(b"\n"):
            if line:
                _check_reply(json.loads(line))

    _with_monitor(body)
