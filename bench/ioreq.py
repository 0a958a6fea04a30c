"""PIO round trips through the sim hypervisor: the IoreqServer versus a bare responder.

Both loops run the same guest side (a sim vCPU posting PIO reads) and the same handshake;
the bare responder answers a slot without decoding or dispatching it, so it is the sim's
own floor. The server's own cost is the difference of the medians; the ratio is printed.

    python bench/ioreq.py [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from devicemodel.bus import MmioBus, PortBus
from devicemodel.hsm import abi
from devicemodel.hsm.sim import SimHypervisor
from devicemodel.ioreq import IoreqServer, new_ioreq_page


class Answer:
    def read(self, offset: int, size: int) -> int:
        return 0x5A

    def write(self, offset: int, size: int, value: int) -> None:
        pass


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
    ports = PortBus()
    ports.register(0x3F8, 8, Answer(), "answer")
    for port in range(0x100, 0x1000, 0x40):  # a realistic number of other ranges
        ports.register(port, 8, Answer(), f"dev{port:x}")
    server = IoreqServer(sim, page, 1, ports, MmioBus())
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
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
