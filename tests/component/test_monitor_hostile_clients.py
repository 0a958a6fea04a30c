"""Monitor clients that hold seats without using them, read nothing, or send numbers JSON
cannot carry (issue 18, item 4).

Before the fix eight connections that never sent anything held all eight seats for good
(every other client was told "too many clients"), and a request whose id was ``1e999`` or
``NaN`` got a reply with a bare ``Infinity``/``NaN`` in it, which is not JSON.
"""

from __future__ import annotations

import json
import math

import pytest
import trio

from devicemodel.config import ConfigError, parse_args
from devicemodel.config.toml import dumps, loads
from devicemodel.monitor import MAX_CLIENTS
from tests.component.test_launch_monitor import Client, vm_with_monitor

IDLE = "0.5"


def _strict(line: bytes) -> dict:
    """Parse as a strict JSON consumer would (no NaN, no Infinity)."""
    def refuse(name: str) -> None:
        raise AssertionError(f"the reply contains {name}, which is not JSON: {line!r}")

    return json.loads(line, parse_constant=refuse)


async def _line(stream: trio.SocketStream, timeout: float = 5) -> bytes:
    buf = b""
    with trio.fail_after(timeout):
        while not buf.endswith(b"\n"):
            data = await stream.receive_some(4096)
            if not data:
                raise EOFError(f"closed after {buf!r}")
            buf += data
    return buf


async def _closed(stream: trio.SocketStream, timeout: float = 5) -> bytes:
    """Everything the monitor still sends, up to its hang-up (a hang-up with bytes of ours
    still unread on its side may reach us as a reset instead)."""
    got = b""
    with trio.fail_after(timeout):
        try:
            while data := await stream.receive_some(4096):
                got += data
        except trio.BrokenResourceError:
            pass
    return got


async def test_silent_clients_time_out_and_free_their_seats(tmp_path):
    async with vm_with_monitor(tmp_path, "--monitor_idle_timeout", IDLE) as (vm, path):
        silent = [await trio.open_unix_socket(path) for _ in range(MAX_CLIENTS)]
        await trio.sleep(0.1)
        extra = await trio.open_unix_socket(path)
        assert b"too many clients" in await _line(extra)
        await extra.aclose()
        t0 = trio.current_time()
        for s in silent:  # each silent client is told why, then closed
            goodbye = _strict(await _closed(s))
            assert goodbye == {"ok": False,
                               "error": "no request for 0.5 s; closing the connection"}
        assert trio.current_time() - t0 < 3
        c = Client(await trio.open_unix_socket(path))
        assert (await c.call({"cmd": "status"}))["ok"]
        for s in silent:
            await s.aclose()


async def test_a_trickling_client_is_closed_and_a_busy_one_is_not(tmp_path):
    """Bytes that never make a request do not keep a seat; requests do."""
    async with vm_with_monitor(tmp_path, "--monitor_idle_timeout", IDLE) as (vm, path):
        trickle = await trio.open_unix_socket(path)
        busy = Client(await trio.open_unix_socket(path))
        t0 = trio.current_time()
        with trio.fail_after(5):
            while True:
                try:
                    await trickle.send_all(b" ")
                except trio.BrokenResourceError:
                    break
                assert (await busy.call({"cmd": "status"}))["ok"]  # busy: stays served
                await trio.sleep(0.1)
                if trio.current_time() - t0 > 1.0:
                    break
        await _closed(trickle)  # closed (its goodbye may be lost to the reset)
        assert trio.current_time() - t0 < 3
        assert (await busy.call({"cmd": "status"}))["ok"]
        await trickle.aclose()


async def test_a_client_that_reads_nothing_is_cut_off_and_blocks_nobody(tmp_path):
    async with vm_with_monitor(tmp_path, "--monitor_idle_timeout", IDLE) as (vm, path):
        deaf = await trio.open_unix_socket(path)
        other = Client(await trio.open_unix_socket(path))
        request = json.dumps({"cmd": "help"}).encode() + b"\n"
        t0 = trio.current_time()
        with trio.fail_after(10):  # requests, never reading a reply, until it is dropped
            while True:
                try:
                    with trio.move_on_after(0.2):
                        await deaf.send_all(request * 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                with trio.fail_after(1):  # meanwhile every other client is answered
                    assert (await other.call({"cmd": "status"}))["ok"]
        assert trio.current_time() - t0 < 5
        assert (await other.call({"cmd": "status"}))["ok"]
        await deaf.aclose()


@pytest.mark.parametrize("raw_id", [b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity"])
async def test_numbers_json_cannot_carry_get_a_strict_error_reply(tmp_path, raw_id):
    async with vm_with_monitor(tmp_path) as (vm, path):
        s = await trio.open_unix_socket(path)
        await s.send_all(b'{"cmd": "status", "id": ' + raw_id + b"}\n")
        reply = _strict(await _line(s))
        assert reply["ok"] is False and reply["error"].startswith("malformed JSON: ")
        assert "id" not in reply
        c = Client(s)  # the connection stays usable
        assert (await c.call({"cmd": "status", "id": 1.5}))["id"] == 1.5
        await s.aclose()


def test_replies_are_strict_json_whatever_they_carry():
    from devicemodel.monitor import encode_reply, strict_loads

    for bad in (math.nan, math.inf, -math.inf):
        line = encode_reply({"ok": True, "id": 7, "result": {"x": bad}})
        reply = _strict(line)
        assert reply["ok"] is False and reply["id"] == 7
        assert reply["error"].startswith("the reply cannot be written as JSON")
    assert _strict(encode_reply({"ok": True, "result": [1, "a"], "_after": print})) == \
        {"ok": True, "result": [1, "a"]}
    with pytest.raises(ValueError):
        strict_loads(b'{"id": 1e400}')
    assert strict_loads(b'{"id": 1e300}') == {"id": 1e300}


def test_idle_timeout_is_configurable_and_checked():
    cfg = parse_args(["--monitor_idle_timeout", "5", "vm1"])
    assert cfg.monitor_idle_timeout == 5.0
    assert parse_args(["vm1"]).monitor_idle_timeout == 30.0
    assert "--monitor_idle_timeout" in cfg.to_args()
    assert parse_args(cfg.to_args()).monitor_idle_timeout == 5.0
    text = dumps(cfg)
    assert "monitor_idle_timeout = 5.0" in text
    assert loads(text, check_files=False).monitor_idle_timeout == 5.0
    with pytest.raises(ConfigError, match=r"--monitor_idle_timeout -1: expected seconds "
                                          r"0\.\.86400"):
        parse_args(["--monitor_idle_timeout", "-1", "vm1"])
    with pytest.raises(ConfigError, match="monitor_idle_timeout"):
        loads('name = "vm1"\nmonitor_idle_timeout = "soon"\n', check_files=False)
