"""Peak RSS of the device model under a hostile guest, beside an idle VM's.

Each workload runs in a fresh process (so peaks do not mix): ``idle`` is a sim VM with
virtio-blk, virtio-rnd and a virtio-console socket port whose guest does nothing;
``hostile`` is the same VM while the guest keeps blk's queue full of 64 KiB requests,
writes to a console port whose peer never reads, floods the log with rejected requests
and broken rings, and a host floods virtio-net with frames the guest has no buffers for
(devicemodel/guestkit/hostile.py). Printed: VmHWM (peak resident set, which includes
guest RAM pages the guest touched, since RAM is a shared memfd mapping) and RssAnon at
the end (the device model's own heap), and the hostile/idle ratio of each. ``--rounds``
scales the attack: a bounded device model shows the same peak for 1x and 10x.

    python bench/hostile_rss.py [--rounds N] [--scale 1 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(kind: str, rounds: int) -> None:
    import logging

    import trio

    sys.path.insert(0, ROOT)
    from devicemodel.guestkit import hostile

    logging.basicConfig(level=logging.CRITICAL)
    if kind == "idle":
        trio.run(hostile.idle, 1.0)
    else:
        trio.run(hostile.hostile, rounds)
    print(json.dumps({"hwm": status_kib("VmHWM"), "anon": status_kib("RssAnon")}))


def measure(kind: str, rounds: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--rounds", str(rounds)],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--scale", type=int, nargs="*", default=[1, 10])
    ap.add_argument("--child", choices=["idle", "hostile"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.rounds)
        return
    idle = measure("idle", 0)
    print("peak RSS, sim VM (virtio-blk, virtio-rnd, virtio-console socket; virtio-net on "
          "the mock transport)")
    print(f"  idle VM:                 VmHWM {idle['hwm'] / 1024:7.1f} MiB   "
          f"RssAnon {idle['anon'] / 1024:7.1f} MiB")
    for s in args.scale:
        r = args.rounds * s
        h = measure("hostile", r)
        print(f"  hostile x{r:<5}          VmHWM {h['hwm'] / 1024:7.1f} MiB   "
              f"RssAnon {h['anon'] / 1024:7.1f} MiB   ratio hostile/idle: "
              f"VmHWM {h['hwm'] / idle['hwm']:.2f}  RssAnon {h['anon'] / idle['anon']:.2f}")


if __name__ == "__main__":
    main()
