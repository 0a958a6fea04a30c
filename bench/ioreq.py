"""PIO round trips: the IoreqServer versus a bare responder, on the sim or the ACRN fake.

``--backend sim`` (default): both loops run the same guest side (a sim vCPU posting PIO
reads) and the same handshake; the bare responder answers a slot without decoding or
dispatching it, so it is the sim's own floor.

``--backend acrn-fake``: the real ACRN backend (``AcrnHypervisor``: its waiter thread in
ATTACH_IOREQ_CLIENT, NOTIFY_REQUEST_FINISH) on a fake HSM whose ATTACH blocks in a real
system call (bench/fake_hsm.py); the guest vCPU with the hypervisor and HSM dispatch is a
C process (bench/fake_hsm.c) that times each round trip, and the floor is the same C
program answering as a device model reduced to ATTACH, write, NOTIFY. Three server legs:
a handler served on the event loop (the waiter hands the loop a wake; after serving, the
loop polls the slots for ``LINGER_NS``), the same with no poll, and a ``vcpu_safe``
handler (answered on the waiter thread while the loop sleeps); each with the device
model's CPU time per request. ``--poll`` makes the vCPU spin for COMPLETE (a
completion-polling VM) instead of sleeping until NOTIFY wakes it; ``--gap US`` makes the
guest compute between exits, so the loop's poll ends before the next one (its cost).

The server's own cost is the difference of the medians; the ratio is printed. Legs run
interleaved, ``--rounds`` times, so machine noise hits them alike.

    python bench/ioreq.py [--backend sim|acrn-fake] [--requests N] [--rounds R] [--poll]
                          [--gap US]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_hsm import IpcHsm, Shared, build  # noqa: E402

from devicemodel.bus import MmioBus, PortBus  # noqa: E402
from devicemodel.hsm import abi  # noqa: E402
from devicemodel.hsm.acrn import AcrnHypervisor  # noqa: E402
from devicemodel.hsm.sim import SimHypervisor  # noqa: E402
from devicemodel.ioreq import LINGER_NS, IoreqServer, new_ioreq_page  # noqa: E402


class Answer:
    def read(self, offset: int, size: int) -> int:
        return 0x5A

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class SafeAnswer(Answer):
    """The same handler, declared safe to run off the loop (it touches nothing)."""

    vcpu_safe = True


def busy_ports(answer: Answer) -> PortBus:
    ports = PortBus()
    ports.register(0x3F8, 8, answer, "answer")
    for port in range(0x100, 0x1000, 0x40):  # a realistic number of other ranges
        ports.register(port, 8, Answer(), f"dev{port:x}")
    return ports


async def _bare_responder(sim: SimHypervisor, page: memoryview) -> None:
    """The minimum a responder must do: find the slot, write a value, notify."""
    while await sim.attach_ioreq_client():
        for vcpu in range(sim.vcpu_num):
            off = abi.slot_offset(vcpu)
            kh, state = abi.SLOT_STATE.unpack_from(page, off + abi.SLOT_KERNEL_HANDLED_OFF)
            if state == abi.IOREQ_STATE_PROCESSING and not kh:
                abi.SLOT_U32.pack_into(page, off + abi.SLOT_VALUE_OFF, 0x5A)
                sim.notify_request_finish(vcpu)


async def _measure(kind: str, requests: int) -> list[float]:
    sim = SimHypervisor(vcpus=1)
    page = new_ioreq_page()
    sim.create_vm("bench", page)
    server = IoreqServer(sim, page, 1, busy_ports(Answer()), MmioBus())
    sim.create_ioreq_client()
    sim.start_vm()
    g = sim.guest(0)
    samples: list[float] = []
    async with trio.open_nursery() as nursery:
        if kind == "server":
            nursery.start_soon(server.serve)
        else:
            nursery.start_soon(_bare_responder, sim, memoryview(page))
        for _ in range(200):  # warm up
            await g.pio_read(0x3F9, 1)
        clock = time.perf_counter_ns
        for _ in range(requests):
            t0 = clock()
            await g.pio_read(0x3F9, 1)
            samples.append((clock() - t0) / 1000)
        sim.destroy_ioreq_client()
    return samples


# --- the ACRN backend on the fake HSM ------------------------------------------------------
WARMUP = 500  # requests the poster sends before it starts timing


def _poster(exe: Path, shared: Shared, requests: int, poll: bool, gap_us: int
            ) -> subprocess.Popen:
    return subprocess.Popen(
        [str(exe), "poster", *shared.args(), str(requests), str(WARMUP),
         "poll" if poll else "notify", str(gap_us)],
        pass_fds=shared.fds, stdout=subprocess.PIPE, text=True)


def _samples(poster: subprocess.Popen) -> list[float]:
    out, _ = poster.communicate(timeout=600)
    if poster.returncode != 0:
        raise SystemExit(f"the fake vCPU failed (exit {poster.returncode})")
    return [int(line) / 1000 for line in out.split()]


def acrn_bare(exe: Path, requests: int, poll: bool, gap_us: int) -> list[float]:
    shared = Shared()
    try:
        responder = subprocess.Popen([str(exe), "responder", *shared.args()],
                                     pass_fds=shared.fds)
        samples = _samples(_poster(exe, shared, requests, poll, gap_us))
        shared.destroy_client()
        responder.wait(timeout=10)
        return samples
    finally:
        shared.close()


async def acrn_server(exe: Path, requests: int, poll: bool, gap_us: int, answer: Answer,
                      linger_ns: int) -> tuple[list[float], float, str]:
    """The round trips, the device model's CPU µs per request, and a note."""
    shared = Shared()
    hv = AcrnHypervisor(IpcHsm(shared, poll=poll))
    try:
        hv.create_vm("bench", shared.page)
        server = IoreqServer(hv, shared.page, 1, busy_ports(answer), MmioBus())
        server.linger_ns = linger_ns
        hv.create_ioreq_client()
        hv.start_vm()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve)
            cpu = time.process_time()
            poster = _poster(exe, shared, requests, poll, gap_us)
            samples = await trio.to_thread.run_sync(_samples, poster)
            cpu = (time.process_time() - cpu) / (requests + WARMUP) * 1e6
            waiter = getattr(hv, "_waiter", None)
            note = (f"{waiter.loop_wakes} loop wakes, {waiter.served_here} rounds on the "
                    "waiter thread") if waiter is not None else ""
            hv.destroy_ioreq_client()  # ATTACH returns -ENODEV: the server ends
        return samples, cpu, note
    finally:
        hv.close()
        shared.close()


#: the server's legs: (key, what it shows, handler, how long the loop polls after serving)
LEGS = (("loop", "handler on the loop", Answer, LINGER_NS),
        ("nopoll", "… with no poll", Answer, 0),
        ("waiter", "vcpu_safe handler", SafeAnswer, LINGER_NS))


def main_acrn(args: argparse.Namespace) -> None:
    med: dict[str, list[float]] = {k: [] for k in ("bare", *(leg[0] for leg in LEGS))}
    cpu: dict[str, list[float]] = {leg[0]: [] for leg in LEGS}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        for _ in range(args.rounds):  # interleaved
            med["bare"].append(statistics.median(
                acrn_bare(exe, args.requests, args.poll, args.gap)))
            for leg, _, answer, linger in LEGS:
                samples, used, notes[leg] = trio.run(
                    acrn_server, exe, args.requests, args.poll, args.gap, answer(), linger)
                med[leg].append(statistics.median(samples))
                cpu[leg].append(used)
    bare = statistics.median(med["bare"])
    mode = "completion polling" if args.poll else "NOTIFY wakes the vCPU"
    gap = f"; the guest computes {args.gap} us between exits" if args.gap else ""
    print(f"PIO round trip, ACRN backend on a fake HSM (ATTACH blocks in read(2); {mode}"
          f"{gap}), {args.requests} requests x {args.rounds} rounds, medians")
    print(f"  bare C responder (floor):         {bare:7.2f} us   rounds "
          + " ".join(f"{m:.1f}" for m in med["bare"]))
    for leg, what, _, linger in LEGS:
        m = statistics.median(med[leg])
        poll = f"polls {linger // 1000} us after serving" if linger else "no poll"
        print(f"  IoreqServer, {what + ':':21s} {m:7.2f} us   rounds "
              + " ".join(f"{x:.1f}" for x in med[leg]) + f"   ({notes[leg]}; {poll})")
        print(f"    server's added cost: {m - bare:7.2f} us per request (target <= 20); "
              f"ratio {m / bare:.2f}; device-model CPU {statistics.median(cpu[leg]):.1f} us"
              " per request")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("sim", "acrn-fake"), default="sim")
    ap.add_argument("--requests", type=int, default=None,
                    help="per round (default 20000 sim, 5000 acrn-fake)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--poll", action="store_true",
                    help="acrn-fake: the vCPU polls for completion instead of sleeping")
    ap.add_argument("--gap", type=int, default=0, metavar="US",
                    help="acrn-fake: the guest computes this long between exits")
    args = ap.parse_args()
    if args.backend == "acrn-fake":
        args.requests = args.requests or 5000
        main_acrn(args)
        return
    args.requests = args.requests or 20000
    med: dict[str, list[float]] = {"bare": [], "server": []}
    for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
        for kind in ("bare", "server"):
            samples = trio.run(_measure, kind, args.requests)
            med[kind].append(statistics.median(samples))
    bare = statistics.median(med["bare"])
    server = statistics.median(med["server"])
    print(f"PIO round trip, sim hypervisor, {args.requests} requests x {args.rounds} rounds")
    print(f"  bare responder (floor): {bare:7.2f} us median  {1e6 / bare:10.0f} req/s")
    print(f"  IoreqServer:            {server:7.2f} us median  {1e6 / server:10.0f} req/s")
    print(f"  server's own cost:      {server - bare:7.2f} us per request (target <= 10)")
    print(f"  ratio server/bare:      {server / bare:7.2f}")


if __name__ == "__main__":
    main()
