"""PIO exit round trips on the KVM backend: the whole ACRN-shaped path versus a bare loop.

Both sides run the same guest (devicemodel/guestkit/programs/loop.c: N `outl` to port 0xE4,
one exit each) on the same KvmHypervisor VM configuration.

* **path**: KVM_EXIT_IO → request slot (PENDING, HSM half, PROCESSING) → IoreqServer →
  PortBus → handler → NOTIFY_REQUEST_FINISH → the vCPU thread copies the value back and
  re-enters KVM_RUN.  A real Vm serves it, two ways: a ``vcpu_safe`` handler (as the
  UART, RTC and PCI config are) is answered on the vCPU thread itself while the loop
  sleeps (``loopgate.py``); any other handler on the loop, which an eventfd wakes and
  whose NOTIFY wakes the vCPU thread again.
* **bare**: the vCPU thread answers the exit itself and re-enters KVM_RUN at once, as a
  minimal KVM VMM would; this is the floor set by KVM (and, on the development
  machines, by its instruction emulator running the guest's kernel-mode loop).

The figure is the median time between consecutive exits, in µs, and path/bare; the legs
run interleaved, ``--rounds`` times. ``--busy`` keeps one core busy with another process
(a spinning child) while every leg runs.

    python bench/exit_roundtrip.py [--exits N] [--rounds R] [--busy]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devicemodel.guestkit.kvm_programs import (  # noqa: E402
    DEBUGEXIT,
    LOAD_ADDR,
    GuestRun,
    build,
    pm32_regs,
    run_guest,
)
from devicemodel.hsm.abi import MEM_ACCESS_RWX, MEM_TYPE_WB  # noqa: E402
from devicemodel.hsm.kvm import KvmHypervisor, kvm_usable, raw_ioctl  # noqa: E402
from devicemodel.hsm.kvm import uapi as k  # noqa: E402
from devicemodel.ioreq import new_ioreq_page  # noqa: E402
from devicemodel.memory import GuestMemory  # noqa: E402

LOOP_PORT = 0xE4
COUNT_PORT = 0xE5


class Stamps:
    """Port 0xE4 records a timestamp per write; 0xE5 (at offset 1) answers the count."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.t: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return self.count if offset == 1 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.t.append(time.perf_counter_ns())


class SafeStamps(Stamps):
    """The same, declared safe to answer on the vCPU thread (plain state, as a UART)."""

    vcpu_safe = True


def deltas_us(stamps: list[int]) -> list[float]:
    return [(b - a) / 1000 for a, b in zip(stamps, stamps[1:], strict=False)]


async def path_round(image: bytes, exits: int, safe: bool = False) -> list[float]:
    stamps = (SafeStamps if safe else Stamps)(exits)

    def setup(run: GuestRun) -> None:
        run.vm.ports.register(LOOP_PORT, 8, stamps, "bench-loop")

    run = await run_guest(image, setup=setup, timeout=120)
    if run.verdict != 1 or len(stamps.t) != exits:
        raise SystemExit(f"path round failed: verdict {run.verdict}, {len(stamps.t)} exits, "
                         f"{run.exit_reason}")
    return deltas_us(stamps.t)


def bare_round(image: bytes, exits: int) -> list[float]:
    """The same VM setup, but the vCPU thread answers every exit itself."""
    hv = KvmHypervisor(vcpus=1)
    page = new_ioreq_page()
    mem = GuestMemory(128 << 20, name="bench-ram")
    hv.create_vm("bench", page)
    try:
        hv.set_memseg(0, mem.regions[0].mm, MEM_ACCESS_RWX | MEM_TYPE_WB)
        mem.write(LOAD_ADDR, image)
        hv.set_vcpu_regs(0, pm32_regs(LOAD_ADDR))
        vc = hv.vcpu(0)  # no vCPU thread runs: this loop drives KVM_RUN itself
        stamps: list[int] = []
        errors: list[str] = []

        def loop() -> None:
            run, fd = vc.kvm_run, vc.fd
            io = k.RUN_IO
            while True:
                if raw_ioctl(fd, k.KVM_RUN, None) < 0:
                    continue  # EINTR/EAGAIN: go again
                (reason,) = k.RUN_U32.unpack_from(run, k.RUN_EXIT_REASON_OFF)
                if reason != k.KVM_EXIT_IO:
                    errors.append(f"exit {reason}")
                    return
                direction, size, port, count, off = io.unpack_from(run, k.RUN_EXIT_OFF)
                if port == LOOP_PORT:
                    stamps.append(time.perf_counter_ns())
                elif port == DEBUGEXIT:
                    return
                elif direction == k.KVM_EXIT_IO_IN:
                    value = exits if port == COUNT_PORT else 0x60  # COM1 LSR: ready
                    run[off : off + size] = value.to_bytes(4, "little")[:size]

        t = threading.Thread(target=loop, name="bench-bare-vcpu")
        t.start()
        t.join()
        if errors or len(stamps) != exits:
            raise SystemExit(f"bare round failed: {errors}, {len(stamps)} exits")
        return deltas_us(stamps)
    finally:
        hv.destroy_vm()
        mem.close()
        page.close()


@contextmanager
def busy_core(on: bool):
    """A child process spinning on one core for as long as the block runs."""
    if not on:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it get going
        yield
    finally:
        hog.kill()
        hog.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", action="store_true",
                    help="keep one core busy with another process during every leg")
    args = ap.parse_args()
    why = kvm_usable()
    if why:
        raise SystemExit(f"no usable KVM: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        _, image = build("loop", Path(tmp))
    legs: dict[str, list[float]] = {"bare": [], "safe": [], "loop": []}
    rounds: dict[str, list[float]] = {k: [] for k in legs}
    with busy_core(args.busy):
        for _ in range(args.rounds):  # interleaved, so machine noise hits every leg alike
            for leg in legs:
                if leg == "bare":
                    got = bare_round(image, args.exits)
                else:
                    got = trio.run(path_round, image, args.exits, leg == "safe")
                legs[leg] += got
                rounds[leg].append(statistics.median(got))
    b = statistics.median(legs["bare"])
    busy = ", one core kept busy by another process" if args.busy else ""
    print(f"PIO exit round trip, median of {len(legs['bare'])} exits in {args.rounds} "
          f"rounds{busy}")
    print(f"  bare KVM loop (answered in the vCPU thread):   {b:8.2f} µs   rounds "
          + " ".join(f"{m:.1f}" for m in rounds["bare"]))
    for leg, what in (("safe", "vcpu_safe handler (on the vCPU thread)"),
                      ("loop", "handler on the loop (two hand-offs) ")):
        p = statistics.median(legs[leg])
        print(f"  KVM → slot → IoreqServer → completion, {what}: {p:8.2f} µs   rounds "
              + " ".join(f"{m:.1f}" for m in rounds[leg]))
        print(f"    ratio path/bare: {p / b:.2f}  (path p90 "
              f"{statistics.quantiles(legs[leg], n=10)[-1]:.2f} µs, bare p90 "
              f"{statistics.quantiles(legs['bare'], n=10)[-1]:.2f} µs)")


if __name__ == "__main__":
    main()
