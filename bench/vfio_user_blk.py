"""virtio-blk over vfio-user beside virtio-blk over vhost-user, both acrn-pydm, one guest.

    python bench/vfio_user_blk.py [--reps 3] [--seconds 2] [--tests seqread,rand1]

The same page-cached 512 MiB raw image is /dev/vda through ``acrn-pydm vhost-user`` (QEMU
owns the PCI function and the virtio transport; we serve the rings on a data-plane
thread) and /dev/vdb through ``acrn-pydm vfio-user`` (our whole PCI function: every
register access, notify included, is a REGION_WRITE message on the socket, every
interrupt an MSI-X eventfd we signal). QEMU 11.1 from the Debian 13 root
(devicemodel/guestkit/trixie.py), TCG, -smp 1, the stock Debian cloud kernel; the guest
program and the interleaving are bench/vhost_blk.py's. Prints medians, the ratio
vfio-user / vhost-user measured in the same run, and each server's CPU time per request.
A rough figure for the issue's note, not a target.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vhost_blk import (  # noqa: E402
    IMAGE_SIZE,
    build_vbench,
    follow_guest,
    guest_bench_args,
    guest_script,
    medians,
)

from devicemodel.guestkit import qemu as g  # noqa: E402
from devicemodel.guestkit import trixie  # noqa: E402

NAMES = {"seqread": ("1 MiB O_DIRECT sequential read", "MB/s"),
         "seqwrite": ("1 MiB O_DIRECT sequential write", "MB/s"),
         "rand1": ("4 KiB O_DIRECT random read, 1 thread", "IOPS"),
         "rand8": ("4 KiB O_DIRECT random read, 8 threads", "IOPS")}


def main() -> int:
    parsed = guest_bench_args("vfio_user_blk", __doc__, "seqread,seqwrite,rand1")
    if parsed is None:
        return 2
    args, tests = parsed
    qemu = trixie.ensure_qemu()
    kernel = g.fetch_kernel()
    with qemu.workdir() as work:
        exe = build_vbench(work)
        initrd = g.build_initramfs(kernel, guest_script(args.reps, args.seconds, tests),
                                   work / "initrd.gz", files={"/vbench": exe})
        image = work / "disk.img"
        with open(image, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(IMAGE_SIZE >> 20):
                f.write(block)
        spec = f"virtio-blk,{image},writeback"
        vhost = g.start_backend(spec, work / "vhost.sock")
        vfio = g.start_backend(spec + ",modern", work / "vfio.sock", command="vfio-user")
        pids = {"vda": vhost.proc.pid, "vdb": vfio.proc.pid}
        try:
            devices = (g.vhost_device_args("vhost", "blk", qemu.inner(vhost.socket))
                       + g.vfio_user_device_args(qemu.inner(vfio.socket)))
            cmd = qemu.command(g.qemu_command(qemu.stage_kernel(kernel, work),
                                              qemu.inner(initrd), devices))
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            run = follow_guest(proc, pids, 90 + args.reps * len(tests) * 2 * (args.seconds + 5))
            marks, results = run.marks, run.results
            if run.failed("vfio_user_blk", vfio.log()):
                return 1
        finally:
            g.stop_backend(vhost)
            g.stop_backend(vfio)
    print(f"acrn-pydm's virtio-blk in one QEMU 11.1 TCG guest (-smp 1), {args.reps} "
          "interleaved repetitions, medians")
    print(f"{'test':44} {'vfio-user':>10} {'vhost-user':>10} {'ratio':>6}   "
          f"{'CPU µs/req vfio':>15} {'vhost':>8}")
    for test in tests:
        med, cpu = {}, {}
        for dev in ("vdb", "vda"):
            med[dev], cpu[dev] = medians(results, marks, args.reps, dev, test)
        title, unit = NAMES[test]
        ratio = med["vdb"] / med["vda"] if med["vda"] else float("nan")
        print(f"{title + ' (' + unit + ')':44} {med['vdb']:10.0f} {med['vda']:10.0f} "
              f"{ratio:6.2f}   {cpu['vdb']:15.1f} {cpu['vda']:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
