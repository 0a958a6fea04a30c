"""The command monitor over a real UNIX socket, with a sim VM behind it."""

from __future__ import annotations

import json
import types
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemodel.config import SlotConfig, parse_args
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.monitor import MAX_CLIENTS, MAX_LINE, Monitor
from devicemodel.vm import running


class Client:
    """One JSON-lines connection, as a script would use it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self) -> dict:
        with trio.fail_after(10):
            while b"\n" not in self.buf:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("monitor closed the connection")
                self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    async def call(self, obj: dict | str | bytes) -> dict:
        if isinstance(obj, dict):
            data = json.dumps(obj).encode()
        elif isinstance(obj, str):
            data = obj.encode()
        else:
            data = obj
        await self.send_raw(data + b"\n")
        return await self.reply()


@asynccontextmanager
async def vm_with_monitor(tmp_path, *extra: str, grace: str = "0"):
    sock = tmp_path / "mon.sock"
    cfg = parse_args(["--hv", "sim", "-m", "128M", "-s", "0:0,hostbridge", "--cmd_monitor",
                      str(sock), "--shutdown_timeout", grace, *extra, "vm1"])
    sim = SimHypervisor()
    async with running(cfg, sim) as vm:
        vm.sim = sim
        yield vm, str(sock)


@asynccontextmanager
async def connect(path: str):
    stream = await trio.open_unix_socket(path)
    async with stream:
        yield Client(stream)


async def test_status_pause_resume(tmp_path):
    async with vm_with_monitor(tmp_path) as (vm, path), connect(path) as c:
        st = await c.call({"cmd": "status", "id": 41})
        assert st["id"] == 41 and st["ok"] is True
        assert st["result"]["name"] == "vm1" and st["result"]["state"] == "running"
        assert st["result"]["vcpus"] == 1 and st["result"]["memsize"] == 128 << 20
        assert st["result"]["hv"] == "sim"
        assert (await c.call({"cmd": "pause"}))["result"] == {"state": "paused"}
        assert vm.sim.state == "paused" and vm.sim.calls[-1] == "pause_vm"
        again = await c.call({"cmd": "pause"})
        assert again == {"ok": False, "error": "cannot pause: the VM is already paused"}
        assert (await c.call({"cmd": "status"}))["result"]["state"] == "paused"
        assert (await c.call({"cmd": "resume"}))["result"] == {"state": "running"}
        assert vm.sim.state == "running" and vm.sim.calls[-1] == "start_vm"
        assert (await c.call({"cmd": "resume"}))["ok"] is False
        # the guest runs again: a port read gets answered
        assert await vm.sim.guest().pio_read(0x80, 1) == 0xFF


async def test_bad_requests_get_errors_and_the_connection_lives(tmp_path):
    async with vm_with_monitor(tmp_path) as (vm, path), connect(path) as c:
        bad = await c.call("{not json")
        assert bad["ok"] is False and bad["error"].startswith("malformed JSON")
        assert (await c.call("[1, 2]"))["error"].startswith("a request is a JSON object")
        unknown = await c.call({"cmd": "launch_missiles", "id": "x"})
        assert unknown["id"] == "x" and unknown["ok"] is False
        assert "unknown command 'launch_missiles'" in unknown["error"]
        assert "status" in unknown["error"]  # the fix: the list of commands
        assert "missing" in (await c.call({"verb": "status"}))["error"]
        assert await c.call({"command": "status"}) == {"ack": -1}  # acrn-dm's dialect
        assert (await c.call({"cmd": 7}))["ok"] is False
        deep = await c.call("[" * 100000 + "]" * 100000)  # over the line limit
        assert "longer than" in deep["error"]
        nested = await c.call("[" * 2000 + "]" * 2000)
        assert nested["ok"] is False
        assert (await c.call(b"\xff\xfe{}"))["ok"] is False  # not UTF-8
        # oversized without a newline for a while, then the newline
        await c.send_raw(b"x" * (MAX_LINE + 10))
        assert "longer than" in (await c.reply())["error"]
        await c.send_raw(b"y" * (3 * MAX_LINE) + b"\n")
        # pipelined and split requests
        await c.send_raw(b'{"cmd":"status","id":1}\n\n{"cmd":"status","id":2}\n{"cmd":"sta')
        await trio.sleep(0.05)
        await c.send_raw(b'tus","id":3}\n')
        assert [(await c.reply())["id"] for _ in range(3)] == [1, 2, 3]
        assert (await c.call({"cmd": "status"}))["result"]["state"] == "running"
        assert vm.state == "running"


async def test_client_limit(tmp_path):
    async with vm_with_monitor(tmp_path) as (vm, path):
        streams = [await trio.open_unix_socket(path) for _ in range(MAX_CLIENTS)]
        clients = [Client(s) for s in streams]
        for c in clients:  # each is served (and counted) before the next one comes
            assert (await c.call({"cmd": "status"}))["ok"]
        extra = Client(await trio.open_unix_socket(path))
        refused = await extra.reply()
        assert refused["ok"] is False and "too many clients" in refused["error"]
        with pytest.raises(EOFError):
            await extra.reply()
        await extra.stream.aclose()
        await streams[0].aclose()
        await trio.sleep(0.05)
        async with connect(path) as c:
            assert (await c.call({"cmd": "status"}))["ok"]
        for s in streams[1:]:
            await s.aclose()


async def test_devices_with_counters(tmp_path):
    async with vm_with_monitor(tmp_path) as (vm, path), connect(path) as c:
        guest = vm.sim.guest()
        await guest.pio_read(0x80, 1)  # nobody there: counted as unhandled
        await guest.pci_cfg_read(0, 0, 0, 0, 4)
        res = (await c.call({"cmd": "devices"}))["result"]
        hb = [d for d in res["devices"] if d["slot"] == "0:0:0"]
        assert hb and hb[0]["emul"] == "hostbridge"
        assert res["ioreq"]["pio"] >= 1 and res["ioreq"]["unhandled_pio"] >= 1
        assert res["ioreq"]["pcicfg"] >= 1
        assert isinstance(res["msi_injected"], int)


class FakeBlk:
    """Stands in for virtio-blk where the test needs a device with (or without) rescan."""

    name = "virtio-blk"

    def __init__(self, can_rescan: bool) -> None:
        self.paths: list[str] = []
        self.stats = {"reads": 3, "writes": 4, "odd": object()}
        if can_rescan:
            self.rescan = self._rescan

    async def _rescan(self, path: str) -> None:
        if path.endswith("bad.img"):
            raise OSError(5, "Input/output error")
        self.paths.append(path)

    def close(self) -> None:
        pass


class FakeNet:
    def counters(self) -> dict[str, str]:
        return {"mac": "00:16:3e:01:02:03"}


class FakeTransport:
    """Stands in for VirtioPci: the PCI function that carries a virtio device."""

    name = "virtio-net"

    def __init__(self) -> None:
        self.device = FakeNet()

    def close(self) -> None:
        pass


def _add_fake(vm, dev_no: int, can_rescan: bool) -> FakeBlk:
    dev = FakeBlk(can_rescan)
    vm.devices[(0, dev_no, 0)] = dev
    vm.config.slots.append(SlotConfig(0, dev_no, 0, "virtio-blk", "nodisk"))
    return dev


async def test_blkrescan(tmp_path):
    new = tmp_path / "new.img"
    new.write_bytes(b"\0" * 512)
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"\0" * 512)
    async with vm_with_monitor(tmp_path) as (vm, path), connect(path) as c:
        blk = _add_fake(vm, 5, can_rescan=True)
        _add_fake(vm, 6, can_rescan=False)
        ok = await c.call({"cmd": "blkrescan", "slot": "5", "path": str(new)})
        assert ok == {"ok": True, "result": {"slot": "5", "path": str(new)}}
        assert blk.paths == [str(new)]
        async def err(req: dict) -> str:
            r = await c.call({"cmd": "blkrescan", **req})
            assert r["ok"] is False
            return r["error"]

        assert "no device at slot 9" in await err({"slot": 9, "path": str(new)})
        assert "give the device's slot" in await err({"path": str(new)})
        assert "not virtio-blk" in await err({"slot": "0:0", "path": str(new)})
        assert "no such image file" in await err({"slot": 5, "path": str(tmp_path / "x")})
        assert "give the new image" in await err({"slot": 5})
        assert "no rescan support" in await err({"slot": "0:6:0", "path": str(new)})
        assert "Input/output error" in await err({"slot": 5, "path": str(bad)})
        # per-device counters appear in the device list, made JSON-safe
        devs = (await c.call({"cmd": "devices"}))["result"]["devices"]
        five = [d for d in devs if d["slot"] == "0:5:0"][0]
        assert five["counters"]["reads"] == 3 and isinstance(five["counters"]["odd"], str)
        # a transport's counters are those of the virtio device it carries
        vm.devices[(0, 7, 0)] = FakeTransport()
        devs = (await c.call({"cmd": "devices"}))["result"]["devices"]
        seven = [d for d in devs if d["slot"] == "0:7:0"][0]
        assert seven["counters"] == {"mac": "00:16:3e:01:02:03"}
        for k in ((0, 5, 0), (0, 6, 0), (0, 7, 0)):  # leave the VM as it was built
            del vm.devices[k]


async def test_blkrescan_on_the_real_virtio_blk(tmp_path):
    from devicemodel.registry import known

    if "virtio-blk" not in known():
        pytest.skip("virtio-blk is not registered in this build yet")
    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * 65536)
    img2 = tmp_path / "b.img"
    img2.write_bytes(b"\1" * 65536)
    async with vm_with_monitor(tmp_path, "-s", f"3,virtio-blk,{img}") as (vm, path), \
            connect(path) as c:
        r = await c.call({"cmd": "blkrescan", "slot": 3, "path": str(img2)})
        if hasattr(vm.device(3), "rescan"):
            assert r["ok"] is True, r
        else:
            assert r["ok"] is False and "no rescan support" in r["error"]


async def test_poweroff_replies_then_stops(tmp_path):
    async with vm_with_monitor(tmp_path) as (vm, path), connect(path) as c:
        r = await c.call({"cmd": "poweroff"})
        assert r == {"ok": True, "result": {"action": "destroying the VM now"}}
        with trio.fail_after(10):
            await vm.wait_stopped()
        assert vm.sim.state == "destroyed"
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            await c.reply()
    assert not (tmp_path / "mon.sock").exists()


async def test_poweroff_presses_the_power_button_first(tmp_path):
    async with vm_with_monitor(tmp_path, grace="30") as (vm, path), connect(path) as c:
        pressed = []
        vm.power_button = lambda: pressed.append(1)
        vm.power_button_heard = lambda: True  # a guest that enabled ACPI
        r = await c.call({"cmd": "poweroff"})
        assert r["result"] == {"action": "power button pressed"}
        await trio.sleep(0.05)
        assert pressed == [1] and vm.state == "running"
        assert (await c.call({"cmd": "status"}))["result"]["state"] == "shutting-down"
        r = await c.call({"cmd": "reset"})
        assert r["ok"] is False and "shutting down" in r["error"]
        r = await c.call({"cmd": "poweroff", "force": True})
        assert r["result"] == {"action": "destroying the VM now"}
        with trio.fail_after(10):
            await vm.wait_stopped()
        assert pressed == [1]


async def test_reset_goes_through_the_platform(tmp_path):
    async with vm_with_monitor(tmp_path) as (vm, path), connect(path) as c:
        if vm.guest_power is None:
            r = await c.call({"cmd": "reset"})
            assert r["ok"] is False and "reset is not available" in r["error"]
            return
        r = await c.call({"cmd": "reset"})
        assert r["ok"] is True, r
        with trio.fail_after(10):
            while "reset_vm" not in vm.sim.calls:
                await trio.sleep(0.01)
        calls = vm.sim.calls
        assert calls.index("pause_vm") < calls.index("reset_vm")
        with trio.fail_after(10):
            while vm.sim.state != "running":
                await trio.sleep(0.01)
        assert (await c.call({"cmd": "status"}))["result"]["state"] == "running"


def _stub_monitor() -> Monitor:
    hv = types.SimpleNamespace(name="stub", pause_vm=lambda: None, start_vm=lambda: None)
    cfg = parse_args(["-m", "128M", "vm"])
    vm = types.SimpleNamespace(
        config=cfg, hv=hv, state="running", vcpu_num=1, devices={}, server=None,
        irq=types.SimpleNamespace(msi_count=0), lifecycle=None, power_button=None,
        guest_power=None,
        poweroff=lambda: None, device=lambda slot: (_ for _ in ()).throw(KeyError(slot)))
    return Monitor(vm, "/nonexistent")  # type: ignore[arg-type]


_json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["cmd", "id", "slot", "path", "force", "x"]), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    _json_like.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.just("cmd"), st.sampled_from(
        ["status", "pause", "resume", "help", "devices", "blkrescan", "reset", "nope"])).map(
        lambda d: json.dumps(d).encode()),
))
def test_any_line_gets_one_reply(line):
    mon = _stub_monitor()

    async def one() -> dict:
        return await mon.handle_line(line)

    reply = trio.run(one)
    assert isinstance(reply.get("ok"), bool)
    assert reply["ok"] or isinstance(reply.get("error"), str)
    json.dumps({k: v for k, v in reply.items() if not k.startswith("_")})


async def test_acrn_dm_dialect(tmp_path, caplog):
    """acrn-dm's own monitor protocol: one object per write, no newline, {"ack": 0|-1}."""
    new = tmp_path / "new.img"
    new.write_bytes(b"\0" * 512)
    async with vm_with_monitor(tmp_path) as (vm, path), connect(path) as c:
        blk = _add_fake(vm, 5, can_rescan=True)
        await c.send_raw(json.dumps({"command": "blkrescan",
                                     "arguments": f"5,{new}"}).encode())
        assert await c.reply() == {"ack": 0}
        assert blk.paths == [str(new)]
        await c.send_raw(b'{"command": "blkrescan", "arguments": "9,/none"}')
        assert await c.reply() == {"ack": -1}
        await c.send_raw(b'{"command": "blkrescan", "arguments": [5]}')
        assert await c.reply() == {"ack": -1}
        assert '"arguments" must be a string' in caplog.text  # not "not supported"
        await c.send_raw(b'{"command": "register_vm_event_client"}')
        assert await c.reply() == {"ack": -1}
        assert "'register_vm_event_client' is not supported" in caplog.text
        # a partial object waits for the rest, as a stream should
        await c.send_raw(b'{"command": ')
        await trio.sleep(0.05)
        await c.send_raw(b'"destroy"}')
        assert await c.reply() == {"ack": 0}
        with trio.fail_after(10):
            await vm.wait_stopped()
        del vm.devices[(0, 5, 0)]


async def test_acrn_dm_dialect_keeps_a_real_time_vm(tmp_path, caplog):
    """acrn-dm's user_vm_destroy_handler refuses a real-time VM: {"ack": -1}, VM runs on."""
    async with vm_with_monitor(tmp_path, "--rtvm") as (vm, path), connect(path) as c:
        await c.send_raw(b'{"command": "destroy"}')
        assert await c.reply() == {"ack": -1}
        assert "real-time VM" in caplog.text
        await trio.sleep(0.05)
        assert vm.state == "running"
