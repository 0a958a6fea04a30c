"""A guest cannot make the device model grow without bound.

* in-flight blk requests: a queue kept full of 64 KiB requests never has more device
  tasks than the queue has chains, nor more I/O threads than the device's limiter;
* net rx: frames the guest has no buffers for stay in the tap (the kernel paces the host);
  the device takes one frame per guest buffer;
* console backlog: a port whose peer never reads stops taking the guest's output once the
  socket is full (the guest's ring backs up), instead of buffering it;
* log volume: thousands of rejected requests and failing drivers produce a bounded number
  of log records (devicemodel/ratelimit.py);
* and the Python heap (tracemalloc) does not grow with the length of the attack.
"""

from __future__ import annotations

import gc
import tracemalloc

import trio

from devicemodel.guestkit import hostile
from devicemodel.guestkit.hostile import Observed
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.vm import running


async def test_blk_in_flight_is_bounded_by_the_queue(tmp_path) -> None:
    args, _ = hostile.vm_args(str(tmp_path))
    sim = SimHypervisor()
    async with running(args, hypervisor=sim) as vm:
        base_tasks = hostile.count_tasks()
        obs = Observed()
        await hostile.blk_flood(obs, vm, sim, rounds=6)
        dev = vm.device(hostile.SLOT_BLK).device
        queue_chains = dev.queue_max_size(0) // 3
        assert obs.blk_requests == 6 * queue_chains
        assert obs.max_tasks <= base_tasks + queue_chains + 8
        assert obs.max_threads <= 1 + dev.limiter.total_tokens + 8  # + other devices' pools


async def test_console_peer_that_never_reads_backs_up_the_guest(tmp_path) -> None:
    args, sock = hostile.vm_args(str(tmp_path))
    sim = SimHypervisor()
    async with running(args, hypervisor=sim) as vm:
        obs = Observed()
        peer = await hostile.console_backlog(obs, vm, sim, sock, rounds=400)
        try:
            # 12.5 MiB offered; the device may hold what the socket buffers plus one chunk
            assert obs.console_bytes_offered >= 2 << 20
            assert obs.console_bytes_taken < 4 << 20
            assert obs.console_bytes_taken < obs.console_bytes_offered
        finally:
            peer.close()


async def test_net_rx_frames_wait_in_the_tap() -> None:
    obs = Observed()
    tap = await hostile.net_rx_flood(obs, frames=5000, guest_buffers=4)
    assert obs.net_frames_taken <= 4
    assert any("tap full" in n for n in obs.notes), "the host never felt back pressure"
    assert obs.net_frames_sent < 5000
    tap.close()


async def test_log_volume_is_rate_limited(tmp_path) -> None:
    args, _ = hostile.vm_args(str(tmp_path))
    sim = SimHypervisor()
    async with running(args, hypervisor=sim) as vm:
        obs = Observed()
        with trio.fail_after(60):
            await hostile.log_flood(obs, vm, sim, rounds=5000)
        assert obs.bad_requests == 5000
        # every rate limiter lets 10 through per 5 s window (+1 "suppressed" line), and a
        # handful of limiters are involved: far below one line per bad request
        assert obs.log_records < 200, obs.log_records


async def test_heap_does_not_grow_with_the_attack(tmp_path) -> None:
    args, sock = hostile.vm_args(str(tmp_path))
    sim = SimHypervisor()
    async with running(args, hypervisor=sim) as vm:
        obs = Observed()
        await hostile.blk_flood(obs, vm, sim, rounds=2)  # warm up caches and pools
        await hostile.log_flood(obs, vm, sim, rounds=200)
        gc.collect()
        tracemalloc.start()
        try:
            await hostile.blk_flood(obs, vm, sim, rounds=2)
            await hostile.log_flood(obs, vm, sim, rounds=200)
            gc.collect()
            short, _ = tracemalloc.get_traced_memory()
            await hostile.blk_flood(obs, vm, sim, rounds=10)
            await hostile.log_flood(obs, vm, sim, rounds=2000)
            gc.collect()
            long, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # 5x (blk) and 10x (log) the attack: the heap may wobble, not grow in proportion
        assert long - short < 2 << 20, f"heap grew by {(long - short) >> 10} KiB"
