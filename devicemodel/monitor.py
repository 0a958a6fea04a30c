"""The command monitor (``--cmd_monitor PATH``): JSON lines over a UNIX stream socket.

Each request is one JSON object on one line, ``{"cmd": "status", "id": 7}``; each gets one
reply line, ``{"ok": true, "id": 7, "result": {...}}`` or ``{"ok": false, "error": "..."}``.
Commands: help, status, pause, resume, poweroff [force], reset, blkrescan slot path
(a virtio-blk image, or an AHCI CD-ROM's disc: [port], path or eject, [force]), devices.
acrn-dm HEAD's own dialect is answered too: ``{"command": "destroy"}`` and
``{"command": "blkrescan", "arguments": "<slot>,<path>"}``, replied ``{"ack": 0|-1}``, and,
as acrn-dm reads them, such requests may arrive without a newline, one object per write.

The monitor is a control plane reachable by any local client with access to the socket
(mode 0600): a malformed, oversized or unknown request gets an error reply and the
connection stays usable; the line length and the number of clients are bounded; nothing a
client sends can end the server or the VM except the commands that are meant to.

Seats are not held forever: a client that completes no request for ``idle_timeout``
seconds (``monitor_idle_timeout``, 30 by default; bytes that do not make a request do not
count), or that does not read its replies within that time, is told so and closed, so
eight silent or slow connections cannot lock everyone else out. Replies are strict JSON:
a request with a number JSON cannot carry (``NaN``, ``Infinity``, ``1e999``) is refused,
and a reply that cannot be written as JSON becomes an error reply.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from .config import DEFAULT_MONITOR_IDLE_TIMEOUT
from .errors import ConfigError
from .ratelimit import RateLimitedLog
from .vmm.lifecycle import Lifecycle

if TYPE_CHECKING:
    from .vmm.vm import Vm

log = logging.getLogger(__name__)

MAX_LINE = 4096
MAX_CLIENTS = 8
IDLE_TIMEOUT = DEFAULT_MONITOR_IDLE_TIMEOUT


class MonitorError(Exception):
    """A request that cannot be carried out; the message goes back to the client."""


Handler = Callable[["Monitor", dict[str, Any]], Any]
_COMMANDS: dict[str, tuple[Handler, str]] = {}


def command(name: str, doc: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        _COMMANDS[name] = (fn, doc)
        return fn

    return deco


def _whole_object(buf: bytearray) -> bool:
    """Whether ``buf`` already holds one complete JSON object (and nothing else)."""
    text = bytes(buf).strip()
    if not text.startswith(b"{") or not text.endswith(b"}") or len(text) > MAX_LINE:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


class _NotJson(ValueError):
    """A number JSON cannot carry."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise _NotJson(f"{text[:40]} is out of range for a JSON number")
    return value


def strict_loads(data: bytes | str) -> Any:
    """json.loads without Python's extensions: NaN, Infinity and overflowing numbers are
    errors (a reply echoing them would not be JSON)."""
    return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite)


def encode_reply(obj: dict[str, Any]) -> bytes:
    """One reply line, strict JSON; what cannot be written becomes an error reply."""
    clean = {k: v for k, v in obj.items() if not k.startswith("_")}
    try:
        text = json.dumps(clean, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        error: dict[str, Any] = {"ok": False,
                                 "error": f"the reply cannot be written as JSON: {e}"[:200]}
        rid = clean.get("id")
        if isinstance(rid, str | bool | int) or rid is None:
            error["id"] = rid
        text = json.dumps(error, separators=(",", ":"), allow_nan=False, default=str)
    return text.encode() + b"\n"


def _json_safe(obj: Any) -> Any:
    """Counters as JSON: numbers, strings and booleans survive, anything else is a string."""
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return str(obj)


class Monitor:
    def __init__(self, vm: Vm, path: str, *, max_clients: int = MAX_CLIENTS,
                 max_line: int = MAX_LINE, idle_timeout: float = IDLE_TIMEOUT) -> None:
        """``idle_timeout``: seconds a client may take to complete each request and to
        read each reply (0: no limit)."""
        self.vm = vm
        self.path = path
        self.max_clients = max_clients
        self.max_line = max_line
        self.idle_timeout = idle_timeout or math.inf
        self.clients = 0
        self.lifecycle, self._owns_lifecycle = Lifecycle.of(vm)
        self._rl = RateLimitedLog(log)

    # --- socket ---------------------------------------------------------------------------
    def _prepare(self) -> trio.socket.SocketType:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"--cmd_monitor {self.path}: exists and is not a socket; "
                                  "remove it or choose another path")
            # a socket left by a crashed run: ours to replace, since we hold the VM's lock
            os.unlink(self.path)
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        return trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        sock = self._prepare()
        old = os.umask(0o177)  # the socket file is created 0600: the monitor is root's
        try:
            await sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--cmd_monitor {self.path}: cannot bind: {e.strerror}") from None
        finally:
            os.umask(old)
        try:
            sock.listen(self.max_clients)
            listener = trio.SocketListener(sock)
            log.info("command monitor listening on %s", self.path)
            async with trio.open_nursery() as nursery:
                if self._owns_lifecycle:
                    nursery.start_soon(self.lifecycle.run)
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            self._rl.warning("monitor accept: %s", e)
                            await trio.sleep(0.1)
                            continue
                        raise
                    nursery.start_soon(self._client, stream)
        finally:
            sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _client(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.clients >= self.max_clients:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._send(stream, {
                        "ok": False, "error": f"too many clients (at most "
                                              f"{self.max_clients}); try again later"},
                        timeout=1)
                return
            self.clients += 1
            try:
                await self._lines(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.clients -= 1

    async def _lines(self, stream: trio.abc.Stream) -> None:
        buf = bytearray()
        discarding = False
        deadline = trio.current_time() + self.idle_timeout  # for the next whole request
        while True:
            data = None
            with trio.move_on_at(deadline):
                data = await stream.receive_some(65536)
            if data is None:
                self._rl.warning("monitor client idle for %g s: closing it", self.idle_timeout)
                await self._send(stream, {"ok": False, "error": (
                    f"no request for {self.idle_timeout:g} s; closing the connection")},
                    timeout=1)
                return
            if not data:
                return
            buf += data
            while True:
                nl = buf.find(b"\n")
                if nl < 0 and not discarding and _whole_object(buf):
                    nl = len(buf)  # acrn-dm's clients send one object per write, no newline
                    buf += b"\n"
                if nl < 0:
                    if len(buf) > self.max_line:
                        if not discarding:
                            await self._send(stream, self._too_long())
                        discarding = True
                        buf.clear()
                    break
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if discarding:  # the tail of an oversized request
                    discarding = False
                    continue
                if len(line) > self.max_line:
                    await self._send(stream, self._too_long())
                    continue
                if not line.strip():
                    continue
                reply = await self.handle_line(line)
                await self._send(stream, reply)
                deadline = trio.current_time() + self.idle_timeout
                after = reply.pop("_after", None)
                if after is not None:
                    after()

    def _too_long(self) -> dict[str, Any]:
        return {"ok": False, "error": f"request longer than {self.max_line} bytes; "
                                      "send one JSON object per line"}

    async def _send(self, stream: trio.abc.Stream, obj: dict[str, Any], *,
                    timeout: float | None = None) -> None:
        """One reply; a client that does not read it within the idle timeout is cut off
        (trio.BrokenResourceError, which ends the connection)."""
        with trio.move_on_after(self.idle_timeout if timeout is None else timeout) as scope:
            await stream.send_all(encode_reply(obj))
        if scope.cancelled_caught:
            self._rl.warning("monitor client does not read its replies: closing it")
            raise trio.BrokenResourceError("the client does not read its replies")

    # --- requests -------------------------------------------------------------------------
    async def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            req = strict_loads(line)
        except (ValueError, RecursionError) as e:
            return {"ok": False, "error": f"malformed JSON: {str(e)[:100]}; "
                                          'send e.g. {"cmd": "status"}'}
        if not isinstance(req, dict):
            return {"ok": False, "error": 'a request is a JSON object, e.g. {"cmd": "status"}'}
        reply: dict[str, Any] = {}
        if "id" in req:
            rid = req["id"]
            reply["id"] = rid if isinstance(rid, str | int | float | bool) or rid is None \
                else str(rid)
        if "cmd" not in req and "command" in req:
            return await self._acrn_dm_request(req)
        cmd = req.get("cmd")
        entry = _COMMANDS.get(cmd) if isinstance(cmd, str) else None
        if entry is None:
            what = "missing \"cmd\"" if cmd is None else f"unknown command {str(cmd)[:40]!r}"
            reply.update(ok=False, error=f"{what}; commands: {', '.join(sorted(_COMMANDS))}")
            return reply
        try:
            result = entry[0](self, req)
            if inspect.isawaitable(result):
                result = await result
        except MonitorError as e:
            reply.update(ok=False, error=str(e))
            return reply
        except Exception as e:  # a bug in a command must not end the monitor
            log.exception("monitor command %s failed", cmd)
            reply.update(ok=False, error=f"{cmd} failed: {type(e).__name__}: {e}")
            return reply
        after = None
        if isinstance(result, tuple):  # (result, action to run once the reply is sent)
            result, after = result
        reply.update(ok=True, result=_json_safe(result))
        if after is not None:
            reply["_after"] = after
        return reply

    async def _acrn_dm_request(self, req: dict[str, Any]) -> dict[str, Any]:
        """acrn-dm's own dialect (core/cmd_monitor): ``{"command": "destroy"}`` or
        ``{"command": "blkrescan", "arguments": "<slot>,<path>"}``, answered ``{"ack": 0}``
        on success and ``{"ack": -1}`` on failure, so its tools work against us too."""
        command = req.get("command")
        args = req.get("arguments", "")
        ok: dict[str, Any] = {"ack": 0}
        if command == "destroy" and self.vm.config.rtvm:
            # acrn-dm's user_vm_destroy_handler: a real-time VM is not destroyed from here
            log.error("destroy: a real-time VM (--rtvm) is not destroyed by the monitor, as "
                      "in acrn-dm; power it off from inside")
            return {"ack": -1}
        if command == "destroy":
            lc = self.lifecycle
            ok["_after"] = lambda: lc.request_poweroff("monitor destroy", force=True)
            return ok
        if command == "blkrescan" and isinstance(args, str):
            slot, _, path = args.partition(",")
            reply = await self.handle_line(json.dumps(
                {"cmd": "blkrescan", "slot": slot, "path": path}).encode())
            if reply.get("ok"):
                return ok
            log.warning("blkrescan %s: %s", args, reply.get("error"))
            return {"ack": -1}
        if command == "blkrescan":
            log.warning('blkrescan: "arguments" must be a string "<slot>,<path>"')
        else:
            log.warning("acrn-dm monitor command %r is not supported", str(command)[:40])
        return {"ack": -1}

    def _slot_arg(self, req: dict[str, Any]) -> tuple[str, Any]:
        slot = req.get("slot")
        if isinstance(slot, int) and not isinstance(slot, bool):
            slot = str(slot)
        if not isinstance(slot, str):
            raise MonitorError('give the device\'s slot, e.g. "slot": "3" or "0:3:0"')
        try:
            return slot, self.vm.device(slot)
        except (KeyError, ValueError):
            raise MonitorError(f"no device at slot {slot}; see the devices command") from None


# --- commands ---------------------------------------------------------------------------

@command("help", "list the commands")
def _help(mon: Monitor, req: dict[str, Any]) -> Any:
    return {name: doc for name, (_, doc) in sorted(_COMMANDS.items())}


@command("status", "VM name, state, vCPUs, memory, backend, uptime")
def _status(mon: Monitor, req: dict[str, Any]) -> Any:
    vm = mon.vm
    return {
        "name": vm.config.name,
        "state": mon.lifecycle.state,
        "vcpus": vm.vcpu_num,
        "memsize": vm.config.memsize,
        "hv": vm.hv.name,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - mon.lifecycle.started, 3),
        "shutdown_requested": mon.lifecycle.shutdown_requested,
    }


@command("pause", "pause all vCPUs (PAUSE_VM)")
def _pause(mon: Monitor, req: dict[str, Any]) -> Any:
    try:
        mon.lifecycle.pause()
    except RuntimeError as e:
        raise MonitorError(f"cannot pause: {e}") from None
    return {"state": mon.lifecycle.state}


@command("resume", "resume a paused VM (START_VM)")
def _resume(mon: Monitor, req: dict[str, Any]) -> Any:
    try:
        mon.lifecycle.resume()
    except RuntimeError as e:
        raise MonitorError(f"cannot resume: {e}") from None
    return {"state": mon.lifecycle.state}


@command("poweroff", 'ask the guest to power off; "force": true destroys it now')
def _poweroff(mon: Monitor, req: dict[str, Any]) -> Any:
    force = req.get("force", False)
    if not isinstance(force, bool):
        raise MonitorError('"force" must be true or false')
    lc = mon.lifecycle
    # decide now, act after the reply is on its way: stopping cancels this connection
    how = "destroying the VM now" if lc.destroys_now(force) else "power button pressed"
    return {"action": how}, lambda: lc.request_poweroff("monitor poweroff", force=force)


@command("reset", "reset the VM (as a guest write to 0xCF9 would)")
async def _reset(mon: Monitor, req: dict[str, Any]) -> Any:
    vm = mon.vm
    if mon.lifecycle.shutdown_requested is not None:
        raise MonitorError("cannot reset: the VM is shutting down")
    if mon.lifecycle.paused:
        raise MonitorError("cannot reset: the VM is paused; resume it first")
    power = vm.guest_power  # the platform's: queues acrn-dm's reset sequence
    fn = getattr(power, "request_reset", None)
    if not callable(fn):
        raise MonitorError("reset is not available: this VM has no platform reset path")
    result = fn()
    if inspect.isawaitable(result):
        await result
    return {"state": mon.lifecycle.state, "action": "reset requested"}


AHCI_EMULS = ("ahci", "ahci-hd", "ahci-cd")


@command("blkrescan", 'swap a virtio-blk image: "slot": "3", "path": "/new.img"; or an '
         'AHCI CD-ROM\'s disc: "slot": "4", "path": "/new.iso" (or "eject": true), with '
         '"port": N if the controller has several CD-ROM drives, "force": true if the '
         'guest locked the tray')
async def _blkrescan(mon: Monitor, req: dict[str, Any]) -> Any:
    slot, dev = mon._slot_arg(req)
    emul = _emul_at(mon.vm, dev)
    if emul in AHCI_EMULS:
        return _cd_medium(slot, dev, req)
    path = req.get("path")
    if not isinstance(path, str) or not path:
        raise MonitorError('give the new image, e.g. "path": "/var/lib/acrn/disk.img"')
    if emul != "virtio-blk":
        raise MonitorError(f"slot {slot} is {emul or 'not a virtio-blk device'}, "
                           "not virtio-blk; blkrescan swaps virtio-blk images and AHCI "
                           "CD-ROM discs only")
    if not os.path.isfile(path):
        raise MonitorError(f"{path}: no such image file; give an existing disk image")
    rescan = getattr(dev, "rescan", None)
    if not callable(rescan):
        raise MonitorError(f"the virtio-blk device at slot {slot} cannot swap images "
                           "(no rescan support in this build)")
    try:
        result = rescan(path)
        if inspect.isawaitable(result):
            result = await result
    except (OSError, ValueError, ConfigError) as e:
        raise MonitorError(f"blkrescan {path}: {e}") from None
    log.info("slot %s: image swapped to %s", slot, path)
    return {"slot": slot, "path": path}


def _cd_medium(slot: str, dev: Any, req: dict[str, Any]) -> Any:
    """blkrescan on an AHCI controller: a CD-ROM drive's disc changes."""
    eject, force, port = req.get("eject", False), req.get("force", False), req.get("port")
    if not isinstance(eject, bool) or not isinstance(force, bool):
        raise MonitorError('"eject" and "force" must be true or false')
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
        raise MonitorError('"port" must be a port number, e.g. "port": 1')
    path = None if eject else req.get("path")
    if not eject:
        if not isinstance(path, str) or not path:
            raise MonitorError('give the new disc, e.g. "path": "/var/lib/acrn/disc.iso", '
                               'or "eject": true')
        if not os.path.isfile(path):
            raise MonitorError(f"{path}: no such image file; give an existing disc image")
    try:
        port = dev.change_medium(path, port=port, force=force)
    except (OSError, ValueError, ConfigError, RuntimeError) as e:
        raise MonitorError(f"blkrescan: {e}") from None
    return {"slot": slot, "port": port, "path": path}


def _emul_at(vm: Vm, dev: Any) -> str | None:
    for key, d in vm.devices.items():
        if d is dev:
            s = vm.config.slot(*key)
            return s.emul if s else None
    return None


def _counters(dev: Any) -> Any:
    # a virtio function's counters (e.g. virtio-net's MAC) are on the virtio device its
    # transport carries
    for obj in (dev, getattr(dev, "device", None)):
        for attr in ("counters", "stats"):
            val = getattr(obj, attr, None)
            if callable(val):
                try:
                    val = val()
                except Exception as e:
                    return {"error": f"{type(e).__name__}: {e}"}
            if isinstance(val, Mapping):
                return _json_safe(val)
    return {}


@command("devices", "PCI functions with their counters, and the request server's counters")
def _devices(mon: Monitor, req: dict[str, Any]) -> Any:
    vm = mon.vm
    out = []
    for (b, d, f), dev in sorted(vm.devices.items()):
        s = vm.config.slot(b, d, f)
        out.append({
            "slot": f"{b}:{d}:{f}",
            "emul": s.emul if s else None,
            "options": s.options if s else None,
            "name": getattr(dev, "name", type(dev).__name__),
            "counters": _counters(dev),
        })
    server = vm.server
    return {
        "devices": out,
        "ioreq": _json_safe(dict(server.stats)) if server is not None else {},
        "msi_injected": vm.irq.msi_count,
    }


async def serve_monitor(vm: Vm, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
    """A VM service (``vmm.vm.Vm``'s ``services``): serve ``config.cmd_monitor`` for the
    VM's life."""
    assert vm.config.cmd_monitor is not None
    await Monitor(vm, vm.config.cmd_monitor, idle_timeout=vm.config.monitor_idle_timeout
                  ).serve(task_status=task_status)


__all__ = ["Monitor", "MonitorError", "serve_monitor"]
