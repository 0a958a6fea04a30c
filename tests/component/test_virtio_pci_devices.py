"""Every virtio device through the transport, as a Linux guest drives it on the sim
hypervisor: rnd and console in legacy and modern mode, net over a real tap, and the
transport's variants (transitional, PIO notify, MSI-X entry rewrites, masking, polling,
the PCI_CFG window, BAR moves)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from pathlib import Path

import pytest
import trio

from devicemodel.config import ConfigError, parse_args
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.virtio.console import VIRTIO_CONSOLE_F_MULTIPORT
from devicemodel.virtio.device import STATUS_DRIVER_OK
from devicemodel.virtio.pci import VirtioPci
from devicemodel.vm import Vm
from tests.support.netns import private_netns
from tests.support.pci_guest import PciGuest
from tests.support.virtio_pci_driver import (
    NUMQ,
    VirtioPciDriver,
    blk_read,
    count_trapped_kicks,
    vm_with,
)


async def _ready(drv: VirtioPciDriver, queues: list[int], *, msix: bool = True,
                 want: int = ~0) -> None:
    await drv.init(want)
    if msix:
        await drv.enable_msix(len(queues) + 1)
        assert await drv.set_config_vector(0) == 0
    for i in queues:
        await drv.setup_queue(i, vector=i + 1 if msix else None)
    await drv.driver_ok()


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
async def test_rnd_gives_random_bytes(legacy: bool) -> None:
    mode = "legacy" if legacy else "modern"
    async with vm_with(f"5,virtio-rnd,{mode}") as (vm, sim, pci):
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=legacy)
        assert drv.fn.device == (0x1005 if legacy else 0x1044)
        assert drv.fn.class_code == 0x100000
        await _ready(drv, [0])
        q = drv.queues[0]
        heads = [q.add_chain([], [32]) for _ in range(4)]
        await drv.kick(0)
        await drv.wait_msi(1)
        used = dict(await drv.wait_used(0, 4))
        assert all(used[h] == 32 for h in heads)
        blobs = {q.written(h) for h in heads}
        assert len(blobs) == 4 and all(len(b) == 32 and b != b"\xa5" * 32 for b in blobs)


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
async def test_console_line_both_ways_over_a_socket(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "con.sock"
    mode = "legacy" if legacy else "modern"
    async with vm_with(f"6,virtio-console,@socket:con0={path},{mode}") as (vm, sim, pci):
        drv = await VirtioPciDriver.probe(sim, pci, 6, legacy=legacy)
        assert drv.fn.device == (0x1003 if legacy else 0x1043)
        await _ready(drv, [0, 1], want=~VIRTIO_CONSOLE_F_MULTIPORT)
        rx, tx = drv.queues[0], drv.queues[1]
        r = rx.add_chain([], [256])
        await drv.kick(0)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(str(path))
        await client.send(b"hello guest\n")
        await drv.wait_msi(1)
        [(head, n)] = await drv.wait_used(0)
        assert head == r and rx.written(r, n) == b"hello guest\n"
        t = tx.add_chain([b"hello host\n"], [])
        await drv.kick(1)
        await drv.wait_msi(2)
        assert await drv.wait_used(1) == [(t, 0)]
        got = b""
        with trio.fail_after(5):
            while not got.endswith(b"\n"):
                got += await client.recv(100)
        assert got == b"hello host\n"
        client.close()


# --- virtio-net over a real tap -------------------------------------------------------------
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5


async def test_net_exchanges_frames_with_a_tap() -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun missing")
    sim = SimHypervisor()
    cfg = parse_args(["-m", "256M", "-s", "7,virtio-net,tap=pydmvp0,mac=02:00:00:00:00:07,modern",
                      "vm1"])
    vm = Vm(cfg, sim)
    with private_netns():
        with contextlib.suppress(OSError), open(
                "/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
            f.write("1")  # no IPv6 neighbour discovery frames on our tap
        try:
            vm.build()
        except ConfigError as e:
            pytest.skip(f"no tap here: {e}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"pydmvp0", IFF_UP))
        host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        host.bind(("pydmvp0", 0))
    host.setblocking(False)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vm.run)
            pci = PciGuest(sim.guest(0))
            drv = await VirtioPciDriver.probe(sim, pci, 7, legacy=False)
            assert (drv.fn.device, drv.fn.class_code) == (0x1041, 0x020000)
            await _ready(drv, [0, 1])
            mac = bytes([await drv.config_read(i, 1) for i in range(6)])  # virtio_cread_bytes
            assert mac == bytes.fromhex("020000000007")
            rx, tx = drv.queues[0], drv.queues[1]
            for _ in range(8):
                rx.add_chain([], [1526 + 12])
            await drv.kick(0)
            frame = b"\x02\x00\x00\x00\x00\x07" + b"\x02\x00\x00\x00\x00\x99" + \
                struct.pack("!H", ETHERTYPE) + b"to the guest".ljust(46, b".")
            host.send(frame)
            await drv.wait_msi(1)
            with trio.fail_after(5):
                while True:  # skip anything else the kernel put on the wire
                    [(head, n)] = await drv.wait_used(0)
                    if rx.written(head, n)[12:] == frame:
                        break
            out = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x07" + struct.pack("!H", ETHERTYPE) + \
                b"to the host".ljust(46, b".")
            t = tx.add_chain([bytes(12) + out], [])
            await drv.kick(1)
            await drv.wait_msi(2)
            assert await drv.wait_used(1) == [(t, 0)]
            with trio.fail_after(5):
                while True:
                    await trio.lowlevel.wait_readable(host)
                    got = host.recv(2048)
                    if got[12:14] == struct.pack("!H", ETHERTYPE):
                        break
            assert got == out
            vm.poweroff()
    finally:
        host.close()


# --- transport variants ---------------------------------------------------------------------
async def test_transitional_serves_a_legacy_and_a_modern_driver(tmp_path: Path) -> None:
    img = tmp_path / "t.img"
    img.write_bytes(b"T" * 4096 * 4)
    async with vm_with(f"3,virtio-blk,{img},transitional") as (vm, sim, pci):
        drv = await VirtioPciDriver.probe(sim, pci, 3, legacy=True)
        assert (drv.fn.device, {b.idx for b in drv.fn.bars}) == (0x1001, {0, 1, 4})
        for legacy in (True, False):
            d = await VirtioPciDriver.probe(sim, pci, 3, legacy=legacy)
            features = await d.init()
            assert bool(features >> 32) is not legacy
            q = await d.setup_queue(0)
            await d.driver_ok()
            h = blk_read(q, 0, 512)
            await d.kick(0)
            assert await d.wait_used(0) == [(h, 513)] and q.written(h)[:-1] == b"T" * 512
            assert vm.device(3).device.features == features
            await d.reset()


async def test_pio_notify_bar2_with_datamatch() -> None:
    async with vm_with("5,virtio-rnd,modern,pio_notify") as (vm, sim, pci):
        t: VirtioPci = vm.device(5)
        trapped = count_trapped_kicks(t)
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        assert drv.caps[2].bar == 2 and drv.caps[2].multiplier == 0  # Linux takes the first
        await _ready(drv, [0])
        assert drv.notify_addr[0] == (True, drv.bar(2))
        regs = {(r.address, r.length, r.pio, r.datamatch) for r in sim._ioeventfds}
        assert (drv.bar(2), 2, True, 0) in regs
        h = drv.queues[0].add_chain([], [16])
        await drv.kick(0)
        assert await drv.wait_used(0) == [(h, 16)] and trapped == []


async def test_msix_entry_rewrite_and_masking() -> None:
    """Linux moving an interrupt (affinity) rewrites the entry: the irqfd follows it. A
    masked vector is held in the PBA and delivered on unmask (the direct path)."""
    async with vm_with("5,virtio-rnd,modern") as (vm, sim, pci):
        t: VirtioPci = vm.device(5)
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        await _ready(drv, [0])
        q = drv.queues[0]
        q.add_chain([], [8])
        await drv.kick(0)
        await drv.wait_msi(1)
        await drv.wait_used(0)
        # affinity change: mask, new address/data, unmask
        await drv.msix_entry_write(1, 12, 1)
        await drv.msix_entry_write(1, 0, 0xFEE0_1000)
        await drv.msix_entry_write(1, 8, 0x77)
        await drv.msix_entry_write(1, 12, 0)
        assert t.msix is not None and t.msix.delivery.routes[1] == (0xFEE0_1000, 0x77)
        q.add_chain([], [8])
        await drv.kick(0)
        await drv.wait_used(0)
        with trio.fail_after(5):
            while (0xFEE0_1000, 0x77) not in sim.msis:
                await trio.sleep(0.001)
        # masked: nothing is sent, the PBA bit is set, unmasking delivers it
        await drv.msix_entry_write(1, 12, 1)
        sent = len(sim.msis)
        q.add_chain([], [8])
        await drv.kick(0)
        await drv.wait_used(0)
        await trio.sleep(0.01)
        assert len(sim.msis) == sent and t.msix is not None and t.msix.pba & 2
        await drv.msix_entry_write(1, 12, 0)
        assert sim.msis[-1] == (0xFEE0_1000, 0x77) and not t.msix.pba


async def test_virtio_poll_needs_no_kicks() -> None:
    async with vm_with("5,virtio-rnd,modern", extra=("--virtio_poll", "200000")) as (
            vm, sim, pci):
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        await _ready(drv, [0])
        h = drv.queues[0].add_chain([], [16])  # published, never kicked
        assert await drv.wait_used(0) == [(h, 16)]


async def test_pci_cfg_window_reaches_the_bar() -> None:
    """VIRTIO_PCI_CAP_PCI_CFG: bar/offset/length in config space, data through the window."""
    async with vm_with("5,virtio-rnd,modern") as (vm, sim, pci):
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        pos = drv.caps[5].pos
        await pci.write(drv.bdf, pos + 4, 1, 4)
        await pci.write(drv.bdf, pos + 8, 4, NUMQ)
        await pci.write(drv.bdf, pos + 12, 4, 2)
        assert await pci.read(drv.bdf, pos + 16, 4) & 0xFFFF == 1
        await pci.write(drv.bdf, pos + 8, 4, 20)  # device_status, 1 byte
        await pci.write(drv.bdf, pos + 12, 4, 1)
        await pci.write(drv.bdf, pos + 16, 4, 1)
        assert await drv.get_status() == 1
        await pci.write(drv.bdf, pos + 12, 4, 3)  # bad length: nothing happens
        await pci.write(drv.bdf, pos + 16, 4, 0)
        assert await drv.get_status() == 1


async def test_bar_move_moves_the_ioeventfd() -> None:
    async with vm_with("5,virtio-rnd,modern") as (vm, sim, pci):
        t: VirtioPci = vm.device(5)
        trapped = count_trapped_kicks(t)
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        await _ready(drv, [0])
        old = drv.bar(4)
        new = old + 0x10_0000
        await pci.write(drv.bdf, 0x04, 2, 0x4)  # decoding off
        await pci.write(drv.bdf, 0x20, 4, new & 0xFFFF_FFFF)
        await pci.write(drv.bdf, 0x04, 2, 0x7)
        next(b for b in drv.fn.bars if b.idx == 4).addr = new
        drv.notify_addr[0] = (False, new + 0x3000)
        addrs = {r.address for r in sim._ioeventfds}
        assert new + 0x3000 in addrs and old + 0x3000 not in addrs
        h = drv.queues[0].add_chain([], [16])
        await drv.kick(0)
        assert await drv.wait_used(0) == [(h, 16)] and trapped == []
        assert await drv.get_status() & STATUS_DRIVER_OK


def test_wrong_options_name_themselves(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    cases = {f"3,virtio-blk,{img},bogus": "bogus",
             f"3,virtio-blk,{img},legacy,modern": "legacy and modern",
             "3,virtio-rnd,legacy,pio_notify": "pio_notify",
             "3,virtio-rnd,frobnicate=1": "frobnicate",
             "3,virtio-console,@nosuch:x": "nosuch",
             "3,virtio-net,mac=01:02:03:04:05:06,tap=x": "mac"}
    for slot, word in cases.items():
        vm = Vm(parse_args(["-s", slot, "vm1"]), SimHypervisor())
        with pytest.raises(ConfigError, match=word):
            vm.build()


async def test_msix_direct_injection_without_irqfd() -> None:
    async with vm_with("5,virtio-rnd,modern,no_irqfd") as (vm, sim, pci):
        t: VirtioPci = vm.device(5)
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        await _ready(drv, [0])
        before = vm.irq.msi_count
        h = drv.queues[0].add_chain([], [16])
        await drv.kick(0)
        await drv.wait_msi(1)
        assert await drv.wait_used(0) == [(h, 16)]
        assert t.irqfd_sent == 0 and vm.irq.msi_count == before + 1
        assert not sim._irqfds


async def test_vm_reset_returns_the_function_to_power_on(tmp_path: Path) -> None:
    """The VM reset path (PciBus.reset): status 0, queues forgotten, MSI-X off, ioeventfds
    gone; the guest can enumerate and drive the function from scratch."""
    async with vm_with("5,virtio-rnd,modern") as (vm, sim, pci):
        t: VirtioPci = vm.device(5)
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        await _ready(drv, [0])
        assert sim._ioeventfds and t.active
        assert vm.pci is not None
        vm.pci.reset()
        assert not t.active and t.status == 0 and not t.queues[0].ready
        assert not sim._ioeventfds and t.msix is not None and not t.msix.enabled
        assert not sim._irqfds
        drv2 = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        await _ready(drv2, [0])
        h = drv2.queues[0].add_chain([], [16])
        await drv2.kick(0)
        assert await drv2.wait_used(0) == [(h, 16)]


async def test_ring_ranges_are_the_started_queues_rings() -> None:
    """What a server whose guest memory can go away asks (vfio-user's DMA_UNMAP): the
    rings the device uses on its own, none before DRIVER_OK or after a reset."""
    async with vm_with("5,virtio-rnd,modern") as (vm, sim, pci):
        t: VirtioPci = vm.device(5)
        assert t.ring_ranges() == []
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        await drv.init()
        await drv.setup_queue(0)
        assert t.ring_ranges() == []  # programmed, not started
        await drv.driver_ok()
        q = drv.queues[0]
        n = q.size
        assert t.ring_ranges() == [(q.desc_addr, 16 * n), (q.avail_addr, 6 + 2 * n),
                                   (q.used_addr, 6 + 8 * n)]
        await drv.reset()
        assert t.ring_ranges() == []


async def test_a_reset_completes_and_can_be_waited_for() -> None:
    """Status 0 while the device's worker runs: status reads non-zero until the worker is
    done (a modern driver polls); a server that can hold its peer's next access waits."""
    async with vm_with("5,virtio-rnd,modern") as (vm, sim, pci):
        t: VirtioPci = vm.device(5)
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        await _ready(drv, [0])
        assert t.active and not t.resetting
        t.write_status(0, modern=True)  # as the register write does, no checkpoint after
        assert t.resetting and t.read_status() != 0
        with trio.fail_after(5):
            await t.wait_reset_done()
        assert not t.resetting and t.read_status() == 0


async def test_modern_intx_and_isr_region() -> None:
    """A modern driver that got no MSI-X (Linux's vp_find_vqs_intx): INTx, ISR at BAR4+0x1000,
    read-to-clear; a config change shows as ISR bit 1."""
    async with vm_with("5,virtio-rnd,modern") as (vm, sim, pci):
        t: VirtioPci = vm.device(5)
        drv = await VirtioPciDriver.probe(sim, pci, 5, legacy=False)
        await _ready(drv, [0], msix=False)
        gsi = t.intx.gsi
        h = drv.queues[0].add_chain([], [8])
        await drv.kick(0)
        with trio.fail_after(5):
            while sim.irqlines[gsi] != 0:
                await trio.sleep(0.001)
        assert await drv.read_isr() == 1 and sim.irqlines[gsi] == 1
        assert await drv.wait_used(0) == [(h, 8)]
        gen = await drv.common_read(21, 1)
        t.device.config_changed()
        assert sim.irqlines[gsi] == 0 and await drv.read_isr() == 2
        assert await drv.common_read(21, 1) == (gen + 1) & 0xFF
