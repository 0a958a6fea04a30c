"""AHCI beside virtio-blk, both acrn-pydm PCI functions served whole over vfio-user to one
guest.

    python bench/ahci_blk.py [--reps 3] [--seconds 2] [--tests seqread,seqwrite,rand1,rand8]

Two copies of the same page-cached 512 MiB raw image: /dev/sda on ``acrn-pydm vfio-user
ahci,hd:<image>,writeback`` (ATA over AHCI: a command list, FISes and PRD tables in
guest memory, NCQ) and /dev/vda on ``acrn-pydm vfio-user virtio-blk,<image>,writeback,
modern``. QEMU 11.1 from the Debian 13 root (devicemodel/guestkit/trixie.py), TCG, -smp 1,
the stock Debian generic kernel (the cloud one has no AHCI driver); the guest program is
bench/vhost_blk.py's, the two disks' runs interleaved. Prints medians, the ratio
AHCI / virtio-blk measured in the same run, and each server's CPU time per request.
No target: a figure for the issue's note.
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
    TESTS,
    build_vbench,
    follow_guest,
    guest_bench_args,
    medians,
)

from devicemodel.guestkit import qemu as g  # noqa: E402
from devicemodel.guestkit import trixie  # noqa: E402

NAMES = {"seqread": ("1 MiB O_DIRECT sequential read", "MB/s"),
         "seqwrite": ("1 MiB O_DIRECT sequential write", "MB/s"),
         "rand1": ("4 KiB O_DIRECT random read, 1 thread", "IOPS"),
         "rand8": ("4 KiB O_DIRECT random read, 8 threads", "IOPS")}
DISKS = ("sda", "vda")  # AHCI, virtio-blk


def guest_script(reps: int, seconds: float, tests: tuple[str, ...]) -> str:
    lines = ["for i in $(seq 100); do [ -b /dev/sda ] && [ -b /dev/vda ] && break; "
             "sleep 0.1; done",
             "echo 1 > /proc/sys/vm/drop_caches",
             "info sda depth $(cat /sys/block/sda/device/queue_depth)"]
    for dev in DISKS:  # warm-up, not measured
        lines.append(f"/vbench seqread /dev/{dev} 0.5 >/dev/null")
    for r in range(reps):
        for test in tests:
            for dev in DISKS if r % 2 == 0 else DISKS[::-1]:
                tag = f"{dev} {test} {r}"
                lines += [f"info begin {tag}", f"/vbench {test} /dev/{dev} {seconds}",
                          f"info end {tag}"]
    lines.append("pass bench")
    return "\n".join(lines) + "\n"


def _image(path: Path, block: bytes) -> Path:
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE >> 20):
            f.write(block)
    return path


def main() -> int:
    parsed = guest_bench_args("ahci_blk", __doc__, ",".join(TESTS))
    if parsed is None:
        return 2
    args, tests = parsed
    qemu = trixie.ensure_qemu()
    kernel = g.fetch_kernel(flavours=g.GENERIC)
    with qemu.workdir() as work:
        exe = build_vbench(work)
        initrd = g.build_initramfs(kernel, guest_script(args.reps, args.seconds, tests),
                                   work / "initrd.gz", files={"/vbench": exe},
                                   modules=g.AHCI_MODULES)
        block = os.urandom(1 << 20)
        ahci_img, blk_img = _image(work / "ahci.img", block), _image(work / "blk.img", block)
        ahci = g.start_backend(f"ahci,hd:{ahci_img},writeback", work / "ahci.sock",
                               command="vfio-user")
        blk = g.start_backend(f"virtio-blk,{blk_img},writeback,modern", work / "blk.sock",
                              command="vfio-user")
        pids = {"sda": ahci.proc.pid, "vda": blk.proc.pid}
        try:
            devices = (g.vfio_user_device_args(qemu.inner(ahci.socket), addr=3)
                       + g.vfio_user_device_args(qemu.inner(blk.socket), addr=4))
            cmd = qemu.command(g.qemu_command(qemu.stage_kernel(kernel, work),
                                              qemu.inner(initrd), devices))
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            run = follow_guest(proc, pids, 120 + args.reps * len(tests) * 2 * (args.seconds + 5))
            log, marks, results = run.log, run.marks, run.results
            if run.failed("ahci_blk", ahci.log()):
                return 1
        finally:
            g.stop_backend(ahci)
            g.stop_backend(blk)
    depth = next((line.rsplit(" ", 1)[1] for line in log if " INFO sda depth " in line), "?")
    print(f"acrn-pydm over vfio-user in one QEMU 11.1 TCG guest (-smp 1, generic kernel, "
          f"AHCI NCQ depth {depth}), {args.reps} interleaved repetitions, medians")
    print(f"{'test':44} {'AHCI':>10} {'virtio-blk':>10} {'ratio':>6}   "
          f"{'CPU µs/req AHCI':>15} {'virtio':>8}")
    for test in tests:
        med, cpu = {}, {}
        for dev in DISKS:
            med[dev], cpu[dev] = medians(results, marks, args.reps, dev, test)
        title, unit = NAMES[test]
        ratio = med["sda"] / med["vda"] if med["vda"] else float("nan")
        print(f"{title + ' (' + unit + ')':44} {med['sda']:10.0f} {med['vda']:10.0f} "
              f"{ratio:6.2f}   {cpu['sda']:15.1f} {cpu['vda']:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
