"""Hostile virtqueue descriptor tables for every device (and the bare queue walker).

The properties and the ring layout are ``tests/support/hostile_rings.py``'s: guest RAM
between PROT_NONE guard pages, nothing escapes the device but a NEEDS_RESET, nothing
hangs (``trio.fail_after``), and the device writes guest RAM only inside device-writable
buffers and the used ring. Here they get the fuzz settings (a long mode) and a count.
The same hostile rings through the virtio-pci transport are in tests/component/
test_adversarial.py.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tests.support import hostile_rings as h

from ._common import count, drive, fuzz_settings


@fuzz_settings(150)
@given(h.rings)
def test_queue_walker(r):
    count("virtqueue.walker")
    h.pop_never_raises_anything_else(r)


@fuzz_settings(40)
@given(h.rings)
def test_rnd(r):
    count("virtqueue.rnd")
    h.rings_vs_rnd(r)


@fuzz_settings(40)
@given(r=h.rings, rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 99]))
def test_blk(hostile_image, r, rtype):
    count("virtqueue.blk")
    h.rings_vs_blk(hostile_image, r, rtype)


@fuzz_settings(40)
@given(r=h.rings, rx=st.booleans(),
       frames=st.lists(st.binary(min_size=0, max_size=3000), max_size=4))
def test_net(r, rx, frames):
    count("virtqueue.net")
    h.rings_vs_net(r, rx, frames)


@fuzz_settings(40)
@given(r=h.rings, index=st.sampled_from([0, 1, 2, 3, 4, 5]))
def test_console(tmp_path_factory, r, index):
    count("virtqueue.console")
    h.rings_vs_console(tmp_path_factory, r, index)


# --- the same hostile rings through the virtio-pci transport of a running sim VM -------
def test_hostile_rings_through_the_pci_transport(tmp_path):
    """One sim VM (tests/support/adversarial.py's devices); each input programs a device
    through its PCI registers with a hostile descriptor table and avail ring and kicks it. No
    handler or worker may raise; every device must still work afterwards (after a reset
    if it asked for one, and after a driver reset at the end). Hypothesis runs in a worker
    thread and drives the VM, which lives on the trio thread, through
    ``trio.from_thread``."""
    import trio

    from tests.support import adversarial as adv

    slots = (adv.SLOT_BLK, adv.SLOT_RND, adv.SLOT_CON, adv.SLOT_BLK_MODERN)

    async def main() -> None:
        image = adv.make_image(str(tmp_path))
        con = str(tmp_path / "con.out")
        args = ["-m", "256M", "-s", "0:0,hostbridge", "-s", f"{adv.SLOT_DUMMY},dummy",
                "-s", f"{adv.SLOT_BLK},virtio-blk,{image}",
                "-s", f"{adv.SLOT_RND},virtio-rnd,transitional",
                "-s", f"{adv.SLOT_CON},virtio-console,@file:con0={con}",
                "-s", f"{adv.SLOT_BLK_MODERN},virtio-blk,{image},modern", "fuzzvm"]
        sim = adv.SimHypervisor()
        async with adv.running(args, hypervisor=sim) as vm:
            env = adv.Env(vm, sim, con)
            for i, (slot, modern) in enumerate(((adv.SLOT_BLK, False), (adv.SLOT_RND, True),
                                                (adv.SLOT_CON, False),
                                                (adv.SLOT_BLK_MODERN, True))):
                env.guests[slot] = adv.VirtioGuest(vm, sim.guest(0), slot, modern=modern,
                                                   ram_base=0x0100_0000 + i * 0x0100_0000)
            await trio.to_thread.run_sync(run_examples, env)
            for slot in env.slots:
                if slot in env.guests:
                    # the last input set avail idx behind the driver's back: the driver's
                    # view of its rings is stale, so it starts over, as a real one would
                    await env.guests[slot].reset()
                assert await env.healthy(slot), f"slot {slot} broken after the fuzzing"

    def run_examples(env) -> None:
        @fuzz_settings(30)
        @given(r=h.rings, which=st.sampled_from(slots), rtype=st.sampled_from([0, 1, 4, 8]))
        def one(r, which, rtype):
            count("virtqueue.pci_transport")
            trio.from_thread.run(example, env, r, which, rtype)

        drive(one)

    async def example(env, r, which, rtype) -> None:
        vm = env.vm
        g = env.guests[which]
        errors = vm.server.stats["handler_error"]
        host = await g.host_features()
        feats = host & ~((0 if r["event_idx"] else adv.F_EVENT_IDX)
                         | (0 if r["indirect"] else adv.F_INDIRECT))
        with trio.fail_after(10):
            await g.init(features=feats)
            q = adv.data_queue(g)
            drv = g.drivers[q]
            mem = vm.memory
            payload = struct.pack("<IIQ", rtype, 0, 0) if which in (
                adv.SLOT_BLK, adv.SLOT_BLK_MODERN) else r["payload"][:16]
            for off in range(0, 0x10000, 64):
                mem.write(h.DATA + off, payload)
            for i, (a, n, f, nx) in enumerate(r["desc"]):
                drv.write_desc(i, a, n, f, nx)
            for base, table in ((h.TABLES[0], r["ind0"]), (h.TABLES[1], r["ind1"])):
                for i, (a, n, f, nx) in enumerate(table):
                    drv.write_desc(i, a, n, f, nx, table=base)
            for i, head in enumerate(r["avail"]):
                drv.set_avail_entry(i, head)
            drv.set_avail_idx(r["avail_idx"])
            await g.notify(q)
            for _ in range(50):
                await trio.sleep(0.002)
                if g.dev.device.limiter.borrowed_tokens == 0:
                    break
        assert vm.server.stats["handler_error"] == errors, "a register handler raised"
        failure = g.dev.device.failure or ""
        assert not failure.startswith("internal error"), failure
        if await g.needs_reset():
            await g.reset()

    trio.run(main)
