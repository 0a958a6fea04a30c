"""virtio-net with a real tap in a private network namespace.

A helper thread unshares its network namespace (the rest of the process stays in the
host's), creates the tap there and an AF_PACKET socket bound to it: the socket is "the
host side". File descriptors keep the namespace alive after the thread ends, and closing
the tap removes it, so nothing is left behind.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
import trio

from devicemodel.config import ConfigError
from devicemodel.virtio.device import VIRTIO_F_VERSION_1
from devicemodel.virtio.mock import MockDriver, RecordingInterrupt, wait_used
from devicemodel.virtio.net import (
    VIRTIO_NET_F_MRG_RXBUF,
    TapBackend,
    VirtioNet,
    derive_mac,
    parse_net_options,
)

CLONE_NEWNET = 0x40000000
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else in the namespace sends it
TAP = "pydmtap0"

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def in_new_netns(fn: Callable[[], T]) -> T:
    result: list = []

    def body() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def make_tap_and_host_socket() -> tuple[TapBackend, socket.socket]:
    try:
        with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
            f.write("1")  # keep IPv6 neighbour discovery off the wire
    except OSError:
        pass
    tap = TapBackend.open(TAP)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", TAP.encode(), IFF_UP))
    host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    host.bind((TAP, 0))
    host.setblocking(False)
    return tap, host


@pytest.fixture
def netns():
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this machine")
    try:
        tap, host = in_new_netns(make_tap_and_host_socket)
    except (OSError, ConfigError) as e:
        pytest.skip(f"cannot create a tap in a network namespace here: {e}")
    yield tap, host
    host.close()
    tap.close()


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ETHERTYPE) + payload


async def recv_ours(host: socket.socket, timeout: float = 5.0) -> bytes:
    with trio.fail_after(timeout):
        while True:
            await trio.lowlevel.wait_readable(host)
            data = host.recv(65536)
            if data[12:14] == struct.pack("!H", ETHERTYPE):
                return data


async def test_frames_both_ways_through_a_real_tap(mem, netns):
    tap, host = netns
    assert tap.created and tap.mtu == 1500
    dev = VirtioNet(parse_net_options(f"tap={TAP},mac=02:00:00:00:00:01"), tap=tap)
    rx = MockDriver(mem, 0x100000, 256, max_size=1024)
    tx = MockDriver(mem, 0x600000, 256, index=1, max_size=1024)
    irq = RecordingInterrupt()
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        dev.activate(dev.device_features, [rx.queue(), tx.queue()], irq)
        # guest → host
        out = frame(b"\xff" * 6, dev.mac, b"from the guest" * 10)
        head = tx.add_chain([bytes(12), out[:20], out[20:]])
        dev.queue_notify(1)
        got = await recv_ours(host)
        assert got == out
        assert await wait_used(tx, 1) == [(head, 0)]
        # host → guest, into one of many posted 2 KiB buffers
        heads = [rx.add_chain([], [2048]) for _ in range(8)]
        dev.queue_notify(0)
        sent = frame(dev.mac, b"\x02\x00\x00\x00\x00\x02", os.urandom(300))
        host.send(sent)
        (first,) = await wait_rx(rx, sent)
        h, n = first
        assert h == heads[0] and n == 12 + len(sent)
        data = rx.written(h, n)
        assert data[:12] == struct.pack("<10sH", bytes(10), 1)  # num_buffers = 1
        assert irq.queue_irqs
        nursery.cancel_scope.cancel()
    dev.close()


async def wait_rx(drv: MockDriver, sent: bytes) -> list[tuple[int, int]]:
    """Used entries up to the one that carries ``sent`` (skipping stray host traffic)."""
    with trio.fail_after(5):
        while True:
            for h, n in await wait_used(drv, 1):
                if drv.written(h, n)[12:] == sent:
                    return [(h, n)]
            await trio.sleep(0)


async def test_mergeable_rx_buffers(mem, netns):
    tap, host = netns
    dev = VirtioNet(parse_net_options(f"tap={TAP}"), tap=tap)
    rx = MockDriver(mem, 0x100000, 256, max_size=1024)
    tx = MockDriver(mem, 0x600000, 256, index=1, max_size=1024)
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        dev.activate(dev.device_features, [rx.queue(), tx.queue()], RecordingInterrupt())
        heads = [rx.add_chain([], [256]) for _ in range(16)]
        dev.queue_notify(0)
        sent = frame(dev.mac, b"\x02\x00\x00\x00\x00\x02", os.urandom(600))
        host.send(sent)
        got: list[tuple[int, int]] = []
        with trio.fail_after(5):
            while True:
                await wait_used(rx, len(got) + 1, into=got)
                starts = [i for i, (h, _) in enumerate(got)
                          if struct.unpack_from("<H", rx.written(h), 10)[0] == 3]
                if starts and len(got) >= starts[0] + 3:
                    break
        entries = got[starts[0] : starts[0] + 3]
        assert [h for h, _ in entries] == heads[heads.index(entries[0][0]):][:3]
        assert [n for _, n in entries] == [256, 256, 12 + len(sent) - 512]
        data = b"".join(rx.written(h, n) for h, n in entries)
        assert data[12:] == sent
        nursery.cancel_scope.cancel()
    dev.close()


async def test_legacy_header_without_mergeable(mem, netns):
    tap, host = netns
    dev = VirtioNet(parse_net_options(f"tap={TAP}"), tap=tap)
    rx = MockDriver(mem, 0x100000, 64, max_size=1024)
    tx = MockDriver(mem, 0x600000, 64, index=1, max_size=1024)
    feats = dev.device_features & ~(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF)
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        dev.activate(feats, [rx.queue(), tx.queue()], RecordingInterrupt())
        assert dev.hdr_len == 10
        out = frame(b"\xff" * 6, dev.mac, b"legacy")
        tx.add_chain([bytes(10) + out])
        dev.queue_notify(1)
        assert await recv_ours(host) == out
        nursery.cancel_scope.cancel()
    dev.close()


def test_created_tap_is_removed_on_close():
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun on this machine")

    def body() -> tuple[bool, bool]:
        tap = TapBackend.open("pydmtap1")
        before = _exists("pydmtap1")
        tap.close()
        return tap.created, before and not _exists("pydmtap1")

    try:
        created, removed = in_new_netns(body)
    except (OSError, ConfigError) as e:
        pytest.skip(f"cannot create a tap in a network namespace here: {e}")
    assert created and removed


def _exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


async def test_link_status_and_config(mem, netns):
    tap, _ = netns
    dev = VirtioNet(parse_net_options(f"tap={TAP},mac=02:11:22:33:44:55"), tap=tap)
    assert dev.read_config(0, 10) == bytes.fromhex("021122334455") + b"\x01\x00\x01\x00"
    assert dev.counters() == {"mac": "02:11:22:33:44:55", "tap": TAP, "link_up": True,
                              "rx_frames": 0, "tx_frames": 0, "tx_dropped": 0}
    irq = RecordingInterrupt()
    async with trio.open_nursery() as nursery:
        await nursery.start(dev.run)
        rx = MockDriver(mem, 0x100000, 64, max_size=1024)
        tx = MockDriver(mem, 0x600000, 64, index=1, max_size=1024)
        dev.activate(dev.device_features, [rx.queue(), tx.queue()], irq)
        dev.set_link(False)
        assert irq.config_irqs == 1 and dev.read_config(6, 2) == b"\0\0"
        dev.set_link(True)
        assert irq.config_irqs == 2 and dev.read_config(6, 2) == b"\1\0"
        dev.write_config(0, b"\x02\xaa")  # a legacy driver sets its MAC
        assert dev.read_config(0, 2) == b"\x02\xaa"
        assert dev.counters()["mac"] == "02:aa:22:33:44:55"  # the monitor shows it too
        assert dev.counters()["link_up"] is True
        dev.write_config(6, b"\0\0")  # status is read-only
        assert dev.read_config(6, 2) == b"\1\0"
        nursery.cancel_scope.cancel()
    dev.close()


def test_mac_from_seed_is_acrn_dms():
    opts = parse_net_options("tap=tap0,mac_seed=vm1", slot=4, func=0)
    digest = hashlib.md5(b"4-0-vm1").digest()
    assert opts.mac == b"\x00\x16\x3e" + digest[:3]
    assert parse_net_options("tap=tap0", slot=4).mac == derive_mac(4, 0, None)
    assert derive_mac(4, 0, None) != derive_mac(5, 0, None)
    assert parse_net_options("tap=t,mac=02:0a:0b:0c:0d:0e").mac == bytes.fromhex("020a0b0c0d0e")


@pytest.mark.parametrize("text,word", [
    ("", "tap=<name> is required"),
    ("tap=averyveryverylongname", "tap=averyveryverylongname"),
    ("tap=t,mac=01:00:00:00:00:00", "multicast"),
    ("tap=t,mac=zz", "mac=zz"),
    ("tap=t,bogus", "bogus"),
])
def test_bad_options_name_themselves(text, word):
    with pytest.raises(ConfigError, match=word):
        parse_net_options(text)


def test_the_older_form_names_the_tap():
    """virtio-net,tap0 (launch scripts before acrn-dm 3.0): the first option without '='
    that contains "tap" or starts with "vmnet" is the tap's name; anything else is not."""
    from devicemodel.virtio.net.options import parse_net_options as parse

    old = parse("tap0,mac_seed=x", 4, 0)
    assert (old.tap, old.legacy_form) == ("tap0", True)
    assert old.mac == parse("tap=tap0,mac_seed=x", 4, 0).mac
    assert parse("tap_WaaG").tap == "tap_WaaG" and parse("vmnet1").tap == "vmnet1"
    assert parse("tap=t1").legacy_form is False
    with pytest.raises(ConfigError, match="unknown option 'eth0'"):
        parse("eth0")
    with pytest.raises(ConfigError, match="1..15"):
        parse("tap_much_too_long_name")
